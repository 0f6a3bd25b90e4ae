"""The Ghost Attention stage of a round (docs/paper.md, "Ghost Attention"); the data side is gatt/algorithm.py.

Per policy size, each a cached stage in round-RR/:
- `gatt_before_<size>`: adherence per turn (Table 30) of the policy on held-out dialogues, the instruction in the
  first turn only, answers sampled turn by turn on the generator pool;
- `gatt_data_<size>`: training dialogues answered turn by turn with the instruction on EVERY user turn (the
  policy sees it, so it follows it), stored with the instruction in the first turn only, one row per answered
  prefix (`gatt.prefixes`); with `gatt.distil` only the largest policy's, which the other sizes train on;
- `gatt_sft_<size>`: fine-tuned on them (`gatt.sft`) with the loss on each row's last answer only;
- `gatt_after_<size>`: the same adherence measurement on the fine-tuned policy.
Context note: the tiny models read 256 tokens, about three of the world's dialogue turns; longer dialogues keep
their first turn (the instruction) and the latest ones (`gatt.fit_history`), so turn 20 is measured on a
shortened history.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa

from actors.vllm_engine import Sampling
from model.tokenizer import Tokenizer, load_tokenizer
from pipeline.data.store import StageStore
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext, StepResult
from pipeline.stages.generation import generate_table
from pipeline.stages.gatt.algorithm import (GAttConfig, GAttDialogue, TurnAdherence, add_answers, adherence_prompts,
                                  first_adherent, gatt_demonstrations, gatt_examples, gatt_sampling_prompts)
from pipeline.stages.gatt.sources import DialogueSource
from pipeline.stages.evaluation.oracle_eval import stopping_at_eos
from pipeline.stages.rejection_sampling.stage import kept_demonstrations
from pipeline.stages.sft.algorithm import with_mix
from pipeline.stages.sft.stage import fine_tune
from pipeline.state import PolicyState


def answer_dialogues(dialogues: list[GAttDialogue], tokenizer: Tokenizer, context: int, sampling: Sampling,
                     generate: Callable[[pa.Table, int], pa.Table], every_turn: bool,
                     pick: Callable[[pa.Table], pa.Table] | None = None) -> list[list[str]]:
    """Answers turn by turn (one generator call per turn over every unfinished dialogue): the instruction on
    every user turn (GAtt's sampling) or in the first only (as deployed). With several samples per prompt,
    `pick` keeps one per prompt."""
    next_turn = gatt_sampling_prompts if every_turn else adherence_prompts
    answers: list[list[str]] = [[] for _ in dialogues]
    turn = 0
    while (table := next_turn(dialogues, answers, tokenizer, context - sampling.max_tokens)).num_rows:
        turn += 1
        samples = generate(table, turn)
        add_answers(dialogues, answers, pick(samples) if pick else samples)
    return answers


def _adherence_stage(ctx: StageContext, name: str, policy_digest: str, dialogues: list[GAttDialogue],
                     answer: Callable[[], list[list[str]]], eval_config: dict[str, Any],
                     source: DialogueSource) -> list[TurnAdherence]:
    def measure(*_: Any) -> dict[str, Any]:
        rows, measured = source.adherence(ctx, dialogues, answer(), name)
        return {"adherence": [dataclasses.asdict(r) for r in rows], **measured}

    stage, _ = table_stage(ctx.store, ctx.round, name, {"policy": policy_digest}, eval_config, measure, None)
    return [TurnAdherence(**r) for r in stage.manifest()["extra"]["adherence"]]


def run_gatt(ctx: StageContext, policies: list[PolicyState], config: GAttConfig,
             source: DialogueSource) -> StepResult:
    """GAtt on every size, the largest first: with `gatt.distil` the other sizes train on its samples. Each size is
    trained on its GAtt dialogues mixed with the round's kept demonstrations, as the paper mixes GAtt data into
    its fine-tuning data (docs/results.md: trained on GAtt dialogues alone, the tiny policies began every answer
    with a greeting in the instructed language). Its metrics per size: adherence per turn before and after, the
    number of training samples and the training metrics."""
    mix = kept_demonstrations(ctx)
    largest, samples_from, tuned_largest = gatt_one(ctx, policies[-1], config, source, mix)
    metrics, tuned = {}, []
    for policy in policies[:-1]:
        metrics[policy.name], _, policy = gatt_one(ctx, policy, config, source, mix,
                                                   samples_from if config.distil else None)
        tuned.append(policy)
    metrics[tuned_largest.name] = largest
    return StepResult([*tuned, tuned_largest], metrics)


def gatt_one(ctx: StageContext, policy: PolicyState, config: GAttConfig, source: DialogueSource,
             mix: tuple[pa.Table, str], samples_from: tuple[pa.Table, str] | None = None
             ) -> tuple[dict[str, Any], tuple[pa.Table, str], PolicyState]:
    """GAtt for one policy size (the size at the GAtt checkpoint returned, or as it was when no dialogue was kept),
    its instructions and dialogues from `source` (the world's, or the user's files), which measures adherence too.
    `mix` (DEMONSTRATIONS, digest) is trained on alongside the GAtt dialogues; `samples_from` (DEMONSTRATIONS,
    digest): another policy's GAtt training samples (`gatt_data_<size>`) to train on instead of sampling this
    one's. Returns its result, the training samples with their digest (for `samples_from` of the other sizes), and
    the policy."""
    tokenizer = load_tokenizer(policy.checkpoint)
    sampling = stopping_at_eos(replace(ctx.sampling, n=1), tokenizer)
    # The training dialogues depend on everything but the fine-tuning settings (the training stage's own config).
    sampled = {k: v for k, v in dataclasses.asdict(config).items() if k != "sft"}
    from_source = {"source": source.digest} if source.digest else {}  # the world's: in the stages' inputs already
    data_config = {"gatt": sampled, "sampling": dataclasses.asdict(sampling), **from_source}
    # Table 30's measurement depends only on the held-out dialogues and the sampling, not on how GAtt trains.
    eval_config = {"dialogues": [config.eval_dialogues, config.turns, config.short_prob, config.seed],
                   "sampling": dataclasses.asdict(sampling), **from_source}
    held_out = source.dialogues("eval", config.eval_dialogues, config.turns, random.Random(config.seed + 1),
                                config.short_prob, min_turns=config.turns)

    def answer(dialogues: list[GAttDialogue], every_turn: bool, sampler: str, n: int = 1) -> list[list[str]]:
        pool = ctx.generators(policy)
        turn_sampling = replace(sampling, n=n)
        return answer_dialogues(dialogues, tokenizer, policy.context, turn_sampling,
                                lambda table, turn: generate_table(pool, table, replace(
                                    turn_sampling, seed=(sampling.seed or 0) + turn), ctx.round, sampler),
                                every_turn, (lambda s: first_adherent(dialogues, s)) if n > 1 else None)

    before = _adherence_stage(ctx, f"gatt_before_{policy.name}", policy.digest, held_out,
                              lambda: answer(held_out, False, "gatt-eval"), eval_config, source)
    if samples_from is None:
        def sample(data: StageStore, _: set[int]) -> None:
            dialogues = source.dialogues("train", config.dialogues, config.turns, random.Random(config.seed),
                                         config.short_prob)
            answers = answer(dialogues, True, "gatt", config.samples_per_turn if config.verify else 1)
            data.write_shard(0, gatt_demonstrations(dialogues, answers, config.verify, config.prefixes))

        data, _ = table_stage(ctx.store, ctx.round, f"gatt_data_{policy.name}", {"policy": policy.digest}, data_config,
                              sample, "demonstrations")
        samples_from = data.read(), data.manifest()["content_digest"]
    dialogues, dialogues_digest = samples_from
    if not dialogues.num_rows:
        return {"before": before, "after": before, "samples": 0, "training": None}, samples_from, policy
    inputs = {"policy": policy.digest, "dialogues": dialogues_digest, "mix": mix[1]}
    metrics, policy, _ = fine_tune(ctx, f"gatt_sft_{policy.name}", policy, inputs, with_mix(dialogues, mix),
                                   config.sft, gatt_examples)
    after = _adherence_stage(ctx, f"gatt_after_{policy.name}", policy.digest, held_out,
                             lambda: answer(held_out, False, "gatt-eval"), eval_config, source)
    return {"before": before, "after": after, "samples": dialogues.num_rows, "training": metrics}, samples_from, policy
