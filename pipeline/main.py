"""The main job: round 0 of the pipeline on the embedded world.

world (cached) -> pretrain the tiny base models (cached) -> sample their answers to held-out prompts with vLLM and
score them with the oracle (cached). Every stage's outputs and manifest are in the run store, so a second run
reuses them. The RLHF stages (SFT, reward models, rounds) are added to this driver as they land.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import ConfigError, RunConfig, register, validate
from pipeline.data.store import RunStore, digest_config
from pipeline.stages.oracle_eval import run_oracle_eval
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.world import run_world, world_stage_name


def run(run_dir: Path, config: RunConfig) -> None:
    store = RunStore(run_dir)
    start = time.perf_counter()

    tables, cached = run_world(store, config.world)
    print(f"\n== world {'(cached)' if cached else '(built)'}: {store.root / 'round-00'}")
    for name, table in tables.items():
        print(f"  {name:<18} {table.num_rows:6d} rows")

    corpus_digest = store.stage(0, world_stage_name("corpus")).manifest()["content_digest"]
    models, cached = run_pretrain(store, tables["corpus"], corpus_digest, config.pretrain)
    print(f"\n== pretrain {'(cached)' if cached else '(trained)'}: {store.stage(0, 'pretrain').path}")
    print(f"  {'size':<6} {'params':>8} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'train loss':>10} "
          f"{'held-out loss':>13} {'held-out ppl':>12}")
    for m in models:
        print(f"  {m.size:<6} {m.parameters / 1e6:7.2f}M {m.steps:6d} {m.train_tokens:9,d} "
              f"{m.tokens_per_second:7,.0f} {m.train_loss:10.3f} {m.heldout_loss:13.3f} {m.heldout_perplexity:12.2f}")

    prompts_stage = store.stage(0, world_stage_name("prompts_eval"))
    prompts, prompts_digest = tables["prompts_eval"], prompts_stage.manifest()["content_digest"]
    print("\n== base models on held-out prompts (vLLM samples at T=%.1f, scored by the oracle)"
          % config.eval_sampling.temperature)
    print(f"  {'model':<6} {'category':<20} {'n':>4} {'helpful':>8} {'correct':>8} {'unsafe':>7} {'refused':>8}")
    for m in models:
        model_digest = digest_config(dataclasses.asdict(m) | {"checkpoint": m.size})
        scores, cached = run_oracle_eval(store, 0, f"base_eval_{m.size}", m.checkpoint, model_digest, prompts,
                                         prompts_digest, "plain", config.eval_sampling, config.pretrain.seq_len)
        for s in scores:
            correct = "-" if s["correct"] is None else f"{s['correct']:.0%}"
            print(f"  {m.size:<6} {s['category']:<20} {s['prompts']:4d} {s['helpfulness']:8.2f} {correct:>8} "
                  f"{s['unsafe']:7.0%} {s['refused']:8.0%}")
    print(f"\nrun store: {store.root.resolve()}  ({time.perf_counter() - start:.0f} s; re-running reuses every "
          "finished stage)")


# An absolute path: with `python -m pipeline` Hydra would otherwise look for a Python package named `conf`.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        config = validate(cfg)
    except ConfigError as err:  # before any stage or actor starts
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(config.run_dir, config)


def main() -> None:
    register()
    _hydra_main()
