"""The trainer group on real Ray: two ranks in one gloo process group, DDP against a single process."""

from __future__ import annotations

import pytest
import torch

from actors.pool import PoolConfig, PoolError
from actors.trainer import RankContext, TrainerGroup
from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.distributed import data_parallel, is_sharded, save_on_rank0
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
    wrapped = ctx.wrap(model.train())
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
    sharded = data_parallel(model.train(), ctx.world_size, "fsdp")
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


def test_a_failing_rank_names_itself_and_breaks_the_group(trainers):
    """Last in this module: the group cannot be used after it."""
    with pytest.raises(PoolError, match=r"pool 'ddp': run\(\) call failed on actor 'ddp-1': ValueError: rank 1 broke"):
        trainers.run(fail_on_rank_one, [None, None])
    with pytest.raises(PoolError, match="trainer group 'ddp' is broken"):
        trainers.run(rank_and_sum, [1.0, 2.0])
