"""The trainer pool: N Ray actors forming one torch.distributed process group (gloo on CPU, nccl on GPU).

The group lives as long as the `TrainerGroup`: stages run one loop function after another on the same ranks
(docs/design.md, "Weight sync": weights go to the generators every PPO iteration), so the rendezvous is paid once.

    group = TrainerGroup(PoolConfig("trainer", size=2))
    results = group.run(sft_loop, [shard_0, shard_1])   # sft_loop(ctx, payload) on each rank
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from actors.metrics import record_training
from actors.pool import Pool, PoolActor, PoolConfig, PoolError, match_torch_threads
from actors.weights import Bucket, GroupAddress, bucket_layout, join_group, pack, send_buckets
from model.checkpoint import checkpoint_tensors
from model.distributed import full_tensors, gathered_on_rank0, save_on_rank0, tensor_specs
from model.llama import PretrainedLlama
from model.training import TrainConfig, TrainSetup

log = logging.getLogger(__name__)
# After one rank's call fails, how long the others get to end theirs (so the error names them all): a rank that
# lost a peer in a collective fails at once; one waiting on a live peer (that raised) only at the group's timeout.
_SETTLE_S = 10.0


@dataclass
class RankContext:
    """What a loop function learns about its rank."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    # What a loop function keeps on this rank between calls (PPO's models and optimizers across iterations).
    state: dict[str, Any] = field(default_factory=dict)
    weight_group: Any = None  # rank 0's process group with the engines' workers (actors.weights.join_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, strategy: str = "ddp", train: TrainConfig | None = None) -> TrainSetup:
        """Where a loop trains on this rank (model.training's Trainer and wrap): the group's ranks, this rank's
        device, the stage's strategy and switches."""
        return TrainSetup(self.world_size, strategy, train or TrainConfig(), self.device)

    def export(self, model: nn.Module, directory: str | Path, tokenizer: Any = None, untie: bool = False) -> Path:
        """Rank 0 writes a HF folder (model.distributed.save_on_rank0; FSDP shards gathered); every rank returns
        once it exists.

        Other nodes read it only through a shared filesystem. `untie=True` writes the form vLLM reloads in place.
        """
        return save_on_rank0(_unwrapped(model, "export"), directory, tokenizer, untie=untie)

    def publish(self, model: nn.Module) -> ray.ObjectRef | None:
        """Rank 0 puts the model's checkpoint tensors into Ray's object store (actors.weights.pack) and returns
        the reference, None on the other ranks: the in-memory form of `export` for weight sync, no file written.
        Every rank calls it (FSDP shards are gathered)."""
        whole = gathered_on_rank0(_unwrapped(model, "publish"))
        return None if whole is None else ray.put(pack(checkpoint_tensors(whole)[0]))

    def join_weight_group(self, address: GroupAddress) -> None:
        """Rank 0 becomes rank 0 of a weight group with the engines' workers (they join at the same time); the other
        ranks have no part in it."""
        if self.is_main:
            self.weight_group = join_group(address, 0)

    def send_weights(self, model: nn.Module, layout: list[Bucket]) -> int:
        """Every rank: the model's checkpoint tensors (untied: what the engines serve) gathered one at a time from
        FSDP's shards; rank 0 broadcasts them to the weight group bucket by bucket. Returns the bytes rank 0 sent."""
        if self.is_main and self.weight_group is None:
            raise RuntimeError("send_weights before join_weight_group")
        tensors = full_tensors(_unwrapped(model, "send_weights"), untie=True, device=self.device)
        return send_buckets(self.weight_group if self.is_main else None, layout, tensors, self.device)


def weight_layout(model: nn.Module, bucket_bytes: int) -> list[Bucket]:
    """The buckets `RankContext.send_weights` fills for `model` (the same on every rank; no collective)."""
    return bucket_layout(tensor_specs(_unwrapped(model, "weight_layout"), untie=True), bucket_bytes)


# Loop functions for weight sync of the model a stage keeps on the ranks (`ctx.state[key]`, e.g. PPO's "policy").

def with_engines(loop_fn: LoopFn) -> LoopFn:
    """Marks a loop function the generators' engines take part in: a group that shares their GPUs
    (pipeline.cluster.colocate) keeps them awake while it runs."""
    loop_fn.with_engines = True
    return loop_fn


def state_weight_layout(ctx: RankContext, payload: tuple[str, int]) -> list[Bucket]:
    key, bucket_bytes = payload
    return weight_layout(ctx.state[key], bucket_bytes)


@with_engines
def join_state_weight_group(ctx: RankContext, address: GroupAddress) -> None:
    ctx.join_weight_group(address)


@with_engines
def send_state_weights(ctx: RankContext, payload: tuple[str, list[Bucket]]) -> int:
    key, layout = payload
    return ctx.send_weights(ctx.state[key], layout)


def publish_state(ctx: RankContext, key: str) -> ray.ObjectRef | None:
    return ctx.publish(ctx.state[key])


def export_state(ctx: RankContext, payload: tuple[str, str]) -> str:
    key, directory = payload
    return str(ctx.export(ctx.state[key], directory, untie=True))


def _unwrapped(model: nn.Module, what: str) -> PretrainedLlama:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(inner, PretrainedLlama):
        raise TypeError(f"{what} takes one of model.llama's models, got {type(inner).__name__}")
    return inner


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
            raise RuntimeError("this rank has no process group (restarted by Ray?); the group must be rebuilt")
        start = time.perf_counter()
        result = loop_fn(self.ctx, payload)
        if self.ctx.is_main:  # one update per run: the tokens the result reports (actors.metrics.trained_tokens)
            record_training(result, _loop_name(loop_fn), self.ctx.world_size, time.perf_counter() - start)
        return result

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _loop_name(loop_fn: LoopFn) -> str:
    """The training function's name: its `loop_name` when it wraps another function (a caller's adapter), else its
    own."""
    return getattr(loop_fn, "loop_name", None) or getattr(loop_fn, "__name__", type(loop_fn).__name__)


class TrainerGroup:
    """`config.size` TrainerRank actors in one process group; `run` calls a loop function on all of them.

    A rank that fails breaks the group (collectives cannot lose a member). `run` then raises PoolError within
    about `config.call_timeout_s` (a hung rank) or `_SETTLE_S` (a rank that died or raised: the others are given
    that long to end their call), naming every rank's actor that failed, the root cause (a death, a hang) first,
    and the next `run` rebuilds the group: the old ranks are removed, new ones join a new process group. A rank
    Ray restarted between runs (it lost its process group) is found by `run`'s health check and rebuilds the
    group too. A failed call is never retried here: a loop function may keep state on its ranks between runs
    (PPO's models), which a rebuild loses; the caller decides (a re-run stage starts from its inputs).
    Collectives time out after `config.call_timeout_s`. Actor `<name>-<i>` is rank i.
    """

    def __init__(self, config: PoolConfig):
        self.config = config
        self.world_size = config.size
        self.rebuilds = 0  # times the group was rebuilt after a failure
        self._broken: str | None = None
        self._start()

    def _start(self) -> None:
        config = self.config
        self.pool = Pool(TrainerRank, config)
        try:
            host, port = self.pool.call(0, "rendezvous_address")
            self.backend = self.pool.scatter("init_group", [(rank, config.size, host, port, config.call_timeout_s)
                                                            for rank in range(config.size)],
                                             settle_s=min(_SETTLE_S, config.call_timeout_s))[0]
            self._pids = [h.pid for h in self.pool.health()]  # a new pid later: Ray restarted that rank
        except BaseException:
            self.pool.shutdown()
            raise

    def run(self, loop_fn: LoopFn, payloads: Sequence[Any]) -> list[Any]:
        """`loop_fn(ctx, payloads[rank])` on every rank (a picklable top-level function or callable object);
        results in rank order."""
        if len(payloads) != self.world_size:
            raise ValueError(f"{len(payloads)} payloads for {self.world_size} ranks (one per rank)")
        broken = self._broken or self._lost_ranks()
        if broken:
            self._rebuild(broken)
        name = self.config.name
        try:
            return self.pool.scatter("run", [(loop_fn, payload) for payload in payloads],
                                     settle_s=min(_SETTLE_S, self.config.call_timeout_s))
        except PoolError as err:
            self._broken = str(err)
            # After a rebuild, what earlier runs left on the ranks (PPO's models) is gone: say so, it may be why.
            rebuilt = f"; it ran on ranks rebuilt just before, after: {broken}" if broken else ""
            raise PoolError(f"trainer group '{name}': {_loop_name(loop_fn)} failed (rank i is actor "
                            f"'{name}-i'; the group is rebuilt before its next run): {err}{rebuilt}") from err

    def _lost_ranks(self) -> str | None:
        """Why the group cannot run as it is: ranks that are gone or were restarted since it was built."""
        lost = [f"actor '{h.name}' " + (f"is gone ({h.cause})" if h.state == "dead" else
                                        f"was restarted by Ray (pid {pid} -> {h.pid}; {h.cause or 'cause unknown'})")
                for h, pid in zip(self.pool.health(), self._pids) if h.state == "dead" or h.pid != pid]
        return "; ".join(lost) or None

    def _rebuild(self, cause: str) -> None:
        log.warning("trainer group '%s': rebuilding its %d rank(s) after: %s", self.config.name, self.world_size,
                    cause)
        self.pool.shutdown()
        self._start()
        self.rebuilds += 1
        self._broken = None

    def shutdown(self) -> None:
        """Destroy the process group and remove the ranks."""
        self.pool.shutdown()

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
