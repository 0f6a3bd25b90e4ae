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
import pyarrow as pa
from omegaconf import DictConfig

from pipeline.config import ConfigError, RunConfig, register, validate
from pipeline.data.store import RunStore, digest_config
from pipeline.stages.cached import CHECKPOINT_DIR, checkpoint_stage, model_digest
from pipeline.stages.reward_model import table8_markdown
from pipeline.stages.reward_models import KINDS, run_reward_models
from pipeline.stages.oracle_eval import run_oracle_eval
from pipeline.stages.sft import train_sft
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
    base_scores: dict[str, list[dict]] = {}
    for m in models:
        base_digest = digest_config(dataclasses.asdict(m) | {"checkpoint": m.size})
        scores, cached = run_oracle_eval(store, 0, f"base_eval_{m.size}", m.checkpoint, base_digest, prompts,
                                         prompts_digest, "plain", config.eval_sampling, config.pretrain.seq_len)
        base_scores[m.size] = scores
        for s in scores:
            correct = "-" if s["correct"] is None else f"{s['correct']:.0%}"
            print(f"  {m.size:<6} {s['category']:<20} {s['prompts']:4d} {s['helpfulness']:8.2f} {correct:>8} "
                  f"{s['unsafe']:7.0%} {s['refused']:8.0%}")
    demonstrations = tables["demonstrations"]
    demos_digest = store.stage(0, world_stage_name("demonstrations")).manifest()["content_digest"]
    print(f"\n== SFT on {demonstrations.num_rows} demonstrations (loss on answer tokens only), then the same "
          "held-out prompts in the LLaMA-2 chat format")
    print(f"  {'model':<12} {'steps':>5} {'loss':>12} {'helpful':>8} {'correct':>8} {'unsafe adv.':>11} "
          f"{'false refusals':>14}")
    for m in models:
        base_digest = digest_config(dataclasses.asdict(m) | {"checkpoint": m.size})
        folder, metrics, _ = checkpoint_stage(
            store, 0, f"sft_{m.size}", {"base": base_digest, "demonstrations": demos_digest},
            dataclasses.asdict(config.sft), lambda out, m=m: train_sft(m.checkpoint, demonstrations, out, config.sft))
        scores, _ = run_oracle_eval(store, 0, f"sft_eval_{m.size}", folder,
                                    model_digest(store.stage(0, f"sft_{m.size}").manifest()), prompts,
                                    prompts_digest, "llama2", config.eval_sampling, config.sft.seq_len)
        print(f"  {m.size + ' base':<12} {'':>5} {'':>12} " + _summary_cells(base_scores[m.size]))
        print(f"  {m.size + ' SFT':<12} {metrics['steps']:5d} {metrics['first_loss']:5.2f} -> {metrics['last_loss']:4.2f} "
              + _summary_cells(scores))

    # Reward models start from the largest SFT policy (the paper initialises them from the chat model).
    largest = max(models, key=lambda m: m.parameters)
    weeks = [name for name in tables if name.startswith("preferences_b")]
    preferences = pa.concat_tables([tables[w] for w in weeks])
    preferences_digest = digest_config([store.stage(0, world_stage_name(w)).manifest()["content_digest"]
                                        for w in weeks])
    rms = run_reward_models(store, 1, store.stage(0, f"sft_{largest.size}").path / CHECKPOINT_DIR,
                            model_digest(store.stage(0, f"sft_{largest.size}").manifest()), preferences,
                            preferences_digest, config.rm)
    print(f"\n== reward models (round 1) from the {largest.size} SFT model, on {preferences.num_rows} pairs of "
          f"{len(weeks)} weekly batches; held-out accuracy (%) by rating beside the paper's Table 8")
    for kind, (folder, metrics, _) in rms.items():
        print(f"  {kind} RM: {metrics['pairs']} training pairs, {metrics['steps']} steps, loss "
              f"{metrics['first_loss']:.2f} -> {metrics['last_loss']:.2f}; {metrics['over_context']} pairs over "
              f"the context left out; {folder}")
    print(table8_markdown({(kind, test): metrics["heldout"][test] for kind, (_, metrics, _) in rms.items()
                           for test in KINDS}))

    print(f"\nrun store: {store.root.resolve()}  ({time.perf_counter() - start:.0f} s; re-running reuses every "
          "finished stage)")


# An absolute path: with `python -m pipeline` Hydra would otherwise look for a Python package named `conf`.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _summary_cells(scores: list[dict]) -> str:
    """Helpful prompts' helpfulness and correctness, unsafe share on adversarial prompts, false refusals."""
    by = {s["category"]: s for s in scores}
    adversarial = [s for s in scores if s["category"] not in ("helpful", "borderline")]
    unsafe = sum(s["unsafe"] * s["prompts"] for s in adversarial) / max(1, sum(s["prompts"] for s in adversarial))
    helpful, borderline = by.get("helpful"), by.get("borderline")
    return (f"{helpful['helpfulness'] if helpful else 0:8.2f} {helpful['correct'] if helpful else 0:8.0%} "
            f"{unsafe:11.0%} {borderline['refused'] if borderline else 0:14.0%}")


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
