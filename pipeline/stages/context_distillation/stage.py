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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.pool import Pool
from actors.vllm_engine import Sampling
from model.tokenizer import load_tokenizer
from pipeline.data.store import RunStore, StageStore
from pipeline.stages.cached import checkpoint_stage, table_stage
from pipeline.stages.context_distillation.algorithm import (ContextDistillationConfig, distillation_candidates,
                                                  distillation_demonstrations, distillation_prompts,
                                                  score_without_preprompt, select_distilled)
from pipeline.stages.generation import generate_shards
from pipeline.stages.oracle_eval import stopping_at_eos
from pipeline.stages.sft import SFTConfig, train_sft, with_mix
from pipeline.state import PolicyState


def run_context_distillation(store: RunStore, round: int, policy: PolicyState, prompts_train: pa.Table,  # noqa: A002
                             prompts_digest: str, rm_digest: str, config: ContextDistillationConfig,
                             sft: SFTConfig, sampling: Sampling, generators: Callable[[Path], Pool],
                             scorers: Callable[[], Pool], train: Callable[..., dict],
                             mix: tuple[pa.Table, str] | None = None) -> tuple[dict[str, Any], PolicyState]:
    """Context distillation for one policy size (the size at the distilled checkpoint returned, or as it was when
    no answer was kept). `mix` (DEMONSTRATIONS, digest) is trained on alongside the kept answers (measured on the
    small tiny policy: false refusals 15% -> 62% trained on the kept answers alone, 15% -> 30% mixed, 15% -> 15%
    mixed once the prompts too long for the template got the generic preprompt; docs/results.md). Returns the
    selection counts and the training metrics (None when nothing was kept)."""
    tokenizer = load_tokenizer(policy.checkpoint)
    sampling = stopping_at_eos(replace(sampling, n=1), tokenizer)
    inputs = {"policy": policy.digest, "prompts": prompts_digest, "reward_models": rm_digest}

    def distil(data: StageStore, _: set[int]) -> dict[str, Any]:
        batch = distillation_prompts(prompts_train, tokenizer, config, policy.context - sampling.max_tokens)
        pool, scorer = generators(policy.checkpoint), scorers()
        plain, preprompted = generate_shards(pool, [batch.plain, batch.preprompted], sampling, round,
                                             "context-distillation")
        plain, preprompted = scorer.map_shards("score", [plain, score_without_preprompt(preprompted, batch.plain)])
        kept, counts = select_distilled(distillation_candidates(batch, plain, preprompted))
        counts["too_long"], counts["generic_only"] = batch.too_long, batch.generic_only
        data.write_shard(0, distillation_demonstrations(kept))
        return {"counts": counts}

    data, _ = table_stage(store, round, f"cd_data_{policy.name}", inputs,
                          {"distillation": dataclasses.asdict(config), "sampling": dataclasses.asdict(sampling)},
                          distil, "demonstrations")
    counts, demonstrations = data.manifest()["extra"]["counts"], data.read()
    if not demonstrations.num_rows:
        return {"counts": counts, "training": None}, policy
    _, metrics, _ = checkpoint_stage(
        store, round, f"cd_sft_{policy.name}",
        {"policy": policy.digest, "demonstrations": data.manifest()["content_digest"], "mix": mix[1] if mix else ""},
        sft.recipe(),
        lambda out: train(train_sft, policy.checkpoint, with_mix(demonstrations, mix), out, sft))
    return {"counts": counts, "training": metrics}, policy.moved_to(store.stage(round, f"cd_sft_{policy.name}"))
