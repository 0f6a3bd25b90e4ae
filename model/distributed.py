"""The whole model out of a torch.distributed group (the trainer pool's ranks): gathered on rank 0 from FSDP's
shards, written there, waited for by every rank. How the ranks wrap and train a model: model/training.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from model.checkpoint import (DEFAULT_SHARD_BYTES, ShardWriter, checkpoint_folder, exported_config, save_checkpoint,
                              unties)
from model.llama import PretrainedLlama
from model.tokenizer import Tokenizer
from model.training import is_sharded, ranks_agree


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
                  untie: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Rank 0 writes the checkpoint (`untie=True`: the form vLLM reloads in place); every rank waits for it, so
    no caller sees the folder half made. A sharded model is streamed tensor by tensor (`stream_on_rank0`), never
    whole on any rank."""
    world = rank_and_world()[1]
    if world > 1 and is_sharded(model):
        stream_on_rank0(model, out_dir, tokenizer, untie, max_shard_bytes)
    else:
        whole = gathered_on_rank0(model)
        if whole is not None:
            save_checkpoint(whole, out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, untie=untie)
    if world > 1:
        dist.barrier()
    return Path(out_dir)


def stream_on_rank0(model: PretrainedLlama, out_dir: str | Path, tokenizer: Tokenizer | None, untie: bool = False,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a sharded model as save_checkpoint would (same files, loadable by load_checkpoint), one tensor at a
    time: every rank joins each tensor's gather in state-dict order, rank 0 casts it to the config's dtype and
    writes safetensors files of at most `max_shard_bytes` as they fill, then config.json, the index and the
    tokenizer, and swaps the folder in atomically. A write that fails on rank 0 fails every rank, after the last
    gather (so none waits in a collective the others left)."""
    writes = rank_and_world()[0] == 0
    error: Exception | None = None
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(checkpoint_folder(out_dir)) if writes else None
        writer = ShardWriter(folder, max_shard_bytes) if folder is not None else None
        for name, tensor in full_tensors(model, untie):
            if writer is not None and error is None:
                try:
                    writer.add(name, tensor)
                except Exception as err:  # noqa: BLE001 - the other ranks still wait for the next gathers
                    error = err
        if folder is not None and error is None:
            try:
                writer.close()
                exported_config(model, untie).save(folder, architecture=model.architecture)
                if tokenizer is not None:
                    tokenizer.save(folder)
            except Exception as err:  # noqa: BLE001
                error = err
        if not ranks_agree(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed writing {out_dir} (its error says why); nothing was written")


def full_tensors(model: PretrainedLlama, untie: bool,
                 device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, whole tensor on `device` in the config's dtype) on rank 0, (name, None) on the others, in
    state-dict order (`tensor_specs`'); `untie` adds lm_head.weight, the tied embeddings gathered a second time."""
    writes = rank_and_world()[0] == 0
    dtype = getattr(torch, model.config.dtype)
    state = model.state_dict()
    for name, source in _sources(model, state, untie).items():
        whole = _gathered(state[source].detach())
        yield name, whole.to(device, dtype).contiguous() if writes else None
        del whole


def tensor_specs(model: PretrainedLlama, untie: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, whole shape, dtype name) of every tensor `full_tensors` yields, in its order; no collective."""
    dtype = model.config.dtype
    state = model.state_dict()
    return [(name, tuple(state[source].shape), dtype) for name, source in _sources(model, state, untie).items()]


def _sources(model: PretrainedLlama, state: dict, untie: bool) -> dict[str, str]:
    """Checkpoint name -> the state-dict entry it is read from."""
    sources = {name: name for name in state}
    if unties(model, untie):
        sources["lm_head.weight"] = "model.embed_tokens.weight"
    return sources


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather every rank joins), gathered on its mesh's device (offloaded shards
    live on the host, where NCCL cannot gather them)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor()
