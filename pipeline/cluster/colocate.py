"""Generators sharing the trainers' GPUs (`cluster.colocate`; CUDA only).

Ray lets actors that each ask for part of a GPU share it, and gives a fractional request the fullest device it
fits on. Each trainer rank asks for just over half a GPU (no two ranks share one) and each generator actor for just
under half, so once the trainer group is up (Pools starts it before any generator) every generator lands beside a
rank. The engines start in vLLM's sleep mode and sleep while the trainer group runs: their weights and KV cache
leave the GPU, and come back when the run ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from actors.pool import Pool, PoolConfig
from actors.trainer import TrainerGroup

GENERATOR_SHARE = 0.49
TRAINER_SHARE = 1 - GENERATOR_SHARE


def colocated(pool: PoolConfig, share: float) -> PoolConfig:
    """`pool` with each actor asking for `share` of one GPU."""
    return replace(pool, num_gpus=share)


@contextmanager
def asleep(pools: Sequence[Pool]) -> Iterator[None]:
    """Every actor of `pools` asleep (Generator.sleep) while the block runs, awake again after it."""
    slept = []
    try:
        for pool in pools:
            pool.broadcast("sleep")
            slept.append(pool)
        yield
    finally:
        for pool in slept:
            pool.broadcast("wake_up")


class ColocatedTrainers(TrainerGroup):
    """The trainer group on the GPUs it shares with the generators: each run puts the live generator pools to
    sleep first (the SFT-like stages, and each of PPO's steps) and wakes them after, except for the runs the engines
    take part in (`actors.trainer.with_engines`: the collective weight sync)."""

    def __init__(self, config: PoolConfig, generators: Callable[[], Sequence[Pool]]):
        self._generators = generators
        super().__init__(colocated(config, TRAINER_SHARE))

    def run(self, loop_fn: Any, payloads: Sequence[Any]) -> list[Any]:
        if getattr(loop_fn, "with_engines", False):  # a collective weight sync: the engines receive
            return super().run(loop_fn, payloads)
        with asleep(self._generators()):
            return super().run(loop_fn, payloads)
