"""Fine-tuning as a cached stage: `fine_tune`, the one step every stage that trains a policy on demonstrations
calls (SFT, rejection sampling's distillation, GAtt, context distillation), and the SFT stage of every size."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pyarrow as pa

from pipeline import stage_names as names
from pipeline.stages.cached import checkpoint_stage, training_recipe
from pipeline.stages.context import StageContext, StepResult, Table
from pipeline.stages.evaluation.oracle_eval import run_oracle_eval
from pipeline.stages.sft.algorithm import SFTConfig, train_sft
from pipeline.state import PolicyState


class Tuned(NamedTuple):
    metrics: dict[str, Any]  # the training's
    policy: PolicyState  # at the new checkpoint
    cached: bool  # whether the stage came from the store


def fine_tune(ctx: StageContext, name: str, policy: PolicyState, inputs: Mapping[str, str], rows: pa.Table,
              config: SFTConfig, examples: Callable | None = None) -> Tuned:
    """Stage `name`: `policy` fine-tuned on `rows` (`inputs` identify them and the policy) on the trainer group."""
    extra = (examples,) if examples is not None else ()
    _, metrics, cached = checkpoint_stage(ctx.store, ctx.round, name, inputs, training_recipe(config),
                                          lambda out: ctx.train(train_sft, policy.checkpoint, rows, out, config,
                                                                *extra))
    return Tuned(metrics, policy.moved_to(ctx.store.stage(ctx.round, name)), cached)


def run_sft(ctx: StageContext, base: list[PolicyState], demonstrations: Table, config: SFTConfig) -> StepResult:
    """Every size fine-tuned on the demonstrations (rows, digest), then evaluated on the held-out prompts; the
    metrics per size are the training's, whether it was cached and its seconds."""
    rows, digest = demonstrations.rows, demonstrations.digest
    policies, metrics, scores = [], {}, {}
    for policy in base:
        started = time.perf_counter()
        tuned = fine_tune(ctx, names.sft(policy.name), policy, {"base": policy.digest, "demonstrations": digest},
                          rows, config)
        policies.append(tuned.policy)
        scores[policy.name] = run_oracle_eval(ctx, names.sft_eval(policy.name), tuned.policy)
        metrics[policy.name] = {"training": tuned.metrics, "cached": tuned.cached,
                                "seconds": time.perf_counter() - started}
    return StepResult(policies, metrics, {"after": scores})
