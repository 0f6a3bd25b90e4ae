"""On-policy weekly batches (docs/paper.md, "Weekly preference batches": each new batch is sampled from the latest
models and rated): from batch 2 on, `share` of a weekly batch is pairs of two answers of the latest policies to one
fresh training prompt, rated by the world's annotator (its noise, the paper's rating scale); the rest, and all of
batch 1, are the world's prebuilt pairs. The RMs so learn to rank answers of the policy's own form
(docs/results.md, "On-policy weekly batches").

Stage `policy_preferences_bNN` in the round that ingests batch NN: inputs are the sampling policies and the
prebuilt batch; the table is the whole mixed batch (PREFERENCES, the prebuilt rows marked by `source`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from actors.pool import Pool
from actors.vllm_engine import Sampling
from model.tokenizer import Tokenizer
from pipeline.data.schemas import PREFERENCES, PROMPTS
from pipeline.data.store import RunStore, StageStore, digest_config
from pipeline.stages.cached import table_stage
from pipeline.stages.generation import generate_shards
from pipeline.stages.oracle_eval import eval_prompts, stopping_at_eos
from pipeline.stages.reward_model.algorithm import id_rank
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
    max_tokens: int = 48
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


def run_on_policy_batch(store: RunStore, round: int, batch: int, prebuilt: tuple[pa.Table, str],  # noqa: A002
                        policies: Sequence[tuple[str, str]], tokenizer: Tokenizer, world: World,
                        config: OnPolicyConfig, generators: Callable[[int], Pool],
                        shard_rows: int) -> tuple[pa.Table, str, dict]:
    """The mixed weekly batch `batch` as a cached stage of `round`: (table, content digest, counts).
    `policies` are the sizes' (name, digest), smallest first; `generators(i)` serves size i."""
    table, prebuilt_digest = prebuilt
    inputs = {"prebuilt": prebuilt_digest, "policies": digest_config([d for _, d in policies])}
    stage, _ = table_stage(store, round, stage_name(batch), inputs,
                           {"config": asdict(config), "world_seed": world.config.seed,
                            "annotator": asdict(world.config.annotator)},
                           lambda stage, _: _make_batch(stage, round, batch, table, policies, tokenizer, world,
                                                        config, generators, shard_rows), "preferences")
    return stage.read(), stage.manifest()["content_digest"], stage.manifest()["extra"]


def _make_batch(stage: StageStore, round: int, batch: int, table: pa.Table,  # noqa: A002
                policies: Sequence[tuple[str, str]], tokenizer: Tokenizer, world: World, config: OnPolicyConfig,
                generators: Callable[[int], Pool], shard_rows: int) -> dict[str, Any]:
    """run_on_policy_batch's work: the mixed batch as the stage's shard; its counts as the `extra`."""
    count = int(config.share * table.num_rows + 0.5)
    prompts = on_policy_prompts(world, batch, count)
    ids = [f"onpolicy-b{batch:02d}-{i:05d}" for i in range(len(prompts))]
    _, encoded = eval_prompts(tokenizer, pa.Table.from_pylist(prompt_rows(prompts, ids), schema=PROMPTS), "llama2")
    answers: dict[str, list[str]] = {}
    shards = [encoded.slice(start, shard_rows) for start in range(0, encoded.num_rows, shard_rows)]
    for j, source in enumerate(config.sources):
        sampling = stopping_at_eos(Sampling(n=source.n, temperature=source.temperature, max_tokens=config.max_tokens,
                                            seed=config.seed + 1000 * batch + j), tokenizer)
        name = policies[source.policy][0]
        for samples in generate_shards(generators(source.policy), shards, sampling, round, f"{name}-onpolicy"):
            for pid, response in zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist()):
                answers.setdefault(pid, []).append(response or "")
    pairs, skipped = pair_answers(prompts, answers, ids, batch, world)
    mixed = pa.concat_tables([pairs, prebuilt_part(table, table.num_rows - pairs.num_rows, batch)])
    ratings = pairs.column("rating").to_pylist()
    extra = {"batch": batch, "on_policy": pairs.num_rows, "prebuilt": mixed.num_rows - pairs.num_rows,
             "skipped_prompts": skipped, "ratings": {r: ratings.count(r) for r in sorted(set(ratings))}}
    stage.write_shard(0, mixed)
    return extra


def ingest(store: RunStore, round: int, weeks: Sequence[tuple[str, pa.Table, str]],  # noqa: A002
           batches_through: Callable[[int], int], run_batch: Callable[[int], tuple[pa.Table, str]] | None
           ) -> list[tuple[str, pa.Table, str]]:
    """(name, table, digest) of every weekly batch rounds 1..round ingest: batch 1 and, without `run_batch` (no
    world, or share 0), every batch as prebuilt; otherwise batch b >= 2 is the mixed batch of the round that first
    ingested it (this round's made by `run_batch(b)`, earlier rounds' read from their stage)."""
    out = []
    for b in range(1, batches_through(round) + 1):
        name, prebuilt, digest = weeks[b - 1]
        if b == 1 or run_batch is None:
            out.append((name, prebuilt, digest))
            continue
        first = next(r for r in range(1, round + 1) if batches_through(r) >= b)
        if first == round:
            table, digest = run_batch(b)
        else:
            stage = store.stage(first, stage_name(b))
            table, digest = stage.read(), stage.manifest()["content_digest"]
        out.append((name, table, digest))
    return out
