"""Weight sync, trainer -> generator, by `cluster.weight_sync`: `python -m bench.bench_sync [--quick] [--reps N]
[--json FILE]`.

The pipeline's own path (pipeline.cluster.weight_sync.WeightSync, what PPO calls every iteration), timed by the driver's
wall clock from the trainer's first step to the last engine's reload, in each mode:
- collective: trainer rank 0 broadcasts the checkpoint tensors in buckets through a gloo group with the engine's
  workers, which load them as they arrive;
- object store: rank 0 puts the whole model into Ray's object store, the actor reloads from there;
- folder: rank 0 writes a safetensors folder, the actor reloads it.
Models: the tiny `large` size; outside `--quick` SmolLM2-135M-Instruct and a random-init 1.1B LLaMA shape (TinyLlama's:
22 layers, hidden 2048, GQA 32/4, vocab 32000) in bf16. The implied seconds at 7B and 70B scale the bytes to the
LLaMA-2 checkpoints' (bf16) at the links' nominal bandwidth: a floor, the wire alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Context, Section, main_for, markdown_table, median, spread

MODES = {"collective": "collective (gloo, buckets)", "object_store": "object store", "folder": "safetensors folder"}
BUCKET_MIB = 512  # cluster.weight_bucket_mib's default
# A 1.1B LLaMA shape (TinyLlama-1.1B's), random init in bf16: the largest that fits this machine's 24 GiB three times
# (trainer rank, engine, the mode's copy).
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, dtype="bfloat16")
# The LLaMA-2 checkpoints' bytes in bf16 (untied) and the links a collective sync would cross: NVLink 4 (H100 SXM,
# 450 GB/s each way) inside a node, one NDR InfiniBand port (400 Gb/s = 50 GB/s) between nodes.
SCALES = {"7B over NVLink": (6.74e9 * 2, 450e9), "70B over InfiniBand": (68.98e9 * 2, 50e9)}


def hold_model(ctx: Any, folder: str | None) -> int:
    """Trainer loop function: the checkpoint as a stage keeps its model (`ctx.state["policy"]`; None: drop it); its
    parameters."""
    from model.checkpoint import load_checkpoint

    ctx.state.pop("policy", None)
    if folder is None:
        return 0
    ctx.state["policy"] = load_checkpoint(folder)
    return sum(p.numel() for p in ctx.state["policy"].parameters())


def one_b_model(ctx: Context) -> Path:
    """The 1.1B shape, random init, saved in bf16 with the bench tokenizer."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.llama import LlamaForCausalLM

    tok = ctx.tokenizer
    model = LlamaForCausalLM(ModelConfig(**ONE_B, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                         pad_token_id=tok.pad_id))
    model.init_weights(0)
    return save_checkpoint(model.to(torch.bfloat16), ctx.root / "1b", tokenizer=tok)


def measure(ctx: Context, label: str, folder: Path, generator: Any, group: Any,
            table: list[list[str]]) -> dict[str, Any]:
    """Every mode on one model, alternating; adds its table rows; returns its JSON row."""
    from pipeline.cluster.weight_sync import WeightSync

    params = group.run(hold_model, [str(folder)] * group.world_size)[0]
    syncs = {mode: WeightSync(mode, generator, group, BUCKET_MIB * 2**20, ctx.root / f"sync-{folder.name}")
             for mode in MODES}

    def timed(mode: str) -> dict[str, float]:
        start = time.perf_counter()
        load_s = syncs[mode]("policy")
        return {"total_s": time.perf_counter() - start, "load_s": load_s}

    # Each mode's syncs back to back, as PPO's iterations run them (an object-store sync puts the model while the
    # generators' replay still holds the previous one), after one warm-up (the collective's: its group's rendezvous).
    results = {mode: [timed(mode) for _ in range(1 + ctx.reps)][1:] for mode in MODES}
    moved = syncs["collective"].bytes_sent
    row: dict[str, Any] = {"model": label, "parameters": params, "bytes": moved}
    for mode, name in MODES.items():
        total = [r["total_s"] for r in results[mode]]
        load = [r["load_s"] for r in results[mode]]
        row[mode] = {"total_s": total, "load_s": load, "gb_per_s": moved / median(total) / 1e9}
        table.append([label if mode == "collective" else "", f"{params / 1e6:,.0f}M", f"{moved / 1e6:,.0f}", name,
                      spread([1e3 * s for s in total], ",.0f"), f"{1e3 * median(load):,.0f}",
                      f"{moved / median(total) / 1e9:.2f}"])
    return row


def run(ctx: Context) -> Section:
    from actors.generator import Generator
    from actors.pool import Pool
    from actors.vllm_engine import EngineConfig
    from pipeline.cluster.pools import engine_pool_config

    models = {"tiny large": lambda: ctx.model("large")}
    if ctx.smollm2:
        models["SmolLM2-135M"] = ctx.smollm2_model
        models["LLaMA 1.1B (random, bf16)"] = lambda: one_b_model(ctx)
    pools = ctx.pools
    group = pools.trainers()
    rows, table = [], []
    for label, make in models.items():
        folder = make()
        pool_config = engine_pool_config(pools.config.generator, f"sync-{folder.name}")
        with Pool(Generator, pool_config, str(folder), EngineConfig(max_model_len=256)) as generator:
            rows.append(measure(ctx, label, folder, generator, group, table))
        group.run(hold_model, [None] * group.world_size)  # the model off the rank before the next one
    header = ["model", "parameters", "MB moved", "mode", "ms, median (min-max)", "engine load ms", "GB/s"]
    implied = [[scale, f"{nbytes / 1e9:.1f}", f"{bandwidth / 1e9:.0f}", f"{nbytes / bandwidth:.2f}"]
               for scale, (nbytes, bandwidth) in SCALES.items()]
    text = (markdown_table(header, table) + "\n\nThe collective's wire time at scale (bf16 checkpoint bytes at the "
            "link's nominal bandwidth; a floor):\n\n"
            + markdown_table(["policy, link", "GB", "GB/s", "seconds"], implied))
    notes = [f"{ctx.reps} syncs per mode back to back after a warm-up; one trainer rank, one generator actor "
             f"(in-process engine, 1 rank), {BUCKET_MIB} MiB buckets; ms: the driver's wall clock around the whole "
             "sync (the trainer's part, the Ray calls, the engine's reload); engine load: inside the actor",
             "MB moved: the checkpoint tensors as sent (untied, in the checkpoint's dtype)"]
    if not ctx.smollm2:
        notes.append("--quick: the tiny `large` model only; SmolLM2-135M and the 1.1B model run in full mode")
    return Section("sync", "Weight sync: collective vs object store vs folder", text, rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
