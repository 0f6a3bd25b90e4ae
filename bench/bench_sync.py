"""Weight sync, trainer -> generator: `python -m bench.bench_sync [--quick] [--reps N] [--json FILE]`.

Ours is the PPO path: a trainer-group rank writes the policy as an untied safetensors folder
(`RankContext.export`, as `ppo_iteration` does every iteration), then every generator actor reloads it in place
(`Pools.sync_generator`: vLLM's `reload_weights`, one call per actor); the time is the driver's wall clock around
both. The baseline is a raw in-memory copy of the same bytes (every tensor of that exported folder, `copy_` into
preallocated tensors in this process). Models: the tiny `small` and `large` sizes and, outside `--quick`,
SmolLM2-135M-Instruct (model.smollm2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Context, Section, alternate, main_for, markdown_table, median, spread, summary, timed

_LOADED: dict[str, Any] = {}  # on the trainer rank: the model to export, loaded once per folder


def export_loop(ctx: Any, payload: tuple[str, str]) -> float:
    """Trainer loop function: export the model of `source` (loaded on first use) untied to `out`; seconds."""
    from model.checkpoint import load_checkpoint

    source, out = payload
    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = load_checkpoint(source)
    start = time.perf_counter()
    ctx.export(_LOADED[source], out, untie=True)
    return time.perf_counter() - start


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

        def ours() -> dict[str, float]:
            start = time.perf_counter()
            export_s = group.run(export_loop, [(str(folder), str(out))] * group.world_size)[0]
            reload_s = pools.sync_generator(size, out)
            return {"total_s": time.perf_counter() - start, "export_s": export_s, "reload_s": reload_s}

        ours()  # the export folder the raw copy reads
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

        results = alternate({"ours": ours, "raw copy": raw}, ctx.reps)
        ours_total = [r["total_s"] for r in results["ours"]]
        raw_total = [r["total_s"] for r in results["raw copy"]]
        params = sum(v.numel() for k, v in source.items() if k != "lm_head.weight")
        rows.append({"model": label, "parameters": params, "bytes": n_bytes, "ours_s": summary(ours_total),
                     "export_s": summary([r["export_s"] for r in results["ours"]]),
                     "reload_s": summary([r["reload_s"] for r in results["ours"]]), "raw_copy_s": summary(raw_total),
                     "ratio": median(ours_total) / median(raw_total)})
        table.append([label, f"{params / 1e6:.1f}M", f"{n_bytes / 1e6:.1f}",
                      spread([1e3 * s for s in raw_total], ".2f"),
                      f"{n_bytes / median(raw_total) / 1e9:.1f}", spread([1e3 * s for s in ours_total], ".0f"),
                      f"{1e3 * median([r['export_s'] for r in results['ours']]):.0f} / "
                      f"{1e3 * median([r['reload_s'] for r in results['ours']]):.0f}",
                      f"{median(ours_total) / median(raw_total):,.0f}x"])
    header = ["model", "parameters", "MB moved (untied fp32)", "raw copy ms, median (min-max)", "raw GB/s",
              "ours ms (export + reload)", "export / reload ms", "ours / raw"]
    notes = [f"{ctx.reps} repetitions per side after a warm-up, alternating; one trainer rank, one generator actor "
             "per model",
             "ours goes through the file system (safetensors written by the rank, read by vLLM's reload), the raw "
             "copy stays in memory: the gap is the cost of the transport DESIGN.md names as the default"]
    if not ctx.smollm2:
        notes.append("--quick: the tiny `large` model only; the tiny `small` model and SmolLM2-135M run in full mode")
    return Section("sync", "Weight sync: trainer -> generator vs a raw in-memory copy", markdown_table(header, table),
                   rows, notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
