"""The run's placement plan: the pools each phase of the run holds at once and the GPUs and CPUs they reserve,
against the cluster's capacity, before Ray starts (`python -m pipeline.cluster.plan` prints it; pipeline/cluster/plan.py
checks it).

A phase is a set of pools in use at the same moment: the trainer group (pretraining, SFT, the reward models, every
fine-tune); one size's generators (its evaluations, GAtt's dialogues, on-policy batches); the largest size's
generators and the scorer (rejection sampling); those and the trainers (PPO); a size's generators and the scorer
(context distillation); the scorer (win rates); the LLM judge's generators. Pools outside the current phase keep
their devices until a pool of a later phase needs them, and are then released (pipeline/cluster/reservations.py: the
judge's first, then the least recently used), so a run places when each of its phases does. With
`cluster.colocate` the generators share the trainers' GPUs (pipeline/cluster/colocate.py): the trainer group is up in
every phase that samples, and the shared devices count once.
"""

from __future__ import annotations

import shlex
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

from actors.pool import PoolConfig
from pipeline.cluster.pools import JUDGE, ClusterConfig, engine_pool_config, generator_pool_name, generator_reservation
from pipeline.cluster.reservations import UNITS, Capacity, Reservation, Shortfall, capacity_of, joins_cluster, total

if TYPE_CHECKING:
    from pipeline.config.run import RunConfig


@dataclass(frozen=True)
class PoolPlan:
    name: str
    actors: int
    gpus_each: float  # one actor's GPUs: a generator's engine spans them
    tensor_parallel: int | None  # generators: the devices one engine spans
    reservation: Reservation


@dataclass(frozen=True)
class Phase:
    name: str
    pools: tuple[str, ...]
    stages: str  # what runs in it


@dataclass
class Layout:
    pools: dict[str, PoolPlan]
    phases: list[Phase]
    capacity: Capacity
    colocate: bool

    def needs(self, phase: Phase) -> Reservation:
        return total(self.pools[name].reservation for name in phase.pools)

    def all_at_once(self) -> Reservation:
        return total(pool.reservation for pool in self.pools.values())

    def shortfalls(self) -> list[tuple[Phase, list[Shortfall]]]:
        return [(phase, short) for phase in self.phases if (short := self.capacity.short(self.needs(phase)))]


def generator_plan(cluster: ClusterConfig, size: str, degree: int) -> PoolPlan:
    """A generator pool whose engines span `degree` devices (pipeline.cluster.pools.Pools.generator reserves the
    same)."""
    name = generator_pool_name(cluster, size)
    pool = engine_pool_config(cluster.generator, name, degree)
    return PoolPlan(name, pool.size, pool.num_gpus, degree, generator_reservation(cluster, degree))


def plain_plan(pool: PoolConfig) -> PoolPlan:
    return PoolPlan(pool.name, pool.size, pool.num_gpus, None, Reservation.of(pool))


def has_generators(phase: Phase, pools: dict[str, PoolPlan]) -> bool:
    return any(pools[name].tensor_parallel is not None for name in phase.pools)


def plan_placement(config: RunConfig, degrees: dict[str, int], judge_degree: int | None) -> Layout:
    """The layout of a run: `degrees` is each policy size's engine degree (smallest size first), `judge_degree` the
    LLM judge's (None: no judge)."""
    cluster, rounds = config.cluster, config.rounds
    trainer, scorer = plain_plan(cluster.trainer), plain_plan(cluster.scorer)
    generators = {size: generator_plan(cluster, size, degree) for size, degree in degrees.items()}
    largest = list(generators.values())[-1].name
    pools = {**{g.name: g for g in generators.values()}, scorer.name: scorer, trainer.name: trainer}
    training = "SFT, reward models, fine-tunes" if config.base_models else "pretraining, SFT, reward models, fine-tunes"
    phases = [Phase("training", (trainer.name,), training)]
    phases += [Phase(f"sampling {size}", (g.name,), "evaluations, GAtt dialogues, on-policy batches")
               for size, g in generators.items()]
    if rounds.count >= 1:
        phases.append(Phase("rejection sampling", (largest, scorer.name), "K samples scored as they come"))
    if rounds.ppo_from and rounds.count >= rounds.ppo_from:
        phases.append(Phase("ppo", (largest, scorer.name, trainer.name), "sampling, scoring, training in turn"))
    distill_from = rounds.context_distillation.distill_from
    if distill_from and rounds.count >= distill_from:
        phases += [Phase(f"context distillation {size}", (g.name, scorer.name), "samples with and without preprompt")
                   for size, g in generators.items()]
    if rounds.count >= 1:
        phases.append(Phase("win rates", (scorer.name,), "the reward models' verdicts"))
    if judge_degree is not None and rounds.count >= 1:
        judge = generator_plan(cluster, JUDGE, judge_degree)
        pools[judge.name] = judge
        phases.append(Phase("llm judge", (judge.name,), "verdicts after each round, GAtt adherence on files"))
    if cluster.colocate:  # the generators' devices are the trainers': the group is up whenever they sample
        phases = [Phase(p.name, (*p.pools, trainer.name), p.stages)
                  if has_generators(p, pools) and trainer.name not in p.pools else p for p in phases]
    return Layout(pools, phases, capacity_of(cluster), cluster.colocate)


def shortfall_text(layout: Layout, phase: Phase, short: Shortfall) -> str:
    amounts = [(name, getattr(layout.pools[name].reservation, short.resource)) for name in phase.pools]
    listed = ", ".join(f"{name} {amount:g}" for name, amount in amounts if amount)
    return (f"needs {short.needs:g} {UNITS[short.resource]} ({listed}), the cluster has {short.has:g} ({short.key}; "
            f"{short.needs - short.has:g} short)")


def placement_refusal(layout: Layout, overrides: list[str]) -> str | None:
    """One line naming the first phase that does not fit, its pools and the shortfall; None when every phase fits."""
    if not (short := layout.shortfalls()):
        return None
    phase, shortfalls = short[0]
    why = "; ".join(shortfall_text(layout, phase, s) for s in shortfalls)
    see = f"see python -m pipeline.cluster.plan {shlex.join(overrides)}".rstrip()
    return f"placement: phase '{phase.name}' {why}; {see}"


def capacity_line(layout: Layout, cluster: ClusterConfig) -> str:
    cap = layout.capacity
    unchecked = "a running cluster" if joins_cluster(cluster) else f"{cap.cpus_key} = null"
    gpus = f"{cap.gpus:g} ({cap.gpus_key})" if cap.gpus is not None else f"not checked ({cap.gpus_key} = null)"
    cpus = f"{cap.cpus:g} ({cap.cpus_key})" if cap.cpus is not None else f"not checked ({unchecked})"
    shared = f", the trainers' GPUs {cap.shared:g} for the generators ({cap.shared_key})" if layout.colocate else ""
    return f"capacity: GPUs {gpus}, CPUs {cpus}{shared}"


HEADINGS = {"gpus": "GPUs", "shared": "shared", "cpus": "CPUs"}  # shared: the trainers' GPUs (colocate)


def spelled(reservation: Reservation) -> str:
    parts = [f"{getattr(reservation, r):g} {unit}" for r, unit in UNITS.items() if getattr(reservation, r)]
    return ", ".join(parts) or "nothing"


def amount(value: float) -> str:
    return f"{value:g}" if value else "-"


def render_layout(layout: Layout, cluster: ClusterConfig) -> str:
    """The pools (actors, GPUs, engine degree, what each reserves), then each phase's pools against the capacity."""
    columns = ("gpus", "shared", "cpus") if layout.colocate else ("gpus", "cpus")
    header = " ".join(f"{HEADINGS[c]:>6}" for c in columns)

    def cells(reservation: Reservation) -> str:
        return " ".join(f"{amount(getattr(reservation, c)):>6}" for c in columns)

    lines = [f"placement ({capacity_line(layout, cluster)}):", f"  {'pool':30} {'actors':>6} {'GPUs each':>9} "
             f"{'TP':>3} {header}"]
    for pool in layout.pools.values():
        tp = "-" if pool.tensor_parallel is None else str(pool.tensor_parallel)
        lines.append(f"  {pool.name:30} {pool.actors:6} {pool.gpus_each:9g} {tp:>3} {cells(pool.reservation)}")
    lines.append(f"  {'all pools at once':30} {'':6} {'':9} {'':3} {cells(layout.all_at_once())}")
    lines += ["", f"  {'phase':30} {header}  pools: what runs"]
    for phase in layout.phases:
        need = layout.needs(phase)
        mark = "  SHORT" if layout.capacity.short(need) else ""
        lines.append(f"  {phase.name:30} {cells(need)}  {', '.join(phase.pools)}: {phase.stages}{mark}")
    largest = max(layout.phases, key=lambda phase: astuple(layout.needs(phase)))
    lines.append(f"  the largest phase, '{largest.name}', takes {spelled(layout.needs(largest))}.")
    if layout.capacity.short(layout.all_at_once()):
        lines += ["  A pool outside the current phase keeps its devices until a later phase needs them:",
                  "  the judge's pool is released first, then the least recently used."]
    else:
        lines.append("  Every pool fits at once: none is released.")
    return "\n".join(lines)
