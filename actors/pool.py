"""A pool of long-lived Ray actors: one placement group, named actors, calls with timeouts and bounded retries.

Failure model (docs/design.md, "Failures"). An actor that dies (crash, OOM kill, lost node) or whose call runs past
`call_timeout_s` (it is then killed: a hung actor would block every later call) is restarted by Ray, up to
`max_restarts` times. `map_shards` gives the failed shard to the next ready actor (another one when it can), at
most `max_shard_retries` more times, and then raises `PoolError` naming the actor, the shard and the cause. An
exception raised by the actor's own code is a bug or a bad shard, not a transient failure: it fails the call at
once. State a restarted actor would lose (the policy weights last loaded) is kept as "replay" calls, run on
every new incarnation of an actor before it takes work. `scatter(..., settle_s=...)` is for actors that work
together (the ranks of one process group): one failure does not end the call at once, the others get `settle_s`
to end theirs, and the one PoolError names every actor that failed, root causes (a death, a hang) first.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Every incarnation of an actor is a new worker process, so an id drawn at import tells a restarted actor apart.
_INCARNATION = uuid.uuid4().hex
_PROBE_INTERVAL_S = 0.5  # between pings of a restarting actor
_CLOSE_GRACE_S = 10.0  # for `close` at shutdown; a busy or hung actor is killed after it


class PoolError(RuntimeError):
    """A pool call that could not complete; the message names the pool, the actor, the shard and the cause."""


@dataclass
class PoolConfig:
    name: str  # actors are named "{name}-{i}" (Ray dashboard, ray.get_actor)
    size: int = 1
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    strategy: str = "PACK"  # PACK: fill nodes one at a time; SPREAD: across nodes where possible
    call_timeout_s: float = 600.0  # one remote call: a shard, a weight load, a training run
    start_timeout_s: float = 300.0  # placement, construction (a vLLM engine: ~25 s on CPU), each restart
    max_shard_retries: int = 2  # a failed shard is tried at most 1 + this many times
    max_restarts: int = 2  # per actor, done by Ray
    # Memory of the device each actor uses (GPU memory; None: unknown, and the memory plan is not checked).
    memory_gib: float | None = None
    # Devices one actor's vLLM engine spans (generator pools). num_gpus is then per device: the pool builder
    # (pipeline.cluster.pools.engine_pool_config) reserves num_gpus x tensor_parallel GPUs per actor; on CPU the
    # engine's ranks share the actor's num_cpus.
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"pool name {self.name!r}: use letters, digits, '_', '.' and '-' "
                             "(it names the Ray actors)")

        def fail(key: str, why: str) -> None:
            raise ValueError(f"pool '{self.name}': {key} = {getattr(self, key)!r}: {why}")

        if not _is_int(self.size) or self.size < 1:
            fail("size", "must be an integer >= 1")
        for key in ("num_cpus", "num_gpus"):
            if not _is_number(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "must be a number >= 0")
        if self.num_cpus == 0 and self.num_gpus == 0:
            fail("num_cpus", "an actor needs some CPU or GPU (num_gpus is 0 too)")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            fail("num_gpus", "above 1 it must be a whole number (Ray shares only single GPUs)")
        if self.strategy not in STRATEGIES:
            fail("strategy", f"must be one of {', '.join(STRATEGIES)}")
        for key in ("call_timeout_s", "start_timeout_s"):
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                fail(key, "must be a number of seconds > 0")
        for key in ("max_shard_retries", "max_restarts"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "must be an integer >= 0")
        if self.memory_gib is not None and (not _is_number(self.memory_gib) or self.memory_gib <= 0):
            fail("memory_gib", "must be a number of GiB > 0 (or null: unknown, not checked)")
        if not _is_int(self.tensor_parallel) or self.tensor_parallel < 1:
            fail("tensor_parallel", "must be an integer >= 1 (devices one actor's engine spans)")
        if self.tensor_parallel > 1 and self.num_gpus not in (0, 1):
            # Ranks of one engine cannot share a GPU (NCCL refuses two ranks on one device).
            fail("num_gpus", "with tensor_parallel > 1 it is per device: 0 (CPU) or 1")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PoolActor:
    """Base class of pooled actors: `ping` for health checks and restart detection, `close` before removal."""

    def ping(self) -> tuple[int, str]:
        """(pid, incarnation id): a new id means Ray restarted this actor since the pool last saw it."""
        return os.getpid(), _INCARNATION

    def close(self) -> None:
        """Release what killing the process would leak (engine processes, process groups); default: nothing."""


def match_torch_threads() -> int:
    """Give torch as many threads as CPUs Ray assigned this actor (at least one): actors that share a node must
    not each start a thread per core."""
    import torch

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    return threads


@dataclass
class Failure:
    """One failed try, kept in `Pool.failures` (logs, metrics, tests)."""

    actor: str
    shard: int | None  # None: not a shard (a call to one actor, a health check, a replay)
    cause: str


@dataclass
class ActorHealth:
    name: str
    state: Literal["ready", "dead"]  # restarting actors are waited for
    pid: int | None
    failures: int  # failures the pool has seen on this actor
    cause: str | None  # the last one


@dataclass
class _Member:
    name: str
    handle: Any
    # check: to be pinged at next_probe; checking: ping or replay in flight; busy: a job in flight
    state: Literal["check", "checking", "ready", "busy", "dead"] = "check"
    pid: int | None = None
    incarnation: str | None = None
    failures: int = 0
    cause: str | None = None
    down_since: float | None = None  # set while restarting: it must be back within start_timeout_s
    next_probe: float = 0.0


@dataclass
class _Job:
    index: int  # position of its result
    method: str
    args: tuple
    pinned: _Member | None = None  # scatter / broadcast: this actor only
    max_retries: int = 0
    survives_death: bool = False  # broadcast with a replay key: a restarted actor replays it anyway
    attempts: list[str] = field(default_factory=list)
    last_actor: str | None = None


@dataclass
class _Call:
    member: _Member
    job: _Job | None  # None: a probe (ping, then replays)
    deadline: float
    refs: list = field(default_factory=list)  # a replay's calls; the last one finishes after the others


class Pool:
    """`config.size` actors of `actor_cls` (a plain class deriving from PoolActor), built with `args`/`kwargs`.

    Calls block the driver and raise PoolError rather than hang; none overlaps another on the same actor.
    """

    def __init__(self, actor_cls: type[PoolActor], config: PoolConfig, *args: Any, **kwargs: Any):
        self.config = config
        self.failures: list[Failure] = []
        self._replay: dict[str, tuple[str, tuple]] = {}
        self._members: list[_Member] = []
        bundle = {key: amount for key, amount in (("CPU", config.num_cpus), ("GPU", config.num_gpus)) if amount}
        # One bundle per actor: the autoscaler sees the whole pool's demand at once.
        self._placement = placement_group([dict(bundle) for _ in range(config.size)], strategy=config.strategy,
                                          name=f"{config.name}-placement")
        try:
            self._start(actor_cls, bundle, args, kwargs)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, actor_cls: type, bundle: dict[str, float], args: tuple, kwargs: dict) -> None:
        config = self.config
        ready, _ = ray.wait([self._placement.ready()], timeout=config.start_timeout_s)
        if not ready:
            raise PoolError(f"pool '{config.name}': {config.size} x {bundle} could not be placed within "
                            f"start_timeout_s={config.start_timeout_s}; free now: {ray.available_resources()} "
                            "(with an autoscaler, nodes are added for pending placement groups)")
        remote_cls = ray.remote(actor_cls)
        for i in range(config.size):
            name = f"{config.name}-{i}"
            bundle_i = PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=i)
            try:
                handle = remote_cls.options(name=name, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                                            max_restarts=config.max_restarts, scheduling_strategy=bundle_i,
                                            ).remote(*args, **kwargs)
            except ValueError as err:  # Ray: the name is taken
                raise PoolError(f"pool '{config.name}': cannot create actor '{name}': {err} (is a pool with this "
                                "name still running?)") from err
            self._members.append(_Member(name, handle))
        pings = [m.handle.ping.remote() for m in self._members]
        ray.wait(pings, num_returns=len(pings), timeout=config.start_timeout_s)
        for member, ping in zip(self._members, pings):
            try:
                member.pid, member.incarnation = ray.get(ping, timeout=0)
            except ray.exceptions.GetTimeoutError:
                raise PoolError(f"pool '{config.name}': actor '{member.name}' did not start within "
                                f"start_timeout_s={config.start_timeout_s}") from None
            except Exception as err:
                raise PoolError(f"pool '{config.name}': actor '{member.name}' failed to start: {_cause(err)}") from err
            member.state = "ready"

    # --- public calls ------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._members]

    @property
    def actors(self) -> list[Any]:
        """The actor handles, for calls outside the pool's dispatch (no timeout, retry or replay then)."""
        return [m.handle for m in self._members]

    def map_shards(self, method: str, shards: Sequence[Any], *args: Any,
                   on_result: Callable[[int, Any], None] | None = None, keep_results: bool = True) -> list[Any]:
        """`actor.method(shard, *args)` for every shard over the pool, one in flight per actor; results in shard
        order.

        Each shard goes to the object store once (retries reuse it). `on_result(index, result)` runs in the
        driver as each shard finishes, in the order they finish (progress, metrics, writing). With
        `keep_results=False` the results are only handed to `on_result` and the list holds None: a stage that
        writes each shard as it comes keeps one shard's results in memory, not the whole stage's.
        """
        refs = [s if isinstance(s, ray.ObjectRef) else ray.put(s) for s in shards]
        jobs = [_Job(i, method, (ref, *args), max_retries=self.config.max_shard_retries) for i, ref in enumerate(refs)]
        return self._drive(jobs, on_result=on_result, keep_results=keep_results)

    def call(self, index: int, method: str, *args: Any) -> Any:
        """`method(*args)` on actor `index` only; no retry."""
        return self._drive([_Job(0, method, args, pinned=self._members[index])])[0]

    def scatter(self, method: str, args_per_actor: Sequence[tuple], settle_s: float | None = None) -> list[Any]:
        """`method(*args_per_actor[i])` on actor i, all at once; no retry (e.g. the ranks of one process group).

        With `settle_s`, a failure waits up to that long for the other actors' calls to end before it raises, and
        the PoolError names every actor that failed, the root cause first: when one rank of a process group is
        killed the others fail too ("connection closed by peer"), and the error that arrives first is not
        necessarily the one that explains the others. No call starts after the first failure.
        """
        if len(args_per_actor) != len(self._members):
            raise ValueError(f"pool '{self.config.name}': {len(args_per_actor)} argument tuples for "
                             f"{len(self._members)} actors")
        return self._drive([_Job(i, method, tuple(args), pinned=m)
                            for i, (m, args) in enumerate(zip(self._members, args_per_actor))], settle_s=settle_s)

    def broadcast(self, method: str, *args: Any, replay_key: str | None = None) -> list[Any]:
        """`method(*args)` on every live actor; results in actor order.

        With `replay_key` the call is also remembered (replacing an earlier one with the same key) and replayed
        on every restarted actor before it takes work: the way to load weights. An actor that dies during the
        call then gets None as its result instead of failing the call; it loads them when it is back.
        """
        if replay_key is not None:
            self._replay[replay_key] = (method, args)
        live = [m for m in self._members if m.state != "dead"]
        return self._drive([_Job(i, method, args, pinned=m, survives_death=replay_key is not None)
                            for i, m in enumerate(live)])

    def remember(self, replay_key: str, method: str, *args: Any) -> None:
        """Replay `method(*args)` on every actor Ray restarts from now on (replacing the call remembered under
        `replay_key`), without calling it now: for state the live actors received another way."""
        self._replay[replay_key] = (method, args)

    def health(self) -> list[ActorHealth]:
        """Ping every actor; a restarting one is waited for (up to start_timeout_s) and given its replays."""
        self._drive([], wait_for_recovery=True)
        return [ActorHealth(m.name, "dead" if m.state == "dead" else "ready", m.pid, m.failures, m.cause)
                for m in self._members]

    def shutdown(self) -> None:
        """Close every actor (a short grace), kill it, and remove the placement group. Safe to call twice."""
        # A restarting actor would answer only after its constructor: nothing to close yet.
        live = [m for m in self._members if m.state != "dead" and m.down_since is None]
        if live:
            closing = [m.handle.close.remote() for m in live]
            ray.wait(closing, num_returns=len(closing), timeout=min(_CLOSE_GRACE_S, self.config.call_timeout_s))
        for member in self._members:
            ray.kill(member.handle, no_restart=True)
        self._members = []
        if self._placement is not None:
            remove_placement_group(self._placement)
            self._placement = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- the event loop behind every call ------------------------------------------------------------------

    def _drive(self, jobs: list[_Job], on_result: Callable[[int, Any], None] | None = None,
               wait_for_recovery: bool = False, settle_s: float | None = None,
               keep_results: bool = True) -> list[Any]:
        """Run `jobs` on the actors until each has a result.

        Every live actor is pinged first (cheap when idle), so one Ray restarted between calls gets its replays
        before any work. A restarting actor is pinged every _PROBE_INTERVAL_S and rejoins when it answers.
        With `settle_s` (scatter), failures are gathered: see `scatter`.
        """
        results: list[Any] = [None] * len(jobs)
        open_jobs = len(jobs)
        queue = deque(jobs)
        running: dict[ray.ObjectRef, _Call] = {}
        errors: list[PoolError] | None = None if settle_s is None else []
        settle_until: float | None = None  # set at the first gathered failure
        for member in self._members:
            if member.state != "dead":
                member.state = "check"
        while True:
            now = time.monotonic()
            for member in self._members:
                if member.state == "check" and member.next_probe <= now:
                    self._probe(member, running, now)
            for member in self._members:
                if not errors and member.state == "ready" and (job := _take(queue, member)) is not None:
                    ref = getattr(member.handle, job.method).remote(*job.args)
                    running[ref] = _Call(member, job, now + self.config.call_timeout_s)
                    member.state = "busy"
                    job.last_actor = member.name
            open_jobs -= self._drop_unrunnable(queue, results, errors)
            if errors:
                settle_until = now + settle_s if settle_until is None else settle_until
                if open_jobs == len(queue) or now >= settle_until:  # every started call has ended, or time is up
                    raise self._gathered_error(errors, running, queue, settle_s)
            recovering = any(m.state in ("check", "checking") for m in self._members)
            if open_jobs == 0 and not (wait_for_recovery and recovering):
                return results
            wake = min([c.deadline for c in running.values()]
                       + [m.next_probe for m in self._members if m.state == "check"]
                       + ([settle_until] if settle_until is not None else []), default=now)
            if running:
                ray.wait(list(running), num_returns=1, timeout=max(0.0, wake - now))
                # Every call that has ended, not only the first: a result that arrived while `on_result` ran (a
                # stage scoring and writing a shard) must not be taken for a hang at its deadline.
                done, _ = ray.wait(list(running), num_returns=len(running), timeout=0, fetch_local=False)
            else:
                time.sleep(max(0.0, wake - now))
                done = []
            now = time.monotonic()
            for ref in done:
                call = running.pop(ref)
                if call.job is None:
                    self._settle_probe(call, ref, running, now)
                elif _gather(errors, self._settle_job, call, ref, queue, results, on_result, now):
                    open_jobs -= 1
                    if not keep_results:
                        results[call.job.index] = None  # on_result has taken it
            for ref, call in list(running.items()):
                if call.deadline <= now:
                    del running[ref]
                    if _gather(errors, self._expire, call, queue, results, now):
                        open_jobs -= 1

    def _probe(self, member: _Member, running: dict, now: float) -> None:
        ref = member.handle.ping.remote()
        # A ping sent while Ray restarts the actor may wait for the new one's constructor (vLLM: ~25 s).
        deadline = (member.down_since + self.config.start_timeout_s if member.down_since is not None
                    else now + self.config.call_timeout_s)
        running[ref] = _Call(member, None, deadline)
        member.state = "checking"

    def _settle_probe(self, call: _Call, ref: ray.ObjectRef, running: dict, now: float) -> None:
        member = call.member
        try:
            value = ray.get(call.refs or ref)
        except RayTaskError as err:  # a replay raised: serving stale weights would be worse than one actor less
            self._bury(member, f"replaying its state failed: {_cause(err)}")
            return
        except RayActorError as err:
            self._down(member, err, now)
            return
        if call.refs:  # the replays are done
            member.state = "ready"
            return
        member.pid, incarnation = value
        restarted = incarnation != member.incarnation
        member.incarnation, member.down_since = incarnation, None
        if restarted and self._replay:
            log.info("pool '%s': actor '%s' restarted (pid %s); replaying %s", self.config.name, member.name,
                     member.pid, ", ".join(self._replay))
            refs = [getattr(member.handle, method).remote(*args) for method, args in self._replay.values()]
            # An actor runs one caller's calls in order: when the last is done, all are.
            running[refs[-1]] = _Call(member, None, now + self.config.call_timeout_s, refs)
        else:
            member.state = "ready"

    def _settle_job(self, call: _Call, ref: ray.ObjectRef, queue: deque, results: list,
                    on_result: Callable[[int, Any], None] | None, now: float) -> bool:
        """True when the job is finished (a result, or a death it survives); raises PoolError on a final failure."""
        member, job = call.member, call.job
        try:
            value = ray.get(ref)
        except RayTaskError as err:
            member.state = "ready"
            raise PoolError(f"pool '{self.config.name}': {self._what(job)} failed on actor '{member.name}': "
                            f"{_cause(err)}") from err
        except RayActorError as err:
            self._down(member, err, now)
            return self._retry(job, member, f"actor died ({_cause(err)})", queue, results, err)
        member.state = "ready"
        results[job.index] = value
        if on_result is not None:
            on_result(job.index, value)
        return True

    def _expire(self, call: _Call, queue: deque, results: list, now: float) -> bool:
        member = call.member
        if call.job is None and not call.refs and member.down_since is not None:
            self._give_up(member)
            return False
        cause = f"no answer within call_timeout_s={self.config.call_timeout_s}"
        log.warning("pool '%s': actor '%s': %s; killing it (Ray restarts it while restarts are left)",
                    self.config.name, member.name, cause)
        ray.kill(member.handle, no_restart=False)  # a hung actor would block every later call
        self._mark_down(member, cause, now)
        if call.job is None:
            self.failures.append(Failure(member.name, None, cause))
            return False
        return self._retry(call.job, member, f"{cause} (actor killed)", queue, results, None)

    def _retry(self, job: _Job, member: _Member, cause: str, queue: deque, results: list,
               err: BaseException | None) -> bool:
        self.failures.append(Failure(member.name, job.index if job.pinned is None else None, cause))
        job.attempts.append(f"actor '{member.name}': {cause}")
        if job.survives_death:
            results[job.index] = None
            return True
        if len(job.attempts) > job.max_retries:
            tries = f"{len(job.attempts)} time(s) (max_shard_retries={job.max_retries})" if job.max_retries else "once"
            raise PoolError(f"pool '{self.config.name}': {self._what(job)} failed {tries}; last on actor "
                            f"'{member.name}': {cause}" + _history(job)) from err
        log.warning("pool '%s': %s failed on actor '%s' (%s); retrying (try %d of %d)", self.config.name,
                    self._what(job), member.name, cause, len(job.attempts) + 1, job.max_retries + 1)
        queue.appendleft(job)
        return False

    def _down(self, member: _Member, err: RayActorError, now: float) -> None:
        """The actor died: gone for good (Ray's restarts used up), or restarting and pinged until it is back."""
        if isinstance(err, ActorDiedError):
            member.failures += member.down_since is None
            self._bury(member, _cause(err))
            return
        self._mark_down(member, _cause(err), now)
        if now - member.down_since > self.config.start_timeout_s:
            self._give_up(member)

    @staticmethod
    def _mark_down(member: _Member, cause: str, now: float) -> None:
        """One failure per down period, with its first cause (pings refused during the restart add none)."""
        if member.down_since is None:
            member.failures += 1
            member.down_since, member.cause = now, cause
        member.state, member.next_probe = "check", now + _PROBE_INTERVAL_S

    def _give_up(self, member: _Member) -> None:
        ray.kill(member.handle, no_restart=True)
        self._bury(member, f"not back within start_timeout_s={self.config.start_timeout_s} ({member.cause})")

    def _bury(self, member: _Member, cause: str) -> None:
        log.error("pool '%s': actor '%s' is out of the pool: %s", self.config.name, member.name, cause)
        member.state, member.cause = "dead", cause
        self.failures.append(Failure(member.name, None, cause))

    def _drop_unrunnable(self, queue: deque, results: list, errors: list[PoolError] | None = None) -> int:
        """Jobs no live actor can run: survivable ones finish with None, the others raise PoolError (or, when
        failures are gathered, add it to `errors`)."""
        dropped = 0
        for job in list(queue):
            owners = [job.pinned] if job.pinned is not None else self._members
            if all(m.state == "dead" for m in owners):
                if not job.survives_death:
                    causes = "; ".join(f"'{m.name}': {m.cause}" for m in owners)
                    error = PoolError(f"pool '{self.config.name}': {self._what(job)} has no live actor left to "
                                      f"run on ({causes})" + _history(job))
                    if errors is None:
                        raise error
                    errors.append(error)
                queue.remove(job)
                results[job.index] = None
                dropped += 1
        return dropped

    def _gathered_error(self, errors: list[PoolError], running: dict, queue: deque, settle_s: float) -> PoolError:
        """One PoolError for a scatter's failures: root causes first (an actor that died or did not answer, before
        one whose own code raised: often a collective that lost that actor), then the calls still running when
        settle_s ran out and those never started."""
        errors = sorted(errors, key=lambda e: isinstance(e.__cause__, RayTaskError))  # stable
        prefix = f"pool '{self.config.name}': "
        parts = [str(errors[0])] + [f"also {str(e).removeprefix(prefix)}" for e in errors[1:]]
        busy = sorted(c.member.name for c in running.values() if c.job is not None)
        if busy:
            parts.append(f"still running {settle_s:g} s after the first failure on "
                         + ", ".join(f"'{name}'" for name in busy))
        unstarted = [job.pinned.name for job in queue if job.pinned is not None]
        if unstarted:
            parts.append("not started on " + ", ".join(f"'{name}'" for name in unstarted))
        if len(parts) == 1:
            return errors[0]
        error = PoolError("; ".join(parts))
        error.__cause__ = errors[0].__cause__
        return error

    @staticmethod
    def _what(job: _Job) -> str:
        return f"{job.method}() call" if job.pinned is not None else f"shard {job.index} ({job.method})"


def _gather(errors: list[PoolError] | None, settle: Callable[..., bool], *args: Any) -> bool:
    """`settle(*args)`: True when its job is finished. When failures are gathered (`errors` is a list), a
    PoolError it raises is kept there and the job counts as finished."""
    try:
        return settle(*args)
    except PoolError as error:
        if errors is None:
            raise
        errors.append(error)
        return True


def _take(queue: deque, member: _Member) -> _Job | None:
    """The first job this actor may run, preferring one that did not just fail on it."""
    mine = [job for job in queue if job.pinned in (None, member)]
    job = next((j for j in mine if j.last_actor != member.name), mine[0] if mine else None)
    if job is not None:
        queue.remove(job)
    return job


def _history(job: _Job) -> str:
    return f" [tries: {'; '.join(job.attempts)}]" if len(job.attempts) > 1 else ""


def _cause(err: BaseException) -> str:
    """One line: the remote exception for a task error or a failed constructor; Ray's first and last lines
    (what happened, the worker's exit detail) for a dead actor."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    if getattr(err, "actor_init_failed", False):
        text = f"its constructor raised {lines[-1]}"
    else:
        text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:400]}"
