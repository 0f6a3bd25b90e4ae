"""The pipeline's custom metrics (actors/metrics.py) on Ray's metrics export endpoint, scraped over HTTP.

One scored shard on a real scorer actor (tiny RMs), one run on a two-rank trainer group and the driver-side
helpers; then the node's endpoint is polled until every series is there (Ray exports every few seconds) and each
test checks its part. The pools stay up until the scrape: an actor's last values leave the process only with its
next export. No vLLM engine starts here: the generators' metrics are checked on the real vLLM generator pool of
tests/test_actors_pipeline.py (test_generators_report_tokens_and_rate_to_ray_metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest

from actors.metrics import METRICS, trained_tokens
from actors.pool import Pool, PoolConfig
from actors.scorer import Scorer
from actors.trainer import RankContext, TrainerGroup, _loop_name
from conftest import tiny_model
from metrics_helpers import find, one, wait_for
from model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data.schemas import SAMPLES


def report_tokens(ctx: RankContext, payload: dict) -> dict:
    """A training loop's result as SFT reports it: this rank's answer tokens and training seconds."""
    return {"answer_tokens": payload["tokens"], "seconds": payload["seconds"], "rank": ctx.rank}


def samples_table() -> pa.Table:
    """Six unscored SAMPLES rows (3 prompts x 2 answers, ids in the tiny RMs' vocabulary), round 2."""
    prompts = {"a": ([1, 5, 6, 7], False), "b": ([1, 8, 9], True), "c": ([1, 10, 11, 12, 13], False)}
    rows = [dict(prompt_id=pid, round=2, sampler="metrics-test", temperature=1.0, sample_index=k, is_safety=safe,
                 prompt_token_ids=ids, response=f"answer {k}", token_ids=[20 + k, 30 + k, 40 + k],
                 logprobs=[-1.0] * 3, finish_reason="length")
            for pid, (ids, safe) in prompts.items() for k in range(2)]
    return pa.Table.from_pylist(rows, schema=SAMPLES)


SCORER = dict(pool="metrics-scorer", actor="metrics-scorer-0", round="2", sampler="metrics-test")
TRAIN = dict(pool="metrics-train", actor="metrics-train-0", loop="report_tokens")
STAGE = dict(stage="metrics-test", round="2")
PPO_ROUND = dict(round="7")

# (exported name, labels) that must all be on the endpoint before the tests look
EXPECTED = [
    ("ray_llama2_scored_samples_total", SCORER),
    *[("ray_llama2_reward_mean", {**SCORER, "reward": r}) for r in ("r_help", "r_safe", "r_combined")],
    ("ray_llama2_trained_tokens_total", TRAIN),
    ("ray_llama2_training_tokens_per_second", TRAIN),
    ("ray_llama2_stage_progress", STAGE),
    ("ray_llama2_stage_shards_done", STAGE),
    ("ray_llama2_stage_shards", STAGE),
    ("ray_llama2_ppo_iteration", PPO_ROUND),
    ("ray_llama2_ppo_kl", PPO_ROUND),
    ("ray_llama2_ppo_reward_mean", {**PPO_ROUND, "reward": "r_combined"}),
    ("ray_llama2_ppo_stat", {**PPO_ROUND, "stat": "approx_kl"}),
]


@pytest.fixture(scope="module")
def exported(ray_session, tmp_path_factory):
    """Every kind of update but generation once, then the endpoint polled until EXPECTED is there:
    (series, what was sent)."""
    from actors.metrics import record_ppo, record_stage_progress

    root = tmp_path_factory.mktemp("metrics")
    policy = save_checkpoint(tiny_model(seed=5), root / "policy")
    rm = {kind: save_checkpoint(load_checkpoint(policy, head="reward", seed=seed), root / kind)
          for seed, kind in enumerate(("help", "safe"), start=1)}
    small = dict(num_cpus=0.5, call_timeout_s=120, start_timeout_s=120)
    with (Pool(Scorer, PoolConfig("metrics-scorer", **small), str(rm["help"]), str(rm["safe"])) as scorers,
          TrainerGroup(PoolConfig("metrics-train", size=2, **small)) as trainers):
        [scored] = scorers.map_shards("score", [samples_table()])
        trainers.run(report_tokens, [dict(tokens=30, seconds=0.5), dict(tokens=31, seconds=0.6)])
        record_stage_progress("metrics-test", 2, done=1, total=4)
        record_ppo(3, {"kl": 0.25, "approx_kl": 0.01, "r_combined": 0.6, "r_help": 0.7, "r_safe": 0.8,
                       "empty_answers": 0, "note": "not a number"}, round_no=7)
        series = wait_for(EXPECTED)
    yield series, {"scored": scored}


def test_scorer_reports_samples_and_mean_rewards_per_shard(exported):
    series, sent = exported
    scored = sent["scored"]
    assert one(series, "ray_llama2_scored_samples_total", **SCORER) == scored.num_rows == 6
    for reward in ("r_help", "r_safe", "r_combined"):
        values = scored.column(reward).to_pylist()
        assert one(series, "ray_llama2_reward_mean", **SCORER, reward=reward) == pytest.approx(
            sum(values) / len(values), abs=1e-6)


def test_trainer_rank0_reports_the_groups_tokens(exported):
    series, _ = exported
    # rank 0 reported 30 answer tokens in 0.5 s; two ranks train equal shares
    assert one(series, "ray_llama2_trained_tokens_total", **TRAIN) == 60
    assert one(series, "ray_llama2_training_tokens_per_second", **TRAIN) == pytest.approx(120)
    assert not find(series, "ray_llama2_trained_tokens_total", actor="metrics-train-1")


def test_driver_reports_stage_progress_and_ppo(exported):
    series, _ = exported
    assert one(series, "ray_llama2_stage_progress", **STAGE) == 0.25
    assert (one(series, "ray_llama2_stage_shards_done", **STAGE), one(series, "ray_llama2_stage_shards",
                                                                       **STAGE)) == (1, 4)
    assert one(series, "ray_llama2_ppo_iteration", **PPO_ROUND) == 3
    assert one(series, "ray_llama2_ppo_kl", **PPO_ROUND) == 0.25
    assert {r: one(series, "ray_llama2_ppo_reward_mean", **PPO_ROUND, reward=r)
            for r in ("r_help", "r_safe", "r_combined")} == {"r_help": 0.7, "r_safe": 0.8, "r_combined": 0.6}
    assert one(series, "ray_llama2_ppo_stat", **PPO_ROUND, stat="approx_kl") == 0.01
    assert one(series, "ray_llama2_ppo_stat", **PPO_ROUND, stat="empty_answers") == 0
    assert not find(series, "ray_llama2_ppo_stat", stat="note") and not find(series, "ray_llama2_ppo_stat",
                                                                              stat="kl")


def test_every_series_carries_its_declared_tags(exported):
    series, _ = exported
    for s in series:
        base = s.name.removeprefix("ray_")
        if base not in METRICS:  # counters are exported with a _total suffix
            base = base.removesuffix("_total")
            assert METRICS.get(base, ("?",))[0] == "counter", s.name
        declared = set(METRICS[base][2])
        assert declared <= set(s.labels), (s.name, s.labels)


def test_metric_names_are_prefixed_and_valid():
    for name, (kind, description, tags) in METRICS.items():
        assert name.startswith("llama2_") and name.replace("_", "").isalnum() and description
        assert kind in ("counter", "gauge") and tags


@pytest.mark.parametrize("result, world, expected", [
    ({"answer_tokens": 10, "seconds": 2.0}, 2, (20, 2.0)),  # SFT: this rank's tokens
    ({"tokens": 7}, 3, (21, None)),
    ({"pairs": 100, "seconds": 1.0}, 2, None),  # reward models report pairs, not tokens
    ([{"train_tokens": 50, "seconds": 1.0}, {"train_tokens": 30, "seconds": 3.0}], 2, (80, 4.0)),  # the group's
    ([{"pairs": 1}], 1, None),
    (None, 1, None),
    ({"tokens": True}, 1, None),
])
def test_trained_tokens_reads_what_loops_report(result, world, expected):
    assert trained_tokens(result, world) == expected


def test_trained_tokens_reads_attributes():
    @dataclass
    class Result:
        train_tokens: int
        seconds: float

    assert trained_tokens(Result(12, 0.5), 4) == (12, 0.5)


def test_loop_name_sees_through_a_call_on_rank():
    from pipeline.cluster.pools import CallOnRank

    assert _loop_name(report_tokens) == "report_tokens"
    assert _loop_name(CallOnRank(report_tokens)) == "report_tokens"
