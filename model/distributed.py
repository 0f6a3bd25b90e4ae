"""The whole model out of a torch.distributed group (the trainer pool's ranks): gathered on rank 0 from FSDP's
shards, written there, waited for by every rank. How the ranks wrap and train a model: model/training.py.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from model.checkpoint import save_checkpoint
from model.llama import PretrainedLlama
from model.tokenizer import Tokenizer
from model.training import is_sharded


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
