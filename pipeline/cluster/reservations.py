"""What a pool reserves, what the cluster holds, and which live pools give theirs back for one that does not fit.

The driver's pools (pipeline.cluster.pools.Pools) start on demand and stay up while they fit. When a pool would not fit
beside the live ones within the cluster's capacity (`cluster.num_gpus` / `num_cpus` of a local instance,
`cluster.max_gpus` of a running cluster; with `cluster.colocate`, the trainers' GPUs for the generators), live pools
are released until it does: the LLM judge's first (it serves once a round), then the least recently used. A
capacity left null is not checked and releases nothing, so the local CPU default keeps every pool up as before.
pipeline/cluster/placement.py plans the same before Ray starts: every phase of the run must fit on its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from actors.pool import PoolConfig

if TYPE_CHECKING:
    from pipeline.cluster.pools import ClusterConfig

# What each field of a Reservation counts, in messages.
UNITS = {"gpus": "GPUs", "shared": "of the trainers' GPUs for colocated generators", "cpus": "CPUs"}


@dataclass(frozen=True)
class Reservation:
    gpus: float = 0.0  # devices of its own
    cpus: float = 0.0
    shared: float = 0.0  # trainer devices its generators share (cluster.colocate)

    @staticmethod
    def of(pool: PoolConfig, shared: bool = False) -> Reservation:
        """A pool's reservation, one bundle per actor; `shared`: its GPUs are the trainers' (a colocated generator)."""
        gpus, cpus = pool.size * pool.num_gpus, pool.size * pool.num_cpus
        return Reservation(0.0, cpus, gpus) if shared else Reservation(gpus, cpus)

    def __add__(self, other: Reservation) -> Reservation:
        return Reservation(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def total(reservations: Iterable[Reservation]) -> Reservation:
    return sum(reservations, Reservation())


@dataclass(frozen=True)
class Shortfall:
    resource: str  # a Reservation field
    needs: float
    has: float
    key: str  # the config key the capacity comes from


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds (None: not checked) and the config key each comes from."""

    gpus: float | None = None
    cpus: float | None = None
    shared: float | None = None
    gpus_key: str = "cluster.num_gpus"
    cpus_key: str = "cluster.num_cpus"
    shared_key: str = "cluster.trainer.size"

    def short(self, need: Reservation) -> list[Shortfall]:
        out = []
        for resource in UNITS:
            has = getattr(self, resource)
            if has is not None and getattr(need, resource) > has:
                out.append(Shortfall(resource, getattr(need, resource), has, getattr(self, f"{resource}_key")))
        return out


def joins_cluster(cluster: ClusterConfig) -> bool:
    """The driver joins a running cluster (`cluster.address`, or RAY_ADDRESS as in a Ray job)."""
    return cluster.address is not None or bool(os.environ.get("RAY_ADDRESS"))


def capacity_of(cluster: ClusterConfig) -> Capacity:
    """A local instance: its num_gpus and num_cpus; a running cluster: max_gpus (its CPUs are not checked). With
    colocate, the generators share the trainer group's devices."""
    shared = cluster.trainer.size * cluster.trainer.num_gpus if cluster.colocate else None
    if joins_cluster(cluster):
        return Capacity(cluster.max_gpus, None, shared, gpus_key="cluster.max_gpus")
    return Capacity(cluster.num_gpus, cluster.num_cpus, shared)


class Ledger:
    """The live pools' reservations, least recently used first, within a capacity."""

    def __init__(self, capacity: Capacity, first: Sequence[str] = (), pinned: Sequence[str] = ()):
        """`first`: pools released before any other; `pinned`: never released."""
        self.capacity = capacity
        self._first, self._pinned = set(first), set(pinned)
        self._live: dict[str, Reservation] = {}  # insertion order: least recently used first

    @property
    def live(self) -> list[str]:
        return list(self._live)

    def use(self, name: str, reservation: Reservation | None = None) -> None:
        """A pool started (with its reservation) or used again: the most recently used now."""
        held = self._live.pop(name, None)
        self._live[name] = held if reservation is None else reservation

    def drop(self, name: str) -> None:
        self._live.pop(name, None)

    def to_release(self, reservation: Reservation) -> list[str]:
        """The live pools to release, in order, so that `reservation` fits beside the others: only pools holding
        something that is short, the `first` ones first, then the least recently used (every such pool when even
        that is not enough: Ray then waits for the devices, as it would without a capacity)."""
        candidates = sorted((n for n in self._live if n not in self._pinned), key=lambda n: n not in self._first)
        kept, released = dict(self._live), []
        for name in candidates:
            short = {s.resource for s in self.capacity.short(total(kept.values()) + reservation)}
            if not short:
                break
            if any(getattr(kept[name], resource) for resource in short):
                released.append(name)
                del kept[name]
        return released
