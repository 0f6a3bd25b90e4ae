"""The safety context distillation stage of a round (docs/paper.md, "Safety"); the data side is
pipeline/stages/context_distillation/algorithm.py.

Per policy size, each a cached stage in round-RR/:
- `cd_data_<size>`: one answer per adversarial training prompt with and without the safety preprompt (generator
  pool), both scored by the round's safety RM on the prompt without the preprompt (scorer pool), the preprompted
  answer kept only where it scores higher; the manifest counts kept and dropped answers;
- `cd_sft_<size>`: fine-tuned on the kept answers with the prompt WITHOUT the preprompt (every answer trained).
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import pyarrow as pa

from model.tokenizer import load_tokenizer
from pipeline.data.store import StageStore
from pipeline import stage_names as names
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext, StepResult
from pipeline.stages.context_distillation.algorithm import (ContextDistillationConfig, distillation_candidates,
                                                  distillation_demonstrations, distillation_prompts,
                                                  score_without_preprompt, select_distilled)
from pipeline.stages.generation import generate_shards, scored
from pipeline.stages.evaluation.oracle_eval import run_oracle_eval, stopping_at_eos
from pipeline.stages.rejection_sampling.stage import kept_demonstrations
from pipeline.stages.sft.algorithm import SFTConfig, with_mix
from pipeline.stages.sft.stage import fine_tune
from pipeline.state import PolicyState


def run_context_distillation(ctx: StageContext, policies: list[PolicyState], config: ContextDistillationConfig,
                             sft: SFTConfig) -> StepResult:
    """Context distillation on every size, each evaluated on the held-out prompts before it (its effect, on the
    same prompts as the round's final evaluation). Its metrics per size: the selection counts and the training
    metrics (None when nothing was kept)."""
    mix = kept_demonstrations(ctx)
    metrics, before, distilled = {}, {}, []
    for policy in policies:
        before[policy.name] = run_oracle_eval(ctx, names.round_eval(policy.name, "before_cd"), policy)
        metrics[policy.name], policy = distil_one(ctx, policy, config, sft, mix)
        distilled.append(policy)
    return StepResult(distilled, metrics, {"before": before})


def distil_one(ctx: StageContext, policy: PolicyState, config: ContextDistillationConfig, sft: SFTConfig,
               mix: tuple[pa.Table, str]) -> tuple[dict[str, Any], PolicyState]:
    """Context distillation for one policy size (the size at the distilled checkpoint returned, or as it was when
    no answer was kept). `mix` (DEMONSTRATIONS, digest) is trained on alongside the kept answers: trained on them
    alone, a tiny policy learnt to refuse (docs/results.md, "Ghost Attention, context distillation and the judges")."""
    tokenizer = load_tokenizer(policy.checkpoint)
    sampling = stopping_at_eos(replace(ctx.sampling, n=1), tokenizer)
    inputs = {"policy": policy.digest, "prompts": ctx.data.prompts_train.digest,
              "reward_models": ctx.reward_models.digest}

    def distil(data: StageStore, _: set[int]) -> dict[str, Any]:
        batch = distillation_prompts(ctx.data.prompts_train.rows, tokenizer, config,
                                     policy.context - sampling.max_tokens)
        pool, scorer = ctx.generators(policy), ctx.scorers()
        plain, preprompted = generate_shards(pool, [batch.plain, batch.preprompted], sampling, ctx.round,
                                             "context-distillation")
        plain, preprompted = scored(scorer, plain, score_without_preprompt(preprompted, batch.plain))
        kept, counts = select_distilled(distillation_candidates(batch, plain, preprompted))
        counts["too_long"], counts["generic_only"] = batch.too_long, batch.generic_only
        data.write_shard(0, distillation_demonstrations(kept))
        return {"counts": counts}

    data, _ = table_stage(ctx.store, ctx.round, f"cd_data_{policy.name}", inputs,
                          {"distillation": dataclasses.asdict(config), "sampling": dataclasses.asdict(sampling)},
                          distil, "demonstrations")
    counts, demonstrations = data.manifest()["extra"]["counts"], data.read()
    if not demonstrations.num_rows:
        return {"counts": counts, "training": None}, policy
    inputs = {"policy": policy.digest, "demonstrations": data.manifest()["content_digest"], "mix": mix[1]}
    metrics, policy, _ = fine_tune(ctx, f"cd_sft_{policy.name}", policy, inputs, with_mix(demonstrations, mix), sft)
    return {"counts": counts, "training": metrics}, policy
