"""On-policy weekly batches (docs/paper.md, "Weekly preference batches": each new batch is sampled from the latest
models and rated): from batch 2 on, `share` of a weekly batch is pairs of two answers of the latest policies to one
fresh training prompt, rated by the world's annotator (its noise, the paper's rating scale); the rest, and all of
batch 1, are the world's prebuilt pairs. The RMs so learn to rank answers of the policy's own form
(docs/results.md, "On-policy weekly batches").

Stage `policy_preferences_bNN` in the round that ingests batch NN: inputs are the sampling policies and the
prebuilt batch; the table is the whole mixed batch (PREFERENCES, the prebuilt rows marked by `source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from actors.vllm_engine import Sampling
from model.tokenizer import load_tokenizer
from pipeline.data.schemas import PREFERENCES, PROMPTS
from pipeline.data.store import StageStore, digest_config
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext, Table
from pipeline.stages.generation import ANSWER_TOKENS, generate_shards
from pipeline.stages.evaluation.oracle_eval import eval_prompts, stopping_at_eos
from pipeline.stages.reward_model.algorithm import id_rank
from pipeline.state import PolicyState
from pipeline.world import Prompt, World
from pipeline.world.preferences import compare, on_policy_prompts
from pipeline.world.seeding import stream
from pipeline.world.tables import comparison_rows, prompt_rows


@dataclass
class SampleSource:
    """Answers from one policy size (an index into the sizes, smallest first: -1 the largest) at one temperature."""

    policy: int = -1
    temperature: float = 0.7
    n: int = 1


@dataclass
class OnPolicyConfig:
    # Share of each weekly batch from batch 2 on that is on-policy pairs (0: every batch prebuilt). Batch 1 seeds.
    share: float = 0.75
    # Every source answers every prompt; a pair is two distinct answers drawn at random from all of them (the
    # paper's pairs came from different model variants and temperatures).
    sources: list[SampleSource] = field(default_factory=lambda: [SampleSource(-1, 0.7, 2), SampleSource(0, 1.0, 1)])
    max_tokens: int = ANSWER_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SampleSource) else SampleSource(**s) for s in self.sources]
        errors = []
        if not 0 <= self.share <= 1:
            errors.append(f"rounds.on_policy.share = {self.share}: must be in [0, 1]")
        if sum(s.n for s in self.sources) < 2 or any(s.n < 1 or s.temperature <= 0 for s in self.sources):
            errors.append(f"rounds.on_policy.sources = {self.sources}: n >= 1 and temperature > 0 each, "
                          "two answers or more per prompt in all")
        if self.max_tokens < 1:
            errors.append(f"rounds.on_policy.max_tokens = {self.max_tokens}: must be >= 1")
        if errors:
            raise ValueError("\n".join(errors))


def stage_name(batch: int) -> str:
    return f"policy_preferences_b{batch:02d}"


def pair_answers(prompts: Sequence[Prompt], answers: dict[str, list[str]], ids: Sequence[str], batch: int,
                 world: World) -> tuple[pa.Table, int]:
    """PREFERENCES rows: for each prompt two distinct non-blank answers drawn at random, rated by the annotator
    (adversarial prompts by a safety annotator); and how many prompts had fewer than two distinct answers."""
    rng = stream(world.config.seed, "on_policy_pairs", batch)
    comparisons, skipped = [], 0
    for prompt, pid in zip(prompts, ids):
        distinct = list(dict.fromkeys(a.strip() for a in answers.get(pid, []) if a.strip()))
        if len(distinct) < 2:
            skipped += 1
            continue
        pair = tuple(rng.sample(distinct, 2))
        kind = "safety" if prompt.is_safety else "helpfulness"
        comparisons.append(compare(prompt, pair, kind, batch, rng, world.config.annotator))
    rows = comparison_rows(comparisons, f"policy-b{batch:02d}", "policy")
    return pa.Table.from_pylist(rows, schema=PREFERENCES), skipped


def prebuilt_part(prebuilt: pa.Table, count: int, batch: int) -> pa.Table:
    """`count` rows of the prebuilt batch, drawn by a hash of their ids (kinds keep their shares on average)."""
    order = id_rank(prebuilt.column("id").to_pylist(), f"prebuilt-b{batch:02d}")
    return prebuilt.take(pa.array(sorted(order[:count]), pa.int64()))


def run_on_policy_batch(ctx: StageContext, batch: int, prebuilt: Table, policies: Sequence[PolicyState],
                        config: OnPolicyConfig) -> tuple[Table, dict]:
    """The mixed weekly batch `batch` as a cached stage of the round: the table and its counts. `policies` are the
    sizes, smallest first (an on-policy source names one by its index)."""
    world = ctx.data.world
    inputs = {"prebuilt": prebuilt.digest, "policies": digest_config([p.digest for p in policies])}
    stage, _ = table_stage(ctx.store, ctx.round, stage_name(batch), inputs,
                           {"config": asdict(config), "world_seed": world.config.seed,
                            "annotator": asdict(world.config.annotator)},
                           lambda stage, _: _make_batch(ctx, stage, batch, prebuilt.rows, policies, config),
                           "preferences")
    return Table(stage.read(), stage.manifest()["content_digest"]), stage.manifest()["extra"]


def _make_batch(ctx: StageContext, stage: StageStore, batch: int, table: pa.Table, policies: Sequence[PolicyState],
                config: OnPolicyConfig) -> dict[str, Any]:
    """run_on_policy_batch's work: the mixed batch as the stage's shard; its counts as the `extra`."""
    world, tokenizer = ctx.data.world, load_tokenizer(policies[-1].checkpoint)
    count = int(config.share * table.num_rows + 0.5)
    prompts = on_policy_prompts(world, batch, count)
    ids = [f"onpolicy-b{batch:02d}-{i:05d}" for i in range(len(prompts))]
    _, encoded = eval_prompts(tokenizer, pa.Table.from_pylist(prompt_rows(prompts, ids), schema=PROMPTS), "llama2")
    answers: dict[str, list[str]] = {}
    shards = [encoded.slice(start, ctx.shard_rows) for start in range(0, encoded.num_rows, ctx.shard_rows)]
    for j, source in enumerate(config.sources):
        sampling = stopping_at_eos(Sampling(n=source.n, temperature=source.temperature, max_tokens=config.max_tokens,
                                            seed=config.seed + 1000 * batch + j), tokenizer)
        policy = policies[source.policy]
        for samples in generate_shards(ctx.generators(policy), shards, sampling, ctx.round,
                                       f"{policy.name}-onpolicy"):
            for pid, response in zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist()):
                answers.setdefault(pid, []).append(response or "")
    pairs, skipped = pair_answers(prompts, answers, ids, batch, world)
    mixed = pa.concat_tables([pairs, prebuilt_part(table, table.num_rows - pairs.num_rows, batch)])
    ratings = pairs.column("rating").to_pylist()
    extra = {"batch": batch, "on_policy": pairs.num_rows, "prebuilt": mixed.num_rows - pairs.num_rows,
             "skipped_prompts": skipped, "ratings": {r: ratings.count(r) for r in sorted(set(ratings))}}
    stage.write_shard(0, mixed)
    return extra


def batch_makers(round_no: int, schedule: Sequence[int], on_policy: bool) -> list[tuple[int, int | None]]:
    """(batch, the round that made it, None for a prebuilt one) for every weekly batch rounds 1..round ingest;
    `schedule[r - 1]` is how many batches rounds 1..r ingest in all. Batch 1 seeds the RMs as prebuilt; with
    `on_policy`, batch b >= 2 is made by the round that first ingests it."""
    return [(b, next(r for r in range(1, round_no + 1) if schedule[r - 1] >= b) if on_policy and b > 1 else None)
            for b in range(1, schedule[round_no - 1] + 1)]


@dataclass
class Preferences:
    """The preference pairs a round's reward models train on: every weekly batch so far."""

    table: Table  # the batches concatenated, with a digest of theirs
    batches: int
    on_policy: list[dict]  # the counts of the on-policy batches this round made


def ingest(ctx: StageContext, policies: list[PolicyState], config: OnPolicyConfig,
           schedule: Sequence[int]) -> Preferences:
    """Every weekly batch rounds 1..ctx.round ingest: the prebuilt ones, and with the world and `config.share` > 0
    the mixed batches (this round's made from `policies`' answers, earlier rounds' read from their stages)."""
    tables, made = [], []
    for batch, maker in batch_makers(ctx.round, schedule, ctx.oracle and config.share > 0):
        prebuilt = ctx.data.weeks[batch - 1][1]
        if maker is None:
            tables.append(prebuilt)
        elif maker == ctx.round:
            table, counts = run_on_policy_batch(ctx, batch, prebuilt, policies, config)
            tables.append(table)
            made.append(counts)
        else:
            stage = ctx.store.stage(maker, stage_name(batch))
            tables.append(Table(stage.read(), stage.manifest()["content_digest"]))
    rows = pa.concat_tables([t.rows for t in tables])
    return Preferences(Table(rows, digest_config([t.digest for t in tables])), len(tables), made)
