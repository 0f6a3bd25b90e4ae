"""A PPO stage killed after a save resumes from it (`ppo.train.save_every`): real pools (a vLLM generator, the
scorer, 2 FSDP trainer ranks), and the resumed stage's policy equals an uninterrupted run's, bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from actors.pool import PoolConfig
from actors.vllm_engine import Sampling
from conftest import tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.tokenizer import SentencePieceTokenizer
from model.training import TrainConfig
from pipeline.cluster.pools import ClusterConfig, Pools
from pipeline.data.store import RunStore
from pipeline.stages.cached import TRAIN_STATE_DIR, checkpoint_stage, training_recipe
from pipeline.stages.context import RewardModels, RunData, StageContext, Table
from pipeline.stages.ppo import stage as ppo
from pipeline.stages.ppo.algorithm import PPOConfig
from pipeline.stages.ppo.stage import run_ppo_loop
from pipeline.state import PolicyState

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

WORDS = "the a cat dog sat on mat ran fast red blue big small house tree sun moon star one two three".split()
TIMING = ("generate_s", "score_s", "train_s", "sync_s", "update_s")


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """A policy vLLM's CPU attention serves (head_dim 32) with its tokenizer, a reward model from it, prompts, and
    the pools (one generator, one scorer, two trainer ranks)."""
    root = tmp_path_factory.mktemp("ppo-resume")
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)], vocab_size=300)
    model = tiny_model(seed=2, vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    policy = save_checkpoint(model, root / "policy", tokenizer=tokenizer)
    rm = save_checkpoint(load_checkpoint(policy, head="reward", seed=1), root / "rm", tokenizer=tokenizer)
    prompts = pa.table({"id": [f"p{i}" for i in range(12)],
                        "prompt_token_ids": pa.array([[tokenizer.bos_id, *tokenizer.encode(" ".join(rng.choices(
                            WORDS, k=4)))] for _ in range(12)], pa.list_(pa.int32())),
                        "is_safety": [i % 2 == 1 for i in range(12)]})
    cluster = ClusterConfig(generator=PoolConfig("ppo-gen", size=1, num_cpus=1),
                            scorer=PoolConfig("ppo-score", size=1, num_cpus=0.5),
                            trainer=PoolConfig("ppo-train", size=2, num_cpus=0.5, call_timeout_s=300))
    with Pools(cluster) as pools:
        yield policy, rm, prompts, pools, tokenizer.eos_id


def ppo_stage(store: RunStore, world, config: PPOConfig):
    policy, rm, prompts, pools, eos = world

    data = RunData(Table(prompts, "p"), Table(prompts, "p"), [], world=None)
    ctx = StageContext(store, 1, pools, data, Sampling(), 64, RewardModels(rm, rm, "rms", {}))

    def train(out: Path) -> dict:
        return run_ppo_loop(ctx, PolicyState("policy", policy, "p", 128), (prompts.slice(4), prompts.slice(0, 4)),
                            config, out, (eos,))
    return checkpoint_stage(store, 1, "ppo", {"policy": "p"}, training_recipe(config), train)


def test_a_killed_ppo_stage_resumes_from_its_save_bit_identical(world, tmp_path, monkeypatch):
    config = PPOConfig(iterations=4, batch_size=4, mini_batch=4, max_tokens=8, eval_every=2, patience=5,
                       heldout_prompts=4, lr=1e-3, value_lr=1e-3, parallel="fsdp", train=TrainConfig(save_every=2))
    whole, expected, _ = ppo_stage(RunStore(tmp_path / "whole"), world, config)

    store = RunStore(tmp_path / "killed")
    record = ppo.record_ppo

    def die_at_three(iteration, row, round=None):  # noqa: A002 - record_ppo's own signature
        if iteration == 3:
            raise Killed
        record(iteration, row, round)

    monkeypatch.setattr(ppo, "record_ppo", die_at_three)
    with pytest.raises(Killed):
        ppo_stage(store, world, config)
    monkeypatch.setattr(ppo, "record_ppo", record)
    state = store.stage(1, "ppo").path / TRAIN_STATE_DIR
    assert (state / "best" / "config.json").is_file() and (state / "policy").is_dir() and (state / "value").is_dir()

    folder, metrics, cached = ppo_stage(store, world, config)
    assert not cached and not state.exists()

    def untimed(m: dict) -> dict:
        return {**m, "iterations": [{k: v for k, v in row.items() if k not in TIMING} for row in m["iterations"]]}

    assert untimed(metrics) == untimed(expected)
    assert [row["iteration"] for row in metrics["iterations"]] == [1, 2, 3, 4]
    got, want = load_checkpoint(folder).state_dict(), load_checkpoint(whole).state_dict()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_save_every_does_not_change_the_stage_digest():
    assert training_recipe(PPOConfig(train=TrainConfig(save_every=3))) == training_recipe(PPOConfig())
    assert training_recipe(PPOConfig(parallel="fsdp")) != training_recipe(PPOConfig())
