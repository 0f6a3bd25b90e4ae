"""The placement plan (pipeline/cluster/placement.py): every phase's pools against the cluster's GPUs, the 7B recipe on
one 8-GPU node and the 70B recipe within the launchers' maximum, the one-line refusal before any actor starts, pools
released on demand (pipeline/cluster/reservations.py, Pools) and colocated generators (pipeline/cluster/colocate.py).
The layouts are placed for real on a fake 8-GPU Ray node (logical GPUs, no vLLM) in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import tiny_config
from pipeline.cluster.pools import Pools
from pipeline.cluster.colocate import asleep
from pipeline.config.run import ConfigError, compose_run
from pipeline.cluster.plan import PlanError, check_plan, main, placement_of
from pipeline.cluster.reservations import Capacity, Ledger, Reservation
from process_helpers import end_session

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def no_ray_job(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a Ray job's driver would plan against max_gpus instead


def recipe(llama2: dict[str, str], size: str, *extra: str) -> list[str]:
    if size == "7b":
        return ["experiment=llama2-7b", f"base_models.llama7b={llama2['7b']}", *extra]
    return ["experiment=llama2-70b", f"base_models.llama7b={llama2['7b']}", f"base_models.llama70b={llama2['70b']}",
            *extra]


def gpus(layout) -> dict[str, float]:
    return {name: pool.reservation.gpus for name, pool in layout.pools.items()}


def phase_gpus(layout) -> dict[str, float]:
    return {phase.name: layout.needs(phase).gpus for phase in layout.phases}


def test_llama2_7b_places_on_gpu_node(llama2):
    """11 GPUs for every pool at once; the largest phase, PPO, takes the node's 8, the judge's 3 come from pools
    the judging does not use."""
    layout = placement_of(compose_run(*recipe(llama2, "7b")))
    assert layout.capacity.gpus == 8 and not layout.shortfalls()
    assert gpus(layout) == {"generator-llama7b": 3, "scorer": 1, "trainer": 4, "generator-judge": 3}
    assert layout.all_at_once().gpus == 11
    assert phase_gpus(layout)["ppo"] == 8 and phase_gpus(layout)["llm judge"] == 3
    check_plan(compose_run(*recipe(llama2, "7b")), [])


def test_llama2_70b_places_within_the_launchers_maximum(llama2):
    """40 GPUs (KubeRay's 5 x 8; the cluster launcher's 6 x 8 is 48): 56 for every pool at once, 36 for PPO; the
    judge's small model spans one of the 4 devices a 70B engine does, and reserves only that."""
    layout = placement_of(compose_run(*recipe(llama2, "70b")))
    assert (layout.capacity.gpus, layout.capacity.gpus_key) == (40, "cluster.max_gpus") and not layout.shortfalls()
    assert gpus(layout) == {"generator-llama7b": 16, "generator-llama70b": 16, "scorer": 4, "trainer": 16,
                            "generator-judge": 4}
    assert layout.pools["generator-judge"].tensor_parallel == 1 and layout.pools["generator-llama70b"].gpus_each == 4
    assert layout.all_at_once().gpus == 56 and max(phase_gpus(layout).values()) == phase_gpus(layout)["ppo"] == 36
    check_plan(compose_run(*recipe(llama2, "70b")), [])


def test_an_over_asking_phase_is_refused_in_one_line(llama2):
    config = compose_run(*recipe(llama2, "7b", "cluster.generator.size=5"))
    with pytest.raises(PlanError) as refused:
        check_plan(config, ["experiment=llama2-7b"])
    assert str(refused.value) == ("placement: phase 'ppo' needs 10 GPUs (generator-llama7b 5, scorer 1, trainer 4), "
                                  "the cluster has 8 (cluster.num_gpus; 2 short); see python -m pipeline.cluster.plan "
                                  "experiment=llama2-7b")
    config = compose_run(*recipe(llama2, "70b", "cluster.max_gpus=32"))
    with pytest.raises(PlanError, match=r"^placement: phase 'ppo' needs 36 GPUs \(generator-llama70b 16, scorer 4, "
                                        r"trainer 16\), the cluster has 32 \(cluster.max_gpus; 4 short\); see "):
        check_plan(config, [])


def test_the_driver_refuses_before_ray_starts(llama2, monkeypatch, capsys, tmp_path):
    import pipeline.driver.main as driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started although the placement does not fit")

    monkeypatch.setattr(driver, "connect", no_ray)
    monkeypatch.setattr(sys, "argv", ["pipeline", *recipe(llama2, "7b", "cluster.trainer.size=8"),
                                      f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    with pytest.raises(SystemExit) as exited:
        driver.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1
    assert err[0].startswith("config error: placement: phase 'ppo' needs 12 GPUs (generator-llama7b 3, scorer 1, "
                             "trainer 8), the cluster has 8 (cluster.num_gpus; 4 short)")


def test_the_cli_prints_both_layouts(llama2, capsys):
    assert main(recipe(llama2, "7b")) == 0
    out = capsys.readouterr().out
    assert "placement (capacity: GPUs 8 (cluster.num_gpus)" in out and "the largest phase, 'ppo', takes 8 GPUs" in out
    assert main(recipe(llama2, "70b", "cluster.max_gpus=32")) == 1
    assert "placement: phase 'ppo' needs 36 GPUs" in capsys.readouterr().err


def test_the_local_cpu_default_holds_every_pool_at_once():
    config = compose_run()
    layout = placement_of(config)
    assert layout.capacity.gpus is None and layout.capacity.cpus == 10 and layout.all_at_once().cpus == 10
    assert not layout.capacity.short(layout.all_at_once())  # so Pools never releases one (no engine restart)
    check_plan(config, [])


@pytest.mark.parametrize("overrides, message", [
    (["cluster.colocate=true"], r"cluster.colocate = true: vLLM's sleep mode, which frees the trainers' GPUs, needs "
                                r"CUDA, and this cluster has no GPU to share \(cluster.generator.num_gpus = 0, "
                                r"cluster.trainer.num_gpus = 0\); colocate is for GPU clusters"),
    (["cluster=gpu-node", "cluster.colocate=true", "cluster.generator.tensor_parallel=2"],
     r"each generator actor shares one trainer rank's GPU: set cluster.generator.num_gpus = 1, "
     r"cluster.generator.tensor_parallel = 1"),
])
def test_colocate_is_refused_where_it_cannot_share(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(*overrides)


def test_colocated_generators_count_the_trainers_gpus_once(llama2):
    layout = placement_of(compose_run(*recipe(llama2, "7b", "cluster.colocate=true")))
    assert not layout.shortfalls() and layout.capacity.shared == 4
    assert gpus(layout) == {"generator-llama7b": 0, "scorer": 1, "trainer": 4, "generator-judge": 0}
    ppo = next(phase for phase in layout.phases if phase.name == "ppo")
    assert (layout.needs(ppo).gpus, layout.needs(ppo).shared) == (5, 3)  # 3 GPUs freed on the node
    sampling = next(phase for phase in layout.phases if phase.name == "sampling llama7b")
    assert "trainer" in sampling.pools  # the group holds the generators' GPUs whenever they sample
    crowded = placement_of(compose_run(*recipe(llama2, "7b", "cluster.colocate=true", "cluster.generator.size=5")))
    assert crowded.shortfalls()[0][1][0].key == "cluster.trainer.size"  # one generator per rank


def test_the_ledger_releases_the_judge_first_then_the_least_recently_used():
    ledger = Ledger(Capacity(gpus=8), first=["generator-judge"])
    for name, gpus_held in (("trainer", 4), ("generator-llama7b", 3), ("scorer", 1)):
        ledger.use(name, Reservation(gpus=gpus_held))
    assert ledger.to_release(Reservation(gpus=3)) == ["trainer"]  # the judge's 3 after SFT, sampling and scoring
    ledger.drop("trainer")
    ledger.use("generator-judge", Reservation(gpus=3))
    assert ledger.to_release(Reservation(gpus=4)) == ["generator-judge"]  # the next round's reward models
    ledger.use("generator-llama7b")  # used again: the most recent
    assert ledger.to_release(Reservation(gpus=8)) == ["generator-judge", "scorer", "generator-llama7b"]
    pinned = Ledger(Capacity(gpus=8, cpus=100), pinned=["trainer"])
    pinned.use("trainer", Reservation(gpus=4))
    pinned.use("scorer", Reservation(gpus=1, cpus=4))
    pinned.use("generator-llama7b", Reservation(cpus=12, shared=3))
    assert pinned.to_release(Reservation(gpus=4)) == ["scorer"]  # never the trainers; only what holds GPUs
    assert Ledger(Capacity()).to_release(Reservation(gpus=100, cpus=100)) == []  # nothing known: nothing released


class FakePool:
    """Stands in for actors.pool.Pool and the trainer group: records starts and shutdowns."""

    events: ClassVar[list[str]] = []

    def __init__(self, actor_cls, config, *args):
        self.config, self.world_size = config, config.size
        FakePool.events.append(f"start {config.name}")

    def broadcast(self, method, *args, **kwargs):
        FakePool.events.append(f"{method} {self.config.name}")
        return [0.0] * self.config.size

    def shutdown(self):
        FakePool.events.append(f"release {self.config.name}")


@pytest.fixture
def fake_pools(monkeypatch, tmp_path):
    import actors.trainer
    import pipeline.cluster.pools

    FakePool.events = []
    monkeypatch.setattr(pipeline.cluster.pools, "Pool", FakePool)
    monkeypatch.setattr(actors.trainer, "TrainerGroup", lambda config: FakePool(None, config))
    monkeypatch.setattr(pipeline.cluster.pools, "ColocatedTrainers", lambda config, generators: FakePool(None, config))
    tiny_config().save(tmp_path)
    return tmp_path


def one_round(pools: Pools, checkpoint: Path) -> None:
    """The pools the 7B recipe asks for, in order: SFT, its evaluation, a round (reward models, rejection
    sampling, fine-tune, PPO, evaluation, win rates, the judge), then the next round's reward models."""
    for ask in ("trainer", "generator", "trainer", "generator", "scorer", "trainer", "generator", "scorer", "trainer",
                "generator", "scorer", "judge", "trainer"):
        if ask == "trainer":
            pools.trainers()
        elif ask == "scorer":
            pools.scorer(checkpoint, checkpoint)
        else:
            pools.generator("llama7b" if ask == "generator" else "judge", checkpoint, 64)


def test_pools_release_on_demand_on_gpu_node(fake_pools):
    """gpu-node's 8 GPUs: the judge takes the idle trainers' devices, and gives its own back for the next round's
    reward models; the generators and the scorer are never restarted."""
    config = compose_run("cluster=gpu-node", "cluster.trainer.size=4", "cluster.generator.size=3").cluster
    with Pools(config) as pools:
        one_round(pools, fake_pools)
        assert [e for e in FakePool.events if not e.startswith("load")] == [
            "start trainer", "start generator-llama7b", "start scorer", "release trainer", "start generator-judge",
            "release generator-judge", "start trainer"]


def test_the_cpu_default_never_releases(fake_pools):
    with Pools(compose_run().cluster) as pools:
        one_round(pools, fake_pools)
        assert not [e for e in FakePool.events if e.startswith("release")]  # every pool stays up, as before


def test_colocated_generators_start_after_the_trainers_and_sleep_while_they_run(fake_pools):
    config = compose_run("cluster=gpu-node", "cluster.colocate=true").cluster
    with Pools(config) as pools:
        pools.generator("llama7b", fake_pools, 64)
        assert FakePool.events == ["start trainer", "start generator-llama7b"]  # Ray's best fit pairs them
        assert pools._generators["llama7b"][0].config.num_gpus == 0.49
    FakePool.events = []
    generators = [FakePool(None, config.generator)]
    with pytest.raises(RuntimeError), asleep(generators):
        raise RuntimeError("a trainer run failed")
    assert FakePool.events == ["start generator", "sleep generator", "wake_up generator"]  # awake again regardless


def test_a_colocated_group_keeps_the_engines_awake_for_a_collective_sync(monkeypatch):
    """Training runs put the generators to sleep; the weight group's runs need them awake to receive."""
    from actors.pool import PoolConfig
    from actors.trainer import TrainerGroup, export_state, join_state_weight_group, send_state_weights
    from pipeline.cluster.colocate import ColocatedTrainers

    monkeypatch.setattr(TrainerGroup, "__init__", lambda self, config: None)
    monkeypatch.setattr(TrainerGroup, "run", lambda self, loop_fn, payloads: [loop_fn.__name__])
    FakePool.events = []
    generators = [FakePool(None, PoolConfig("generator"))]
    group = ColocatedTrainers(PoolConfig("trainer"), lambda: generators)
    assert [group.run(fn, [None]) for fn in (join_state_weight_group, send_state_weights, export_state)] == [
        ["join_state_weight_group"], ["send_state_weights"], ["export_state"]]
    assert FakePool.events == ["start generator", "sleep generator", "wake_up generator"]  # around export_state only


def fake_gpu_node(folder: str) -> dict:
    """On a fake 8-GPU Ray node: the 7B recipe's pools placed phase after phase for two rounds, releasing as Pools
    does; the over-asking layout refused before any placement group exists (and Ray indeed cannot place its PPO
    phase); colocated generators (light actors in real Pools' pools) on the trainer ranks' GPUs."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from actors.pool import Pool, PoolActor
    from pipeline.cluster.pools import generator_pool_config, pools_ledger
    from pipeline.cluster.colocate import TRAINER_SHARE, colocated

    ray.init(num_cpus=64, num_gpus=8, include_dashboard=False, object_store_memory=100 * 1024**2)
    out: dict = {"released": [], "pending": []}
    config = compose_run(*recipe({"7b": folder}, "7b"))
    layout = placement_of(config)
    ledger, groups = pools_ledger(config.cluster), {}

    def bundles(layout, name: str) -> list[dict]:  # as actors.pool.Pool asks: one bundle per actor
        pool = layout.pools[name]
        return [{"CPU": pool.reservation.cpus / pool.actors, "GPU": pool.gpus_each}] * pool.actors

    for phase in layout.phases * 2:
        for name in phase.pools:
            if name not in groups:
                for released in ledger.to_release(layout.pools[name].reservation):
                    remove_placement_group(groups.pop(released))
                    ledger.drop(released)
                    out["released"].append(f"{released} for {name}")
                groups[name] = placement_group(bundles(layout, name), strategy="PACK")
                if not groups[name].wait(10):
                    out["pending"].append(f"{phase.name}: {name}")
            ledger.use(name, layout.pools[name].reservation)
    for group in groups.values():
        remove_placement_group(group)

    over = compose_run(*recipe({"7b": folder}, "7b", "cluster.generator.size=5"))
    before = len(placement_group_table())
    try:
        check_plan(over, [])
    except PlanError as err:
        out["refused"], out["groups_made"] = str(err), len(placement_group_table()) - before
    over_layout = placement_of(over)
    ppo = next(phase for phase in over_layout.phases if phase.name == "ppo")
    groups = {name: placement_group(bundles(over_layout, name), strategy="PACK") for name in ppo.pools}
    out["over_asking_ppo_placed"] = {name: group.wait(2) for name, group in groups.items()}
    for group in groups.values():
        remove_placement_group(group)

    class GpuIds(PoolActor):
        def __init__(self, *args):
            pass

        def ids(self) -> list[int]:
            return [int(i) for i in ray.get_gpu_ids()]

    shared = compose_run(*recipe({"7b": folder}, "7b", "cluster.colocate=true")).cluster
    with Pool(GpuIds, colocated(shared.trainer, TRAINER_SHARE)) as trainers, \
            Pool(GpuIds, generator_pool_config(shared, "generator-llama7b", 1)) as generators:
        out["trainer_gpus"] = [trainers.call(i, "ids") for i in range(shared.trainer.size)]
        out["generator_gpus"] = [generators.call(i, "ids") for i in range(shared.generator.size)]
    ray.shutdown()
    return out


def test_the_plans_place_on_a_fake_8_gpu_node(llama2):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    env.pop("RAY_ADDRESS", None)
    code = f"import json, test_placement as t; print('RESULT', json.dumps(t.fake_gpu_node({llama2['7b']!r})))"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=TESTS, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=120)
    finally:
        end_session(child.pid)  # Ray's processes of that run, if any are left
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, output[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["pending"] == []  # every phase placed, twice over
    assert "generator-judge for generator-judge" not in out["released"]
    assert out["released"][:2] == ["trainer for generator-judge", "generator-judge for trainer"]
    assert out["refused"].startswith("placement: phase 'ppo' needs 10 GPUs") and out["groups_made"] == 0
    assert not all(out["over_asking_ppo_placed"].values())  # what the plan refused, Ray cannot place either
    trainer_gpus = [ids[0] for ids in out["trainer_gpus"]]
    generator_gpus = [ids[0] for ids in out["generator_gpus"]]
    assert len(set(trainer_gpus)) == 4 and len(set(generator_gpus)) == 3 and set(generator_gpus) <= set(trainer_gpus)
