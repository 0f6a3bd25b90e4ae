"""PPO on several trainer ranks (real Ray actors in one gloo process group): shares of uneven size, answers left
empty unevenly (a rank with none left at all), the critic-free estimators, and the sampler's old log-probabilities
(kept or replaced on every rank alike). Every rank must take the same number of gradient steps (or DDP hangs until
the group's timeout), end with the same weights, whiten with the statistics of the whole batch, and report the whole
batch's metrics."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from actors.pool import PoolConfig
from actors.trainer import RankContext, TrainerGroup
from model.ppo import logit
from model.checkpoint import load_checkpoint
from model.training import TrainConfig
from pipeline.stages.ppo.algorithm import PPOConfig, ppo_iteration, ppo_setup
from pipeline.stages.ppo.stage import split_rows
from test_ppo_stage import make_folders, row_logprobs

# world size -> (rows in the batch, rows whose answer is empty, mini_batch): the shares and steps per rank
#   2 ranks, 9 rows: rank 0 rows 0 2 4 6 8 (5 answers, 3 steps of 2), rank 1 rows 1 3 5 7 (3 empty: 1 step)
#   3 ranks, 8 rows: rank 0 rows 0 3 6 (3 answers, 3 steps of 1), rank 1 rows 1 4 7 (4 empty: 2 steps),
#                    rank 2 rows 2 5 (both empty: no answer at all, 3 placeholder steps)
LAYOUTS = {2: (9, {1, 3, 5}, 4), 3: (8, {2, 4, 5}, 3)}
STEPS = {2: 3, 3: 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("ppo-ranks"))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}-ranks")
def trainers(request, ray_session):
    # a short timeout: a rank left waiting in a collective fails the test in a minute, not at the default
    config = PoolConfig(f"ppo{request.param}", size=request.param, num_cpus=0.5, call_timeout_s=90,
                        start_timeout_s=90)
    with TrainerGroup(config) as group:
        yield group


def batch_table(rows: int, empty: set[int], samples_per_prompt: int = 1) -> pa.Table:
    answers = [[] if row in empty else [20 + row, 21 + row, 22 + row][:1 + row % 3] + [2] for row in range(rows)]
    rewards = [0.15 + 0.7 * ((row * 37) % 11) / 10 for row in range(rows)]
    return pa.table({"prompt_token_ids": [[1, 5 + row // samples_per_prompt] for row in range(rows)],
                     "token_ids": pa.array(answers, pa.list_(pa.int64())),
                     "logprobs": pa.array([[-1.0] * len(a) for a in answers], pa.list_(pa.float32())),
                     "r_help": rewards, "r_safe": [0.5] * rows, "r_combined": rewards,
                     "sample_index": [row % samples_per_prompt for row in range(rows)]})


def rank_state(ctx: RankContext, _payload: None) -> dict:
    """What must agree across the ranks after an update: weights, running moments, the optimizer's step count."""
    state = ctx.state

    def flat(model: torch.nn.Module) -> torch.Tensor:  # FSDP's shards gathered: every rank holds the whole
        return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().cpu()
                          for p in model.parameters()])

    return {"policy": flat(state["policy"]), "value": flat(state["value"]) if "value" in state else None,
            "moments": (state["moments"].count, state["moments"].mean, state["moments"].var),
            "optimizer_steps": state["policy_trainer"].schedule.last_epoch}


def setup_and_train(trainers: TrainerGroup, folders, config: PPOConfig, table: pa.Table, iterations: int):
    world = trainers.world_size
    critic = str(folders[1]) if config.needs_critic else None
    trainers.run(ppo_setup, [(str(folders[0]), critic, config)] * world)
    initial = trainers.run(rank_state, [None] * world)[0]["policy"]
    metrics = [trainers.run(ppo_iteration, split_rows(table, world, config.samples_per_prompt))
               for _ in range(iterations)]
    return initial, metrics, trainers.run(rank_state, [None] * world)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_uneven_shares_and_empty_answers_take_the_same_steps_on_every_rank(trainers, folders, parallel):
    """Under FSDP every forward gathers weights, so the no-gradient passes pair up too (a rank with fewer chunks
    runs extra ones): a rank left out would hang the group until its timeout."""
    world = trainers.world_size
    rows, empty, mini_batch = LAYOUTS[world]
    table = batch_table(rows, empty)
    config = PPOConfig(batch_size=rows, mini_batch=mini_batch, lr=1e-3, value_lr=1e-3, parallel=parallel)
    initial, metrics, states = setup_and_train(trainers, folders, config, table, iterations=2)

    # it finished (no rank waited on the others' extra steps), and every rank took the same steps
    for per_rank in metrics:
        assert [m["steps"] for m in per_rank] == [STEPS[world]] * world
        assert all(m == per_rank[0] for m in per_rank)  # the whole batch's numbers, on every rank
        assert per_rank[0]["sampler_logprobs"] == 0.0  # the table's made-up -1.0s: every rank took the trainer's
    assert [s["optimizer_steps"] for s in states] == [2 * STEPS[world]] * world
    # one set of weights: DDP averaged every step's gradients, the placeholder steps included
    for state in states[1:]:
        assert torch.equal(state["policy"], states[0]["policy"]) and torch.equal(state["value"], states[0]["value"])
    assert not torch.equal(states[0]["policy"], initial)

    kept = [row for row in range(rows) if row not in empty]
    answers = table.column("token_ids").to_pylist()
    last = metrics[-1][0]
    assert last["empty_answers"] == len(empty)
    assert last["answer_length"] == pytest.approx(sum(len(answers[row]) for row in kept) / len(kept))
    assert last["r_combined"] == pytest.approx(sum(table.column("r_combined").to_pylist()) / rows, rel=1e-6)
    # whitening statistics of every rank's scores (the batch seen twice), the same on every rank
    scores = logit(torch.tensor([table.column("r_combined")[row].as_py() for row in kept])).double()
    for count, mean, var in (s["moments"] for s in states):
        assert count == 2 * len(kept)
        assert mean == pytest.approx(scores.mean().item(), rel=1e-6)
        assert var == pytest.approx(scores.var(unbiased=False).item(), rel=1e-5)


def test_grpo_on_ranks_keeps_each_prompts_answers_together_and_has_no_critic(trainers, folders):
    world = trainers.world_size
    prompts, samples = world + 1, 2  # one rank gets two prompts, the others one
    rows = prompts * samples
    table = batch_table(rows, {1}, samples)  # prompt 0 has one answer left: alone in its group, advantage 0
    config = PPOConfig(batch_size=prompts, samples_per_prompt=samples, mini_batch=world, lr=1e-3, advantage="grpo")
    initial, metrics, states = setup_and_train(trainers, folders, config, table, iterations=1)

    per_rank = metrics[0]
    assert all(m == per_rank[0] for m in per_rank) and per_rank[0]["value_loss"] == 0.0
    # rank 0 holds prompts 0 and `world`: 3 answers (one empty), one a step; the others 2 answers
    assert per_rank[0]["steps"] == 3
    assert all(s["value"] is None for s in states)  # no value model was built on any rank
    for state in states[1:]:
        assert torch.equal(state["policy"], states[0]["policy"])
    assert not torch.equal(states[0]["policy"], initial)


def test_sampler_logprobs_within_the_tolerance_are_kept_on_every_rank(trainers, folders):
    world = trainers.world_size
    rows, empty, mini_batch = LAYOUTS[world]
    table = batch_table(rows, empty)
    policy = load_checkpoint(folders[0])
    exact = [row_logprobs(policy, prompt, answer) if answer else [] for prompt, answer in
             zip(table.column("prompt_token_ids").to_pylist(), table.column("token_ids").to_pylist())]
    table = table.set_column(table.schema.get_field_index("logprobs"), "logprobs",
                             pa.array(exact, pa.list_(pa.float32())))
    config = PPOConfig(batch_size=rows, mini_batch=mini_batch, lr=1e-3, value_lr=1e-3)
    initial, metrics, states = setup_and_train(trainers, folders, config, table, iterations=1)

    per_rank = metrics[0]
    assert all(m == per_rank[0] for m in per_rank)  # one decision, taken on every rank's first mini-batch
    assert per_rank[0]["sampler_logprobs"] == 1.0 and per_rank[0]["logprob_mismatch"] < 1e-4
    for state in states[1:]:
        assert torch.equal(state["policy"], states[0]["policy"])
    assert not torch.equal(states[0]["policy"], initial)


@pytest.mark.parametrize("micro_batch", [0, 1])
def test_ppo_on_fsdp_ranks_equals_ppo_in_one_process(trainers, folders, micro_batch):
    """One gradient step per iteration over the whole batch (an empty answer included): the policy and the critic,
    sharded over the ranks, end where one process ends, to float rounding; also with one answer per forward on the
    ranks (gradients accumulated, as many forwards on every rank)."""
    world = trainers.world_size
    rows = 4 * world  # a step's share per rank covers the rank's rows: one step on every rank and in one process
    table = batch_table(rows, {3})
    config = PPOConfig(batch_size=rows, mini_batch=rows, lr=1e-3, value_lr=1e-3, parallel="fsdp",
                       train=TrainConfig(micro_batch=micro_batch))
    _, _, states = setup_and_train(trainers, folders, config, table, iterations=2)
    one = RankContext(0, 1, torch.device("cpu"), "gloo")
    ppo_setup(one, (str(folders[0]), str(folders[1]), dataclasses.replace(config, parallel="ddp", train=TrainConfig())))
    for _ in range(2):
        ppo_iteration(one, split_rows(table, 1)[0])
    expected = rank_state(one, None)
    for state in states:
        for model in ("policy", "value"):
            assert (state[model] - expected[model]).abs().max().item() < 1e-5, (world, model)
