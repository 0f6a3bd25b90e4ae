"""The trainer group on real Ray: two ranks in one gloo process group, DDP against a single process; and its
faults (test_faults.py's table): a rank killed mid-training, a rank restarted between runs, a hanging rank, a NaN
loss and a poisoned batch on one rank. A failed run names its ranks' actors and causes, and the next run rebuilds
the group."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time

import pytest
import torch

from actors.pool import PoolConfig, PoolError
from actors.trainer import RankContext, TrainerGroup
from pipeline.cluster.pools import CallOnRank
from pipeline.data.store import RunStore
from pipeline.data.store import CHECKPOINT_DIR
from pipeline.stages.cached import checkpoint_stage
from pipeline.stages.reward_model.algorithm import train_reward_model
from pipeline.stages.sft.algorithm import train_sft
from test_faults import (RM_OK, SFT_DIVERGING, SFT_OK, base_checkpoint, demonstrations, preference_pairs,
                         state_of)
from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.distributed import save_on_rank0
from model.training import is_sharded, wrap
from model.llama import LlamaForCausalLM
from model.losses import masked_lm_loss
from model.optim import adamw

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)


def one_step(model: torch.nn.Module, ids: torch.Tensor, optimizer_name: str, lr: float) -> None:
    optimizer = adamw(model, lr) if optimizer_name == "adamw" else torch.optim.SGD(model.parameters(), lr=lr)
    loss = masked_lm_loss(model(ids), ids, torch.ones(ids.shape))  # every row the same length: mean of means
    loss.backward()
    optimizer.step()


def ddp_step(ctx: RankContext, payload: dict) -> tuple[int, int, str, dict[str, torch.Tensor]]:
    model = LlamaForCausalLM(ModelConfig(**SMALL))
    model.init_weights(payload["seed"])
    wrapped = wrap(model.train(), ctx.setup())
    one_step(wrapped, payload["ids"], payload["optimizer"], payload["lr"])
    return ctx.rank, ctx.world_size, ctx.backend, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trainers(ray_session):
    with TrainerGroup(PoolConfig("ddp", size=2, num_cpus=0.5, call_timeout_s=60, start_timeout_s=60)) as group:
        yield group


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ddp_on_two_ranks_equals_one_process_on_the_full_batch(trainers, optimizer):
    ids = torch.randint(0, SMALL["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(5))
    payloads = [dict(seed=3, ids=half, optimizer=optimizer, lr=1e-2) for half in ids.chunk(2)]
    results = trainers.run(ddp_step, payloads)

    reference = LlamaForCausalLM(ModelConfig(**SMALL))
    reference.init_weights(3)
    one_step(reference.train(), ids, optimizer, 1e-2)
    assert [r[:3] for r in results] == [(0, 2, "gloo"), (1, 2, "gloo")]
    for _, _, _, state in results:
        for name, tensor in reference.state_dict().items():
            assert (state[name] - tensor).abs().max().item() <= 1e-5, name
    initial = LlamaForCausalLM(ModelConfig(**SMALL))
    initial.init_weights(3)
    assert not torch.equal(results[0][3]["lm_head.weight"], initial.lm_head.weight)  # the step did move them


def fsdp_step(ctx: RankContext, payload: dict) -> dict[str, torch.Tensor] | None:
    model = LlamaForCausalLM(ModelConfig(**SMALL))
    model.init_weights(payload["seed"])
    sharded = wrap(model.train(), ctx.setup("fsdp"))
    assert is_sharded(sharded)
    one_step(sharded, payload["ids"], payload["optimizer"], payload["lr"])
    save_on_rank0(sharded, payload["out"], tokenizer=None)  # gathers the shards; rank 0 writes
    return load_checkpoint(payload["out"]).state_dict() if ctx.is_main else None


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fsdp_on_two_ranks_equals_one_process_and_exports_whole_weights(trainers, optimizer, tmp_path):
    ids = torch.randint(0, SMALL["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(6))
    out = tmp_path / "fsdp"
    results = trainers.run(fsdp_step, [dict(seed=4, ids=half, optimizer=optimizer, lr=1e-2, out=out)
                                       for half in ids.chunk(2)])
    reference = LlamaForCausalLM(ModelConfig(**SMALL))
    reference.init_weights(4)
    one_step(reference.train(), ids, optimizer, 1e-2)
    assert results[1] is None
    for name, tensor in reference.state_dict().items():
        assert (results[0][name] - tensor).abs().max().item() <= 1e-5, name


def test_trainer_group_keeps_its_process_group_between_runs(trainers):
    first = trainers.run(rank_and_sum, [1.0, 2.0])
    second = trainers.run(rank_and_sum, [10.0, 20.0])
    assert first == [(0, 3.0), (1, 3.0)] and second == [(0, 30.0), (1, 30.0)]
    with pytest.raises(ValueError, match="3 payloads for 2 ranks"):
        trainers.run(rank_and_sum, [1.0, 2.0, 3.0])


def rank_and_sum(ctx: RankContext, value: float) -> tuple[int, float]:
    total = torch.tensor([value])
    torch.distributed.all_reduce(total)
    return ctx.rank, total.item()


def fail_on_rank_one(ctx: RankContext, _payload: None) -> int:
    if ctx.rank == 1:
        raise ValueError("rank 1 broke")
    return ctx.rank


def test_a_failing_rank_names_itself_and_the_next_run_rebuilds_the_group(trainers):
    with pytest.raises(PoolError, match=r"pool 'ddp': run\(\) call failed on actor 'ddp-1': ValueError: rank 1 broke"):
        trainers.run(fail_on_rank_one, [None, None])
    rebuilds = trainers.rebuilds
    assert trainers.run(rank_and_sum, [1.0, 2.0]) == [(0, 3.0), (1, 3.0)]
    assert trainers.rebuilds == rebuilds + 1


# --- faults (tests/test_faults.py has the table) ----------------------------------------------------------

def rank_pid(ctx: RankContext, _payload: None) -> int:
    return os.getpid()


def on_ranks(group: TrainerGroup, fn, *args):
    """What pipeline.cluster.pools.Pools.train does: `fn(*args)` on every rank, rank 0's result."""
    return group.run(CallOnRank(fn), [args] * group.world_size)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_checkpoint(tmp_path_factory.mktemp("trainer-faults"))


def test_a_rank_killed_mid_training_fails_the_stage_naming_it_and_the_rebuilt_group_trains_the_same(
        trainers, base, tmp_path):
    """SIGKILL to rank 1's process 3 s into an SFT stage: the stage fails within seconds naming the dead rank
    first and the survivor's broken collective after it; no manifest. Re-run, the stage trains on a rebuilt group
    and its weights equal those of an undisturbed run on the old group, bit for bit."""
    demos = demonstrations()

    def sft(store: RunStore, config):
        return checkpoint_stage(store, 0, "sft_tiny", {"base": "tiny"}, dataclasses.asdict(config),
                                lambda out: on_ranks(trainers, train_sft, base, demos, out, config))

    start = time.monotonic()
    undisturbed, _, _ = sft(RunStore(tmp_path / "undisturbed"), SFT_OK)
    print(f"sft undisturbed: {time.monotonic() - start:.1f} s")
    pids = trainers.run(rank_pid, [None, None])
    rebuilds = trainers.rebuilds
    store = RunStore(tmp_path / "killed")
    kill = threading.Timer(3.0, os.kill, (pids[1], signal.SIGKILL))
    kill.start()
    start = time.monotonic()
    with pytest.raises(PoolError) as raised:
        sft(store, dataclasses.replace(SFT_OK, epochs=400))  # ~2,800 steps: still training when the kill comes
    lost = time.monotonic() - start - 3.0
    kill.join()
    message = str(raised.value)
    print(f"kill: failed {lost:.1f} s after the kill: {message}")
    assert message.startswith("trainer group 'ddp': train_sft failed (rank i is actor 'ddp-i'; the group is rebuilt "
                              "before its next run): pool 'ddp': run() call failed once; last on actor 'ddp-1': "
                              "actor died (")
    assert "; also run() call failed on actor 'ddp-0': " in message  # its collective lost the peer
    assert lost < 15, message
    stage = store.stage(0, "sft_tiny")
    assert stage.manifest() is None and not (stage.path / CHECKPOINT_DIR / "config.json").exists()

    start = time.monotonic()
    folder, metrics, cached = sft(store, SFT_OK)  # the re-run stage: a rebuilt group, new processes
    print(f"sft re-run with the rebuild: {time.monotonic() - start:.1f} s")
    assert not cached and trainers.rebuilds == rebuilds + 1 and metrics["world_size"] == 2
    assert set(trainers.run(rank_pid, [None, None])).isdisjoint(pids)
    expected = state_of(undisturbed)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in state_of(folder).items())


def test_a_rank_restarted_between_runs_is_found_and_the_group_rebuilt(trainers):
    """Rank 0 killed while idle: Ray restarts it without its process group; the next run notices the new pid,
    rebuilds the group and runs (the call itself is not lost)."""
    pids = trainers.run(rank_pid, [None, None])
    rebuilds = trainers.rebuilds
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    assert trainers.run(rank_and_sum, [1.0, 2.0]) == [(0, 3.0), (1, 3.0)]
    print(f"restart: the run took {time.monotonic() - start:.1f} s (restart seen, group rebuilt)")
    assert trainers.rebuilds == rebuilds + 1
    assert set(trainers.run(rank_pid, [None, None])).isdisjoint(pids)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nan_loss_on_the_group_stops_every_rank_at_the_same_step(trainers, base, tmp_path, parallel):
    """A diverging lr through the trainer group: both ranks stop at the same step naming the NaN loss (or, with
    FSDP's other rounding, the NaN gradient norm one step earlier), at once (not after a collective's timeout);
    nothing is written; the next run works on a rebuilt group."""
    trainers.run(rank_pid, [None, None])  # a rebuild left by an earlier test happens here, not in the timing
    start = time.monotonic()
    with pytest.raises(PoolError) as raised:
        on_ranks(trainers, train_sft, base, demonstrations(), tmp_path / "out",
                 dataclasses.replace(SFT_DIVERGING, parallel=parallel))
    elapsed = time.monotonic() - start
    message = str(raised.value)
    print(f"nan ({parallel}): {elapsed:.1f} s: {message}")
    assert "trainer group 'ddp': train_sft failed" in message
    for rank in (0, 1):
        assert re.search(rf"actor 'ddp-{rank}': FloatingPointError: sft step (\d+): (loss|gradient norm) is ",
                         message), message
    assert len(set(re.findall(r"sft step (\d+)", message))) == 1  # the same step on both ranks
    # A rank that went on alone would be "still running" at the end of the 10 s settle window.
    assert "still running" not in message and elapsed < 30, (elapsed, message)
    assert not (tmp_path / "out").exists()
    assert trainers.run(rank_and_sum, [1.0, 2.0]) == [(0, 3.0), (1, 3.0)]


def test_a_poisoned_pair_on_one_rank_stops_both_ranks_at_its_step(trainers, base, tmp_path):
    """One pair with an infinite margin sits in one rank's share: that rank's loss is inf, the other's finite.
    The ranks agree before backward, so both stop at that step (the other would otherwise wait in DDP's
    all-reduce until the group's 60 s timeout); the message has both views."""
    trainers.run(rank_pid, [None, None])
    start = time.monotonic()
    with pytest.raises(PoolError) as raised:
        on_ranks(trainers, train_reward_model, base, preference_pairs(poisoned="p7"), RM_OK, tmp_path / "rm")
    elapsed = time.monotonic() - start
    message = str(raised.value)
    print(f"poisoned: {elapsed:.1f} s: {message}")
    assert "trainer group 'ddp': train_reward_model failed" in message
    assert "FloatingPointError: reward model step" in message and ": loss is inf; stopping" in message
    assert ": loss is not finite on another rank (here " in message
    # A rank that went on alone would be "still running" at the end of the 10 s settle window.
    assert "still running" not in message and elapsed < 30, (elapsed, message)
    assert not (tmp_path / "rm").exists()
    # the clean pairs on the rebuilt group: trained and written
    metrics = on_ranks(trainers, train_reward_model, base, preference_pairs(), RM_OK, tmp_path / "rm")
    assert metrics["world_size"] == 2 and (tmp_path / "rm" / "config.json").is_file()


def hang_on_rank_one(ctx: RankContext, _payload: None) -> int:
    if ctx.rank == 1:
        time.sleep(3600)
    torch.distributed.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 in a collective
    return ctx.rank


def test_a_hanging_rank_hits_the_call_timeout_naming_its_actor(ray_session):
    """Rank 1 sleeps forever, rank 0 waits for it in an all-reduce: the run ends at call_timeout_s naming the
    hung rank first (killed) and the waiting one after it; the next run works on a rebuilt group."""
    config = PoolConfig("hang", size=2, num_cpus=0.25, call_timeout_s=3.0, start_timeout_s=60)
    with TrainerGroup(config) as group:
        start = time.monotonic()
        with pytest.raises(PoolError) as raised:
            group.run(hang_on_rank_one, [None, None])
        elapsed = time.monotonic() - start
        message = str(raised.value)
        print(f"hang: {elapsed:.1f} s: {message}")
        # Rank 0 looks hung too (its all-reduce waits for rank 1): both are named, in the order their deadlines
        # were seen, or rank 0 with gloo's own timeout when it ends first.
        assert message.startswith("trainer group 'hang': hang_on_rank_one failed (rank i is actor 'hang-i'; ")
        assert "last on actor 'hang-1': no answer within call_timeout_s=3.0 (actor killed)" in message, message
        assert "actor 'hang-0'" in message
        assert 3.0 <= elapsed < 15, elapsed
        assert group.run(rank_and_sum, [1.0, 2.0]) == [(0, 3.0), (1, 3.0)] and group.rebuilds == 1
