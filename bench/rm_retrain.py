"""Retrain a finished run's helpfulness RM with other settings and measure it on the round's own rejection-sampling
answers, as the pipeline does (`rm_fidelity`: pair accuracy and headroom recovered; docs/results.md, "SmolLM2 on
the world"). The training data are the run's: round 0's prebuilt batch 1 and round 1's on-policy batch 2, in the
stage's mix; the RM settings are the experiment's (`--experiment`), with `--rm` overriding some. The run's own RM is
scored first through the same path (it must match the run's number). `--average` scores finished checkpoints
instead, each and their average (each one's scores standardised first), on the same answers.

    python -m bench.rm_retrain --run runs/smollm2-world --rm '{"skip_ratings": ["negligibly_better", "unsure"]}'
    python -m bench.rm_retrain --run runs/smollm2-world --average /tmp/rm_seed1,/tmp/rm_seed2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import pyarrow as pa
import torch

from model.checkpoint import load_checkpoint
from pipeline.config.run import compose_run
from pipeline.data.store import RunStore
from pipeline.evaluation.rm_fidelity import rm_fidelity
from pipeline.stages.reward_model.algorithm import RM_COLUMNS, reward_model_data, train_reward_model
from pipeline.stages.reward_model.stage import fits_context


@torch.no_grad()
def scores(checkpoint: Path, samples: pa.Table) -> list[float]:
    """Each sample's raw score from the RM in `checkpoint` (the measures only compare them)."""
    model = load_checkpoint(checkpoint, head="reward").eval()
    return [float(model(torch.tensor([r["prompt_token_ids"] + r["token_ids"]]))[0])
            for r in samples.select(["prompt_token_ids", "token_ids"]).to_pylist()]


def fidelity_of(r_help: list[float], samples: pa.Table, prompts: pa.Table) -> dict:
    column = samples.schema.get_field_index("r_help")
    return rm_fidelity(samples.set_column(column, "r_help", pa.array(r_help, pa.float32())), prompts)


def fidelity(checkpoint: Path, samples: pa.Table, prompts: pa.Table) -> dict:
    return fidelity_of(scores(checkpoint, samples), samples, prompts)


def average(checkpoints: list[Path], samples: pa.Table, prompts: pa.Table) -> None:
    """Print each checkpoint's fidelity, then that of their mean standardised score (an ensemble)."""
    standardised = []
    for checkpoint in checkpoints:
        raw = scores(checkpoint, samples)
        print(checkpoint, json.dumps(fidelity_of(raw, samples, prompts)), flush=True)
        mean, sd = statistics.mean(raw), statistics.pstdev(raw)
        standardised.append([(x - mean) / sd for x in raw])
    print("average", json.dumps(fidelity_of([statistics.mean(z) for z in zip(*standardised)], samples, prompts)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished run store's folder (runs/<name>)")
    ap.add_argument("--size", default="smollm2", help="the policy size whose SFT checkpoint starts the RM")
    ap.add_argument("--experiment", default="smollm2-world", help="whose RM settings to start from")
    ap.add_argument("--rm", default="{}", help="JSON overrides of the RM settings")
    ap.add_argument("--out", default="/tmp/rm_retrain")
    ap.add_argument("--average", help="comma-separated RM checkpoints to score, each and averaged (the run's RM "
                                      "first), instead of training one")
    args = ap.parse_args()
    store = RunStore(args.run)
    samples, prompts = store.stage(1, "rs_samples").read(), store.stage(0, "world_prompts_train").read()
    runs_rm = store.stage(1, "rm_helpfulness").path / "checkpoint"
    if args.average:
        average([runs_rm, *map(Path, args.average.split(","))], samples, prompts)
        return
    init = store.stage(0, f"sft_{args.size}").path / "checkpoint"
    config = dataclasses.replace(compose_run(f"experiment={args.experiment}").rm, **json.loads(args.rm))
    preferences = pa.concat_tables([store.stage(0, "world_preferences_b01").read(),
                                    store.stage(1, "policy_preferences_b02").read()]).select(list(RM_COLUMNS))
    train, _ = reward_model_data(preferences.filter(fits_context(preferences, init)), "helpfulness", config)
    print("run's RM", json.dumps(fidelity(runs_rm, samples, prompts)), flush=True)
    start = time.perf_counter()
    metrics = train_reward_model(init, train, config, args.out)
    print("retrained", json.dumps(dataclasses.asdict(config)), {k: metrics[k] for k in ("pairs", "steps")},
          f"{time.perf_counter() - start:.0f} s", json.dumps(fidelity(Path(args.out), samples, prompts)), flush=True)


if __name__ == "__main__":
    main()
