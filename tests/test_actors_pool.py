"""The pool helper on real Ray with light actors: failures are real (actors exit mid-call, get SIGKILL, or sleep
past the call timeout), restarts are Ray's.

This module imports little: Ray workers import it to unpickle the actor class, on every (re)start.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import ray

from actors.pool import Pool, PoolActor, PoolConfig, PoolError

LIGHT = dict(num_cpus=0.25, call_timeout_s=30.0, start_timeout_s=30.0)


class Worker(PoolActor):
    def __init__(self) -> None:
        self.value: int | None = None

    def work(self, shard: int, poison: int | None = None, hang: int | None = None, bug: int | None = None) -> int:
        if shard == poison:
            os._exit(1)  # what a segfault or the OOM killer does to the worker, on this shard every time
        if shard == hang:
            time.sleep(3600)
        if shard == bug:
            raise ValueError(f"bad shard {shard}")
        return shard * 10

    def set_value(self, value: int) -> None:
        self.value = value

    def get_value(self, _shard: int) -> int | None:
        return self.value


class Broken(PoolActor):
    def __init__(self) -> None:
        raise RuntimeError("no such model folder")


@pytest.fixture(scope="module")
def workers(ray_session):
    with Pool(Worker, PoolConfig("workers", size=2, **LIGHT)) as pool:
        yield pool


# --- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(name="bad name"), "pool name 'bad name'"),
    (dict(size=0), "size = 0: must be an integer >= 1"),
    (dict(num_cpus=-1), "num_cpus = -1: must be a number >= 0"),
    (dict(num_cpus=0), "an actor needs some CPU or GPU"),
    (dict(num_gpus=1.5), "num_gpus = 1.5: above 1 it must be a whole number"),
    (dict(strategy="STRICT"), "strategy = 'STRICT': must be one of PACK, SPREAD"),
    (dict(call_timeout_s=0), "call_timeout_s = 0: must be a number of seconds > 0"),
    (dict(max_shard_retries=-1), "max_shard_retries = -1: must be an integer >= 0"),
    (dict(max_restarts=1.5), "max_restarts = 1.5: must be an integer >= 0"),
])
def test_pool_config_is_validated_with_the_key_in_the_message(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        PoolConfig(**{"name": "gen", **overrides})


def test_unplaceable_pool_fails_after_start_timeout(ray_session):
    with pytest.raises(PoolError, match=r"pool 'huge': 1 x \{'CPU': 64\} could not be placed within start_timeout_s=1"):
        Pool(Worker, PoolConfig("huge", num_cpus=64, start_timeout_s=1))
    assert _placement_state("huge-placement") == "REMOVED"


def test_constructor_error_names_the_actor_and_the_cause(ray_session):
    with pytest.raises(PoolError, match=r"actor 'broken-0' failed to start: .*RuntimeError: no such model folder"):
        Pool(Broken, PoolConfig("broken", max_restarts=0, **LIGHT))
    with pytest.raises(ValueError):  # shut down: the name is free again
        ray.get_actor("broken-0")


# --- dispatch ------------------------------------------------------------------------------------------------

def test_map_shards_returns_results_in_shard_order_from_named_actors(workers):
    finished = []
    assert workers.map_shards("work", range(9), on_result=lambda i, r: finished.append(i)) == [10 * i for i in range(9)]
    assert sorted(finished) == list(range(9))
    assert workers.names == ["workers-0", "workers-1"]
    assert ray.get(ray.get_actor("workers-1").work.remote(4), timeout=10) == 40  # visible by name (dashboard)
    health = workers.health()
    assert [h.state for h in health] == ["ready", "ready"] and len({h.pid for h in health}) == 2


def test_an_error_raised_by_the_actor_fails_the_call_at_once(workers):
    with pytest.raises(PoolError, match=r"pool 'workers': shard 2 \(work\) failed on actor 'workers-\d': "
                                        r"ValueError: bad shard 2"):
        workers.map_shards("work", range(4), None, None, 2)
    assert workers.failures == []  # not retried: the same input would fail the same way
    assert workers.map_shards("work", [5]) == [50]


def test_a_shard_that_keeps_killing_its_actor_ends_in_pool_error(ray_session):
    config = PoolConfig("poison", size=2, max_shard_retries=2, max_restarts=3, **LIGHT)
    with Pool(Worker, config) as pool:
        with pytest.raises(PoolError) as raised:
            pool.map_shards("work", range(6), 4)
        message = str(raised.value)
        assert "pool 'poison': shard 4 (work) failed 3 time(s) (max_shard_retries=2)" in message
        assert "last on actor 'poison-" in message and "actor died" in message
        assert message.count("actor 'poison-") == 4  # the last try, then all three in the history
        # retried on the other actor first, not on the one it just killed
        tries = [f.actor for f in pool.failures if f.shard == 4]
        assert len(tries) == 3 and tries[0] != tries[1]
        assert pool.map_shards("work", [1, 2, 3]) == [10, 20, 30]  # the restarted actors work again


def test_a_hanging_call_times_out_and_its_actor_is_restarted(ray_session):
    config = PoolConfig("hang", size=1, max_shard_retries=1, max_restarts=2, **{**LIGHT, "call_timeout_s": 1.5})
    with Pool(Worker, config) as pool:
        start = time.monotonic()
        with pytest.raises(PoolError, match=r"shard 1 \(work\) failed 2 time\(s\) \(max_shard_retries=1\); last on "
                                            r"actor 'hang-0': no answer within call_timeout_s=1\.5 \(actor killed\)"):
            pool.map_shards("work", [0, 1, 2], None, 1)
        assert time.monotonic() - start < 20
        [health] = pool.health()
        assert health.state == "ready" and health.failures == 2
        assert pool.map_shards("work", [0, 2]) == [0, 20]


class Teammate(PoolActor):
    """An actor of a team (like the ranks of one process group) that fails in its own way, a moment after starting
    (so every member's call has started)."""

    def act(self, how: str) -> str:
        time.sleep(0.5)
        if how == "raise":
            raise ValueError("lost my peer")
        if how == "die":
            os._exit(1)
        if how == "hang":
            time.sleep(3600)
        return how


def test_scatter_with_settle_names_every_failed_actor_the_root_cause_first(ray_session):
    """The trainer group's mode: actor 0 raises, actor 1 dies, actor 2 hangs, actor 3 finishes. The call waits
    settle_s for the others after the first failure, then one PoolError names the three, the death first."""
    config = PoolConfig("settle", size=4, **{**LIGHT, "num_cpus": 0.1, "call_timeout_s": 7.0})
    with Pool(Teammate, config) as pool:
        start = time.monotonic()
        with pytest.raises(PoolError) as raised:
            pool.scatter("act", [("raise",), ("die",), ("hang",), ("finish",)], settle_s=4.0)
        assert time.monotonic() - start < 6.5  # settle_s after the first failure, not the hung call's timeout
        assert re.fullmatch(r"pool 'settle': act\(\) call failed once; last on actor 'settle-1': actor died \(.+\); "
                            r"also act\(\) call failed on actor 'settle-0': ValueError: lost my peer; "
                            r"still running 4 s after the first failure on 'settle-2'", str(raised.value)), raised.value


def test_a_restarted_actor_replays_the_remembered_calls_before_new_work(ray_session):
    with Pool(Worker, PoolConfig("replay", size=1, **LIGHT)) as pool:
        assert pool.broadcast("set_value", 7, replay_key="value") == [None]
        pool.broadcast("set_value", 8)  # not remembered: lost with the process
        [before] = pool.health()
        os.kill(before.pid, signal.SIGKILL)
        assert pool.map_shards("get_value", [0]) == [7]
        [after] = pool.health()
        assert after.pid != before.pid and after.state == "ready"


def test_shutdown_removes_the_actors_and_the_placement_group(ray_session):
    pool = Pool(Worker, PoolConfig("gone", size=2, **LIGHT))
    handle = ray.get_actor("gone-0")
    pool.shutdown()
    pool.shutdown()  # twice is harmless
    with pytest.raises(ValueError):
        ray.get_actor("gone-0")
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.ping.remote(), timeout=30)
    assert _placement_state("gone-placement") == "REMOVED"


def _placement_state(name: str) -> str:
    [state] = [pg["state"] for pg in ray.util.placement_group_table().values() if pg["name"] == name][-1:]
    return state
