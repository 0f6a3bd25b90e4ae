"""The trainer pool: N Ray actors forming one torch.distributed process group (gloo on CPU, nccl on GPU).

The group lives as long as the `TrainerGroup`: stages run one loop function after another on the same ranks
(DESIGN.md: weights go to the generators every PPO iteration), so the rendezvous is paid once.

    group = TrainerGroup(PoolConfig("trainer", size=2))
    results = group.run(sft_loop, [shard_0, shard_1])   # sft_loop(ctx, payload) on each rank
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from actors.pool import Pool, PoolActor, PoolConfig, PoolError, match_torch_threads
from model.distributed import data_parallel, save_on_rank0
from model.llama import PretrainedLlama


@dataclass
class RankContext:
    """What a loop function learns about its rank."""

    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model on this rank's device; DDP-wrapped (gradients averaged in backward) when world_size > 1."""
        return data_parallel(model.to(self.device), self.world_size)

    def export(self, model: nn.Module, directory: str | Path, tokenizer: Any = None, untie: bool = False) -> Path:
        """Rank 0 writes a HF folder (model.distributed.save_on_rank0; FSDP shards gathered); every rank returns
        once it exists.

        Other nodes read it only through a shared filesystem. `untie=True` writes the form vLLM reloads in place.
        """
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        if not isinstance(inner, PretrainedLlama):
            raise TypeError(f"export takes one of model.llama's models, got {type(inner).__name__}")
        return save_on_rank0(inner, directory, tokenizer, untie=untie)


LoopFn = Callable[[RankContext, Any], Any]


class TrainerRank(PoolActor):
    """One rank: joins the process group once, then runs loop functions on it."""

    def __init__(self) -> None:
        match_torch_threads()
        self.ctx: RankContext | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free TCP port; rank 0 hosts the process group's store on it."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_group(self, rank: int, world_size: int, host: str, port: int, timeout_s: float) -> str:
        cuda = torch.cuda.is_available()  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)
        backend = "nccl" if cuda else "gloo"
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        self.ctx = RankContext(rank, world_size, device, backend)
        return backend

    def run(self, loop_fn: LoopFn, payload: Any) -> Any:
        if self.ctx is None:
            raise RuntimeError("this rank has no process group (restarted by Ray?); start a new TrainerGroup")
        return loop_fn(self.ctx, payload)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainerGroup:
    """`config.size` TrainerRank actors in one process group; `run` calls a loop function on all of them.

    A rank that fails breaks the group (collectives cannot lose a member): `run` raises PoolError and the group
    must be shut down and started again. Collectives time out after `config.call_timeout_s`.
    """

    def __init__(self, config: PoolConfig):
        self.pool = Pool(TrainerRank, config)
        try:
            host, port = self.pool.call(0, "rendezvous_address")
            self.backend = self.pool.scatter("init_group", [(rank, config.size, host, port, config.call_timeout_s)
                                                            for rank in range(config.size)])[0]
        except BaseException:
            self.pool.shutdown()
            raise
        self.world_size = config.size
        self._broken: str | None = None

    def run(self, loop_fn: LoopFn, payloads: Sequence[Any]) -> list[Any]:
        """`loop_fn(ctx, payloads[rank])` on every rank (a picklable top-level function); results in rank order."""
        if self._broken:
            raise PoolError(f"trainer group '{self.pool.config.name}' is broken ({self._broken}); start a new one")
        if len(payloads) != self.world_size:
            raise ValueError(f"{len(payloads)} payloads for {self.world_size} ranks (one per rank)")
        try:
            return self.pool.scatter("run", [(loop_fn, payload) for payload in payloads])
        except PoolError as err:
            self._broken = str(err)
            raise

    def shutdown(self) -> None:
        """Destroy the process group and remove the ranks."""
        self.pool.shutdown()

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
