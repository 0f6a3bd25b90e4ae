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
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from model.tokenizer import load_tokenizer
from pipeline.data.store import StageStore
from pipeline import stage_names as names
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext, StepResult
from pipeline.stages.context_distillation.algorithm import (DEFAULT_ADJECTIVES, distillation_candidates,
                                                  distillation_demonstrations, distillation_prompts,
                                                  score_without_preprompt, select_distilled)
from pipeline.stages.generation import generate_shards, scored
from pipeline.stages.evaluation.oracle_eval import run_oracle_eval, stopping_at_eos
from pipeline.stages.rejection_sampling.stage import kept_demonstrations
from pipeline.stages.sft.algorithm import SFTConfig, with_mix
from pipeline.stages.sft.stage import fine_tune
from pipeline.state import PolicyState


@dataclass
class ContextDistillationConfig:
    # From this round on (0: never). Not in the paper: it distils the safety of the RLHF model; the tiny run's
    # last round is the one with the safety RM trained on the most data.
    distill_from: int = 3
    prompts: int = 0  # adversarial training prompts to use per round; 0: all of them
    adjectives: list[str] = field(default_factory=lambda: list(DEFAULT_ADJECTIVES))
    n_adjectives: int = 2  # adjectives per preprompt, drawn at random
    category_templates: bool = True  # add the risk category's answer template (the paper's better variant)
    seed: int = 0
    sft: SFTConfig = field(default_factory=SFTConfig)  # fine-tuning on the distilled answers (the paper's: SFT's)

    def __post_init__(self) -> None:
        errors = []
        for name in ("distill_from", "prompts"):
            if getattr(self, name) < 0:
                errors.append(f"rounds.context_distillation.{name} = {getattr(self, name)}: must be >= 0")
        if not self.adjectives or not all(isinstance(a, str) and a.strip() for a in self.adjectives):
            errors.append(f"rounds.context_distillation.adjectives = {self.adjectives}: one or more non-empty words")
        elif not 1 <= self.n_adjectives <= len(self.adjectives):
            errors.append(f"rounds.context_distillation.n_adjectives = {self.n_adjectives}: must be in "
                          f"[1, {len(self.adjectives)}] (the number of adjectives)")
        if errors:
            raise ValueError("\n".join(errors))


def run_context_distillation(ctx: StageContext, policies: list[PolicyState],
                             config: ContextDistillationConfig) -> StepResult:
    """Context distillation on every size, each evaluated on the held-out prompts before it (its effect, on the
    same prompts as the round's final evaluation). Its metrics per size: the selection counts and the training
    metrics (None when nothing was kept)."""
    mix = kept_demonstrations(ctx)
    metrics, before, distilled = {}, {}, []
    for policy in policies:
        before[policy.name] = run_oracle_eval(ctx, names.round_eval(policy.name, "before_cd"), policy)
        metrics[policy.name], policy = distil_one(ctx, policy, config, mix)
        distilled.append(policy)
    return StepResult(distilled, metrics, {"before": before})


def distil_one(ctx: StageContext, policy: PolicyState, config: ContextDistillationConfig,
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

    # The distilled answers depend on everything but the fine-tuning settings (the training stage's own config).
    selected = {k: v for k, v in dataclasses.asdict(config).items() if k != "sft"}
    data, _ = table_stage(ctx.store, ctx.round, f"cd_data_{policy.name}", inputs,
                          {"distillation": selected, "sampling": dataclasses.asdict(sampling)}, distil,
                          "demonstrations")
    counts, demonstrations = data.manifest()["extra"]["counts"], data.read()
    if not demonstrations.num_rows:
        return {"counts": counts, "training": None}, policy
    inputs = {"policy": policy.digest, "demonstrations": data.manifest()["content_digest"], "mix": mix[1]}
    metrics, policy, _ = fine_tune(ctx, f"cd_sft_{policy.name}", policy, inputs, with_mix(demonstrations, mix),
                                   config.sft)
    return {"counts": counts, "training": metrics}, policy
