"""Every generator busy: stages hand all their prompt shards to the generator pool at once (cut into
pieces when there are fewer shards than actors) and still write their shards one by one, in shard order.

The first tests use a stand-in pool (no Ray); the others real Ray actors and real vLLM engines on a tiny policy:
a one-actor pool (the CPU default) for the reference rows, a two-actor pool that must give the same rows with both
actors sampling at once, also when one of them is SIGKILLed mid-stage, and a stage killed in the driver that
resumes with no row lost or written twice.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from actors.generator import Generator
from actors.pool import Pool, PoolActor, PoolConfig
from actors.scorer import Scorer
from actors.vllm_engine import EngineConfig, Sampling
from conftest import tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.tokenizer import SentencePieceTokenizer, load_tokenizer
from bench.common import GivenPools, stage_context
from pipeline.stages.generation import ShardAssembler, generate_shards, generate_table, pieces_per_shard, split_evenly
from pipeline.stages.ppo.stage import split_rows
from pipeline.stages.rejection_sampling.stage import sample_and_score
from pipeline.state import PolicyState

WORDS = "the a cat dog sat on mat ran fast slow red blue green big small house tree river sun moon star".split()
PROMPTS, SHARD_ROWS, N = 18, 3, 2  # six prompt shards: more than the two actors, so each takes several
SAMPLING = Sampling(n=N, temperature=1.0, max_tokens=16, seed=4)


def numbered(rows: int) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(rows)]})


# --- the cutting and the ordering, on a stand-in pool ------------------------------------------------------------

@dataclass
class _Config:
    size: int
    name: str = "stand-in"


class StandInPool:
    """`map_shards("generate", ...)` that answers each piece with its own rows and reports them in reverse order
    (the last piece first), keeping the pieces it was given."""

    def __init__(self, size: int):
        self.config = _Config(size)
        self.pieces: list[pa.Table] = []

    def map_shards(self, method, pieces, *args, on_result=None, keep_results=True):
        assert method == "generate" and not keep_results  # the assembler keeps what it needs
        self.pieces = list(pieces)
        for index in reversed(range(len(pieces))):
            on_result(index, pieces[index])
        return self.pieces


def test_split_evenly_keeps_row_order_and_balances_lengths():
    table = numbered(10)
    slices = split_evenly(table, 4)
    assert [s.num_rows for s in slices] == [3, 3, 2, 2]
    assert pa.concat_tables(slices).equals(table)
    assert [s.num_rows for s in split_evenly(numbered(2), 4)] == [1, 1]  # never an empty piece
    assert [s.num_rows for s in split_evenly(numbered(0), 3)] == [0]
    with pytest.raises(ValueError, match="at least 1"):
        split_evenly(table, 0)


@pytest.mark.parametrize("shards, actors, pieces", [(1, 1, 1), (6, 1, 1), (1, 4, 4), (2, 4, 2), (3, 4, 2),
                                                    (4, 4, 1), (9, 4, 1), (0, 4, 1)])
def test_shards_are_cut_only_when_there_are_fewer_than_actors(shards, actors, pieces):
    assert pieces_per_shard(shards, actors) == pieces


def test_the_assembler_hands_on_whole_shards_in_shard_order_whatever_the_arrival_order():
    handed: list[tuple[int, list[str]]] = []
    assembler = ShardAssembler([2, 1, 2], lambda shard, rows: handed.append((shard, rows.column("id").to_pylist())))
    pieces = split_evenly(numbered(2), 2) + [numbered(1)] + split_evenly(numbered(4), 2)
    for index in (4, 2, 1, 3):  # shard 2 is complete first, shard 0 not yet: nothing handed on
        assembler.add(index, pieces[index])
    assert handed == [] and not assembler.done
    assembler.add(0, pieces[0])  # now shards 0, 1 and 2, in that order
    assert handed == [(0, ["p0", "p1"]), (1, ["p0"]), (2, ["p0", "p1", "p2", "p3"])] and assembler.done
    with pytest.raises(RuntimeError, match="twice"):
        assembler.add(0, pieces[0])


def test_a_table_is_cut_into_one_piece_per_actor_and_joined_back_in_row_order():
    pool = StandInPool(size=3)
    table = numbered(8)
    assert generate_table(pool, table, SAMPLING, 1, "ppo").equals(table)
    assert [p.num_rows for p in pool.pieces] == [3, 3, 2]


def test_a_pool_of_one_actor_gets_every_shard_uncut_and_hands_them_on_in_order():
    pool = StandInPool(size=1)
    shards = [numbered(3), numbered(2)]
    handed = []
    results = generate_shards(pool, shards, SAMPLING, 1, "rs", on_shard=lambda i, samples: handed.append(i))
    assert all(piece is shard for piece, shard in zip(pool.pieces, shards, strict=True))  # as one call per shard
    assert handed == [0, 1] and all(r is s for r, s in zip(results, shards, strict=True))


# --- the pool, with light actors -----------------------------------------------------------------------------

class Sleeper(PoolActor):
    def work(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_results_that_end_while_the_driver_is_busy_are_not_taken_for_hangs(ray_session):
    """call_timeout_s=2: the first shard back keeps the driver busy 3 s (a stage scoring and writing it); the two
    other shards end meanwhile, within their timeout, and must count as done, not be killed at their deadline."""
    config = PoolConfig("sleepers", size=3, num_cpus=0.1, call_timeout_s=2.0, start_timeout_s=30)
    with Pool(Sleeper, config) as pool:
        taken = []

        def busy_driver(index: int, result: float) -> None:
            taken.append(result)
            if index == 0:
                time.sleep(3)

        assert pool.map_shards("work", [0.1, 0.5, 0.5], on_result=busy_driver, keep_results=False) == [None] * 3
        assert sorted(taken) == [0.1, 0.5, 0.5] and pool.failures == []


# --- real generators ---------------------------------------------------------------------------------------------

class BusyGenerator(Generator):
    """A generator that records each generate call (pid, start, end) and can be armed to SIGKILL itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, float, float]] = []
        self.kill_at: int | None = None  # the number of the generate call that kills this process

    def generate(self, prompts, *args):
        if self.kill_at is not None and len(self.calls) + 1 >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # as an OOM kill would: mid-call, nothing cleaned up
        start = time.time()
        samples = super().generate(prompts, *args)
        self.calls.append((os.getpid(), start, time.time()))
        return samples

    def arm_kill(self, calls_from_now: int) -> None:
        """SIGKILL at the start of the `calls_from_now`-th generate call from now (Ray restarts it unarmed)."""
        self.kill_at = len(self.calls) + calls_from_now

    def served(self) -> list[tuple[int, float, float]]:
        return self.calls


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("busy")
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train(
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)], vocab_size=320)
    policy = tiny_model(seed=5, vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.no_grad():  # larger weights: samples that are not one token repeated
        for p in policy.parameters():
            p.mul_(5)
    dirs = {"policy": save_checkpoint(policy, root / "policy", tokenizer=tokenizer)}
    for seed, kind in enumerate(("rm_help", "rm_safe"), start=1):
        dirs[kind] = save_checkpoint(load_checkpoint(dirs["policy"], head="reward", seed=seed), root / kind)
    return dirs


@pytest.fixture(scope="module")
def prompts(folders) -> pa.Table:
    tokenizer = load_tokenizer(folders["policy"])
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + " ?" for _ in range(PROMPTS)]
    return pa.table({
        "id": [f"q{i}" for i in range(PROMPTS)],
        "prompt_token_ids": pa.array([[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts], pa.list_(pa.int32())),
        "is_safety": [i % 3 == 0 for i in range(PROMPTS)],
    })


class DriverKilled(Exception):
    """Stands for the driver's death in the middle of a stage."""


class CrashingScorer:
    """The scorer pool, but the driver 'dies' at the score call after `calls` of them: the stage stops with some
    shards written."""

    def __init__(self, pool: Pool, calls: int):
        self.pool, self.calls = pool, calls

    def map_shards(self, method, shards, *args, **kwargs):
        if self.calls == 0:
            raise DriverKilled("the driver died mid-stage")
        self.calls -= 1
        return self.pool.map_shards(method, shards, *args, **kwargs)


def generator_pool(folders, name: str, size: int) -> Pool:
    config = PoolConfig(name, size=size, num_cpus=1, call_timeout_s=120, start_timeout_s=600, max_restarts=1)
    return Pool(BusyGenerator, config, str(folders["policy"]), EngineConfig(max_model_len=256))


@pytest.fixture(scope="module")
def scorer(ray_session, folders):
    config = PoolConfig("busy-score", size=1, num_cpus=0.5, call_timeout_s=120, start_timeout_s=300)
    with Pool(Scorer, config, str(folders["rm_help"]), str(folders["rm_safe"]), max_batch_tokens=256) as pool:
        yield pool


def rejection_samples(root: Path, prompts: pa.Table, generators: Pool, scorer: Pool | CrashingScorer) -> pa.Table:
    """The rejection-sampling stage's scored samples (`rs_samples`) of `prompts`, six shards, in a store at root."""
    ctx = stage_context(root, GivenPools(generators, scorer), shard_rows=SHARD_ROWS)
    return sample_and_score(ctx, "rs_samples", {"prompts": "busy"}, prompts, SAMPLING,
                            (PolicyState("policy", root, "p", 256), "policy"))


@pytest.fixture(scope="module")
def one_actor(ray_session, folders, prompts, scorer, tmp_path_factory) -> dict[str, pa.Table]:
    """What the one-actor pool (the CPU default) samples: the stage's rows and the PPO batch's; the pool is gone
    before the two-actor one starts (each engine takes ~2 GB)."""
    with generator_pool(folders, "busy-one", 1) as pool:
        return {"stage": rejection_samples(tmp_path_factory.mktemp("one"), prompts, pool, scorer),
                "batch": generate_table(pool, prompts, SAMPLING, 3, "ppo")}


@pytest.fixture(scope="module")
def two_actors(ray_session, folders, one_actor):
    with generator_pool(folders, "busy-two", 2) as pool:
        yield pool


def served_since(pool: Pool, before: list[list]) -> list[list[tuple[int, float, float]]]:
    return [calls[len(old):] for calls, old in zip(pool.broadcast("served"), before, strict=True)]


def overlap(a: list[tuple[int, float, float]], b: list[tuple[int, float, float]]) -> bool:
    return any(s1 < e2 and s2 < e1 for _, s1, e1 in a for _, s2, e2 in b)


def each_sample_once(table: pa.Table) -> bool:
    keys = Counter(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist()))
    return len(keys) == PROMPTS * N and set(keys.values()) == {1}


@pytest.mark.vllm
def test_two_generators_sample_one_stage_at_once_with_the_one_generator_rows(two_actors, scorer, one_actor, prompts,
                                                                            tmp_path):
    before = two_actors.broadcast("served")
    table = rejection_samples(tmp_path / "two", prompts, two_actors, scorer)
    first, second = served_since(two_actors, before)
    print(f"stage calls per actor: {len(first)}, {len(second)}")
    assert first and second and overlap(first, second)  # both actors sampled, at the same time
    assert len(first) + len(second) == PROMPTS // SHARD_ROWS  # six shards: none cut, none twice
    assert table.equals(one_actor["stage"]) and each_sample_once(table)

    # PPO's batch: one table cut into a piece per actor, joined back in prompt order: the one-actor samples
    before = two_actors.broadcast("served")
    batch = generate_table(two_actors, prompts, SAMPLING, 3, "ppo")
    first, second = served_since(two_actors, before)
    assert len(first) == len(second) == 1 and overlap(first, second)
    assert batch.equals(one_actor["batch"])
    assert [len(share["group"]) for share in split_rows(batch, 2, N)] == [PROMPTS * N // 2] * 2


@pytest.mark.vllm
def test_a_generator_killed_mid_stage_leaves_the_rows_exact(two_actors, scorer, one_actor, prompts, tmp_path):
    """busy-two-0 SIGKILLs itself at the start of its second shard (the first is back): the pool retries that
    shard on busy-two-1 (or on the restarted busy-two-0); every row once, the one-actor run's rows."""
    pids = {h.name: h.pid for h in two_actors.health()}
    failures_before = len(two_actors.failures)
    two_actors.call(0, "arm_kill", 2)
    table = rejection_samples(tmp_path / "killed", prompts, two_actors, scorer)
    failures = two_actors.failures[failures_before:]
    print(f"failures: {failures}")
    assert any(f.actor == "busy-two-0" and f.shard is not None and f.cause.startswith("actor died") for f in failures)
    assert table.equals(one_actor["stage"]) and each_sample_once(table)
    after = {h.name: h for h in two_actors.health()}  # waits for the restart
    assert after["busy-two-0"].pid != pids["busy-two-0"] and after["busy-two-0"].state == "ready"


@pytest.mark.vllm
def test_a_stage_killed_in_the_driver_resumes_with_no_row_lost_or_written_twice(two_actors, scorer, one_actor,
                                                                                 prompts, tmp_path):
    """The driver dies at the third shard's scoring (both actors busy on later shards meanwhile): shards 0 and 1
    are written, nothing else; the rerun samples only the four missing shards and gives the one-actor rows."""
    store = tmp_path / "resumed"
    with pytest.raises(DriverKilled):
        rejection_samples(store, prompts, two_actors, CrashingScorer(scorer, 2))
    written = sorted(p.name for p in (store / "round-01" / "rs_samples").glob("part-*.parquet"))
    assert written == ["part-00000.parquet", "part-00001.parquet"]  # in shard order: a prefix
    before = two_actors.broadcast("served")
    table = rejection_samples(store, prompts, two_actors, scorer)
    assert sum(len(calls) for calls in served_since(two_actors, before)) == 4  # only the four missing shards
    assert table.equals(one_actor["stage"]) and each_sample_once(table)
