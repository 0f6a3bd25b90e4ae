"""Data parallelism for the training loops: the same code in one process and on every rank of a torch.distributed
group (the trainer pool's ranks). DDP replicates the model and averages gradients; FSDP (torch's `fully_shard`)
shards parameters, gradients and optimizer state over the ranks, for models whose AdamW state does not fit on one
device (a 7B policy: ~16 bytes per parameter).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import save_checkpoint
from model.llama import PretrainedLlama
from model.tokenizer import Tokenizer

STRATEGIES = ("ddp", "fsdp")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_rank_batch(batch_size: int, world: int, what: str) -> int:
    """The global batch split evenly over the ranks: uneven splits would weight ranks differently."""
    if batch_size % world:
        raise ValueError(f"{what} = {batch_size} is not divisible by the world size {world}")
    return batch_size // world


def data_parallel(model: PretrainedLlama, world: int, strategy: str = "ddp") -> nn.Module:
    """The model to train: bare in one process; DDP-wrapped, or sharded in place by FSDP (each decoder layer a
    unit, so only one layer's full weights exist at a time), when there is more than one rank."""
    if strategy not in STRATEGIES:
        raise ValueError(f"data-parallel strategy {strategy!r}: allowed: {', '.join(STRATEGIES)}")
    if torch.cuda.is_available():  # a trainer rank's GPU (Ray sets CUDA_VISIBLE_DEVICES; the rank set the device)
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if world == 1:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def gathered_on_rank0(model: PretrainedLlama) -> PretrainedLlama | None:
    """The whole model on rank 0 (a model sharded by FSDP is gathered first: a collective, every rank calls this);
    None on the other ranks."""
    rank, world = rank_and_world()
    if world > 1 and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        whole = type(model)(model.config)
        whole.load_state_dict(full)
        return whole
    return model if rank == 0 else None


def save_on_rank0(model: PretrainedLlama, out_dir: str | Path, tokenizer: Tokenizer | None,
                  untie: bool = False) -> Path:
    """Rank 0 writes the checkpoint (`untie=True`: the form vLLM reloads in place); every rank waits for it, so
    no caller sees the folder half made."""
    whole = gathered_on_rank0(model)
    if whole is not None:
        save_checkpoint(whole, out_dir, tokenizer=tokenizer, untie=untie)
    if rank_and_world()[1] > 1:
        dist.barrier()
    return Path(out_dir)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
