"""Training steps on SmolLM2-135M's shape (random init) as the trainer ranks take them (model/training.py):
`python -m bench.bench_training [--quick] [--steps N] [--json FILE]`.

The SFT step (packed rows, loss on every token) and the reward-model step (pairs, margin ranking loss) on 1 rank
(2 torch threads), 2 DDP ranks and 2 FSDP ranks (gloo, 1 thread each: the 2 cores either way), each in fp32 and bf16
(autocast, or FSDP's bf16 policy) and with activation checkpointing off and on, in one run. Each rank loads the
model as the stages do (model.sharded.load_for_training: under FSDP only its own shards) from a checkpoint saved
once. Per case: tokens/s over the timed steps (after one untimed) and each rank's peak memory: the peak resident
set less the one just before the load (CPU has no allocator statistics; Python's and torch's pages are left out
alike).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.plan_calibration import free_port, peak_rss_bytes, rss_bytes
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.llama import LlamaForCausalLM
from model.losses import margin_ranking_loss, masked_lm_loss
from model.sharded import load_for_training
from model.smollm2 import SHAPE as SMOLLM2_SHAPE
from model.training import TrainConfig, Trainer, TrainSetup

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
# (config, rows per step over all ranks, tokens per row); an RM row is one side of a pair
FULL = dict(model=dict(SMOLLM2_SHAPE, max_position_embeddings=2048), rows=4, seq=128)
QUICK = dict(model=TINY, rows=4, seq=32)
LAYOUTS = (("1 rank", 1, "ddp"), ("DDP 2 ranks", 2, "ddp"), ("FSDP 2 ranks", 2, "fsdp"))


def sft_loss(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return masked_lm_loss(module(ids), ids, torch.ones(ids.shape))


def rm_loss(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    scores = module(ids, attention_mask=torch.ones(ids.shape, dtype=torch.long))
    half = len(scores) // 2
    return margin_ranking_loss(scores[:half], scores[half:])


def rank_main(rank: int, world: int, port: int, case: dict, out: str) -> None:
    torch.set_num_threads(2 // world)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    before = rss_bytes()
    head, loss = ("causal_lm", sft_loss) if case["loop"] == "sft" else ("reward", rm_loss)
    train = TrainConfig(precision=case["precision"], activation_checkpointing=case["checkpointing"])
    setup = TrainSetup(world, case["strategy"], train)
    trainer = Trainer(load_for_training(case["checkpoint"], setup, head).train(), setup, lr=1e-5)
    rows = case["rows"] // world
    ids = torch.randint(3, case["model"]["vocab_size"], (rows, case["seq"]),
                        generator=torch.Generator().manual_seed(rank))
    trainer.step([(ids, 1.0)], loss, "warm-up")
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for step in range(case["steps"]):
        trainer.step([(ids, 1.0)], loss, f"step {step}")
    seconds = time.perf_counter() - start
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, "peak": peak_rss_bytes() - before}))
    if world > 1:
        dist.destroy_process_group()


def run_case(case: dict, world: int, tmp: Path) -> dict:
    """One case in fresh processes (a peak is per process), its tokens/s over every rank and its largest peak."""
    out = str(tmp / f"case-{time.monotonic_ns()}")
    mp.start_processes(rank_main, args=(world, free_port(), case, out), nprocs=world, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]
    tokens = case["rows"] * case["seq"] * case["steps"]
    return {"tokens_per_s": tokens / max(r["seconds"] for r in ranks),
            "peak_gib": max(r["peak"] for r in ranks) / 2**30}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model (the test suite)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (after one untimed)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_training-") as tmp:
        model = LlamaForCausalLM(ModelConfig(**sizes["model"]))
        model.init_weights(0)
        checkpoint = str(save_checkpoint(model, Path(tmp) / "model"))
        del model
        for loop in ("sft", "rm"):
            for precision in ("fp32", "bf16"):
                for checkpointing in (False, True):
                    for name, world, strategy in LAYOUTS:
                        case = dict(loop=loop, precision=precision, checkpointing=checkpointing, strategy=strategy,
                                    steps=args.steps, checkpoint=checkpoint, **sizes)
                        result = run_case(case, world, Path(tmp))
                        rows.append({"loop": loop, "layout": name, "precision": precision,
                                     "checkpointing": checkpointing, **result})
                        print(f"{loop} {name} {precision} ckpt={checkpointing}: {result['tokens_per_s']:.0f} tok/s, "
                              f"{result['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    print("| loop | layout | precision | checkpointing | tokens/s | peak GiB per rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loop']} | {r['layout']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"sizes": {k: v for k, v in sizes.items() if k != "model"},
                                         "model": sizes["model"], "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
