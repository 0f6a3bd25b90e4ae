"""Where the pools run: connecting to Ray (the `cluster` config group) and the driver's pools, started on demand.

`conf/cluster/local.yaml` starts a Ray instance on this machine; `gpu-node` sizes the pools for one 8-GPU node;
`multi-node` joins a running cluster (`address: auto`, or the driver runs as a Ray job and Ray sets RAY_ADDRESS).

The driver runs one stage at a time, so on one machine the pools take turns on the same cores: `num_cpus` is the
number of *logical* CPUs the local Ray instance advertises, enough for every pool's reservation at once, while
torch and vLLM in each actor use the cores the pool asks for (`match_torch_threads`). On a real cluster each pool
reserves what it needs and the autoscaler adds nodes for reservations that do not fit.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from actors.pool import Pool, PoolConfig
from actors.vllm_engine import EngineConfig, engine_tensor_parallel
from model.config import ModelConfig
from pipeline.cluster.colocate import GENERATOR_SHARE, ColocatedTrainers, colocated
from pipeline.cluster.reservations import Ledger, Reservation, capacity_of
from pipeline.cluster.weight_sync import MODES as WEIGHT_SYNC_MODES
from pipeline.cluster.weight_sync import WeightSync

log = logging.getLogger(__name__)
JUDGE = "judge"  # the LLM judge's generator pool is generator-judge (pipeline.driver.main)


def _pool(name: str, **settings: Any) -> Callable[[], PoolConfig]:
    return lambda: PoolConfig(name, **settings)


@dataclass
class ClusterConfig:
    # null: start a new local Ray instance (unless RAY_ADDRESS is set, as in a Ray job); "auto" (the cluster
    # `ray start` made here) or "host:port": join
    address: str | None = None
    num_cpus: int | None = 10  # logical CPUs of a local instance (see the module doc); null: Ray counts the cores
    # Of a local instance; null: Ray counts them (and the placement plan checks none).
    num_gpus: int | None = None
    # GPUs of a running cluster, or the most its autoscaler adds (the launcher's max workers x GPUs per node): every
    # phase of the run must fit (pipeline/cluster/placement.py) and pools are released to stay within it; null: not
    # checked.
    max_gpus: int | None = None
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"  # never another interface unless configured
    dashboard_port: int = 8265
    object_store_gib: float = 1.0  # of a local instance
    # One generator pool per policy size (named generator-<size>), one scorer pool, one trainer group.
    generator: PoolConfig = field(default_factory=_pool("generator", num_cpus=2))
    scorer: PoolConfig = field(default_factory=_pool("scorer", num_cpus=2))
    trainer: PoolConfig = field(default_factory=_pool("trainer", num_cpus=2, call_timeout_s=3600))
    engine: EngineConfig = field(default_factory=EngineConfig)  # max_model_len: set per model from its context
    prompts_per_shard: int = 64  # generation work unit: a failed shard is retried, not the whole stage
    # Generators share the trainers' GPUs and sleep (vLLM sleep mode, CUDA only) while the trainers run.
    colocate: bool = False
    # How a trainer's model reaches the generators every PPO iteration (pipeline.cluster.weight_sync): collective |
    # object_store | folder; the collective's bucket size.
    weight_sync: str = "object_store"
    weight_bucket_mib: float = 512

    def __post_init__(self) -> None:
        errors = []
        if self.address is not None and not self.address:
            errors.append("cluster.address = '': use null (local) or 'auto' or 'host:port'")
        if self.num_cpus is not None and self.num_cpus < 1:
            errors.append(f"cluster.num_cpus = {self.num_cpus}: must be >= 1 (or null)")
        if self.num_gpus is not None and self.num_gpus < 0:
            errors.append(f"cluster.num_gpus = {self.num_gpus}: must be >= 0 (or null)")
        if self.max_gpus is not None and self.max_gpus < 1:
            errors.append(f"cluster.max_gpus = {self.max_gpus}: must be >= 1 (or null: not checked)")
        errors += self._colocate_problems()
        if not 0 < self.dashboard_port < 65536:
            errors.append(f"cluster.dashboard_port = {self.dashboard_port}: must be a TCP port")
        if self.object_store_gib <= 0:
            errors.append(f"cluster.object_store_gib = {self.object_store_gib}: must be > 0")
        if self.weight_sync not in WEIGHT_SYNC_MODES:
            errors.append(f"cluster.weight_sync = {self.weight_sync!r}: must be one of "
                          f"{', '.join(WEIGHT_SYNC_MODES)}")
        if self.weight_bucket_mib <= 0:
            errors.append(f"cluster.weight_bucket_mib = {self.weight_bucket_mib}: must be > 0")
        if self.prompts_per_shard < 1:
            errors.append(f"cluster.prompts_per_shard = {self.prompts_per_shard}: must be >= 1")
        if self.engine.tensor_parallel_size != 1:  # one knob: the pool's, which also sizes its GPU reservation
            errors.append(f"cluster.engine.tensor_parallel_size = {self.engine.tensor_parallel_size}: set "
                          "cluster.generator.tensor_parallel instead")
        if errors:
            raise ValueError("\n".join(errors))

    def _colocate_problems(self) -> list[str]:
        if not self.colocate:
            return []
        gpus = {"cluster.num_gpus": self.num_gpus, "cluster.generator.num_gpus": self.generator.num_gpus,
                "cluster.trainer.num_gpus": self.trainer.num_gpus}
        none = [f"{key} = {value:g}" for key, value in gpus.items() if value == 0]
        if none:
            return [f"cluster.colocate = true: vLLM's sleep mode, which frees the trainers' GPUs, needs CUDA, and this "
                    f"cluster has no GPU to share ({', '.join(none)}); colocate is for GPU clusters"]
        if self.generator.num_gpus != 1 or self.trainer.num_gpus != 1 or self.generator.tensor_parallel != 1:
            return ["cluster.colocate = true: each generator actor shares one trainer rank's GPU: set "
                    "cluster.generator.num_gpus = 1, cluster.generator.tensor_parallel = 1 and cluster.trainer.num_gpus"
                    f" = 1 (they are {self.generator.num_gpus:g}, {self.generator.tensor_parallel}, "
                    f"{self.trainer.num_gpus:g})"]
        return []

    def check_fits(self, generator_pools: int) -> None:
        """A local instance must hold every pool's reservation at once (they stay up for the whole run)."""
        if self.address is not None or os.environ.get("RAY_ADDRESS") or self.num_cpus is None:
            return
        pools = [self.generator] * generator_pools + [self.scorer] + [self.trainer]
        wanted = sum(p.size * p.num_cpus for p in pools)
        if wanted > self.num_cpus:
            raise ValueError(f"cluster.num_cpus = {self.num_cpus}: the pools reserve {wanted:g} CPUs "
                             f"({generator_pools} generator pool(s), the scorer and the trainer group); raise it "
                             "or lower cluster.<pool>.num_cpus")


def engine_pool_config(pool: PoolConfig, name: str, degree: int | None = None) -> PoolConfig:
    """`pool` as Ray reserves it for actors that each own a `degree`-device engine (default: the pool's
    `tensor_parallel`; a small judge's engine spans fewer): a GPU per rank (the actor's CUDA_VISIBLE_DEVICES then
    lists them all for vLLM's workers), CPUs per actor. The result describes whole actors, so its tensor_parallel
    is 1."""
    degree = pool.tensor_parallel if degree is None else degree
    return replace(pool, name=name, num_gpus=pool.num_gpus * degree, tensor_parallel=1)


def generator_pool_name(config: ClusterConfig, size: str) -> str:
    return f"{config.generator.name}-{size}"


def generator_reservation(config: ClusterConfig, degree: int) -> Reservation:
    """What one generator pool of `degree`-device engines holds (the trainers' GPUs when colocated)."""
    return Reservation.of(engine_pool_config(config.generator, config.generator.name, degree), config.colocate)


def generator_pool_config(config: ClusterConfig, name: str, degree: int) -> PoolConfig:
    """The generator pool `name` as it starts: `engine_pool_config`, or beside the trainer ranks when colocated."""
    pool = engine_pool_config(config.generator, name, degree)
    return colocated(pool, GENERATOR_SHARE) if config.colocate else pool


def generator_engine_config(config: ClusterConfig, max_model_len: int,
                            model: ModelConfig | None = None) -> EngineConfig:
    """The engine of one generator actor: the cluster's engine settings, spanning the pool's devices (those the
    served `model` splits over: actors.vllm_engine.engine_tensor_parallel)."""
    degree = config.generator.tensor_parallel
    if model is not None:
        degree = engine_tensor_parallel(degree, model)
    return replace(config.engine, max_model_len=max_model_len, tensor_parallel_size=degree,
                   sleep_mode=config.colocate)


def connect(config: ClusterConfig) -> dict[str, Any]:
    """ray.init for this config; returns what the driver prints (dashboard URL, resources)."""
    import ray

    from pipeline.output.progress import worker_runtime_env

    if ray.is_initialized():
        return {"dashboard": None, "resources": ray.cluster_resources()}
    runtime_env = worker_runtime_env()  # live progress bars in actors only when this console is a terminal
    if config.address is not None or os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=config.address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # "local": a new instance even when `ray start` left one running here (join that with address=auto).
        context = ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                           include_dashboard=config.dashboard, dashboard_host=config.dashboard_host,
                           dashboard_port=config.dashboard_port,
                           object_store_memory=int(config.object_store_gib * 1024**3), runtime_env=runtime_env)
    return {"dashboard": context.dashboard_url or None, "resources": ray.cluster_resources()}


def pools_ledger(config: ClusterConfig) -> Ledger:
    """What the pools hold within the cluster's capacity: the judge's pool is released first; with colocate the
    trainer group never is (the generators' GPUs are its own)."""
    return Ledger(capacity_of(config), first=[generator_pool_name(config, JUDGE)],
                  pinned=[config.trainer.name] if config.colocate else [])


class Pools:
    """The driver's pools, each started the first time a stage needs it and kept until `shutdown` or until a pool
    that does not fit beside it within the cluster's capacity needs its devices (pipeline/cluster/reservations.py): a
    run whose stages all come from the store starts no actor."""

    def __init__(self, config: ClusterConfig, scratch: Path | None = None):
        """`scratch`: where `cluster.weight_sync: folder` writes (a temporary folder when None; other nodes read it
        only on a shared filesystem)."""
        self.config = config
        self._scratch = Path(scratch) if scratch is not None else Path(tempfile.gettempdir()) / f"pools-{os.getpid()}"
        self._syncs: dict[str, WeightSync] = {}  # per policy size: how it receives the trainers' model
        # per policy size: (pool, folder it serves; None after weights pushed from memory)
        self._generators: dict[str, tuple[Pool, Path | None]] = {}
        self._trainers = None
        self._scorer: tuple[Pool, dict[str, Path]] | None = None  # (pool, {"help": folder, "safe": folder})
        self._ledger = pools_ledger(config)

    def generator(self, size: str, checkpoint: Path, max_model_len: int) -> Pool:
        """The generator pool of a policy size, serving `checkpoint` (weights reloaded in place when another
        checkpoint of the same size was served before)."""
        from actors.generator import Generator

        checkpoint = Path(checkpoint).resolve()
        if self.config.colocate:
            self.trainers()  # first, so that each generator lands beside a rank (pipeline.cluster.colocate)
        name = generator_pool_name(self.config, size)
        if size in self._generators:
            self._ledger.use(name)
            pool, served = self._generators[size]
            if served != checkpoint:
                self.sync_generator(size, checkpoint)
            return pool
        engine = generator_engine_config(self.config, max_model_len, ModelConfig.load(checkpoint))
        degree = engine.tensor_parallel_size
        pool = self._start(name, generator_reservation(self.config, degree),
                           lambda: Pool(Generator, generator_pool_config(self.config, name, degree), str(checkpoint),
                                        engine))
        self._generators[size] = (pool, checkpoint)
        return pool

    def scorer(self, help_dir: Path, safe_dir: Path) -> Pool:
        """The scorer pool holding these reward models (swapped in place when the round retrained them)."""
        from actors.scorer import Scorer

        wanted = {"help": Path(help_dir).resolve(), "safe": Path(safe_dir).resolve()}
        scorer = self.config.scorer
        if self._scorer is None:
            self._scorer = (self._start(scorer.name, Reservation.of(scorer),
                                        lambda: Pool(Scorer, scorer, str(wanted["help"]), str(wanted["safe"]))), wanted)
        self._ledger.use(scorer.name)
        pool, held = self._scorer
        for kind, folder in wanted.items():
            if held[kind] != folder:
                pool.broadcast("load_weights", kind, str(folder), replay_key=f"rm-{kind}")
                held[kind] = folder
        return pool

    def sync_generator(self, size: str, folder: Path) -> float:
        """Reload the weights in `folder` into the generator pool of `size` (every actor, one call each; restarted
        actors reload them too); returns the slowest actor's seconds."""
        pool, _ = self._generators[size]
        seconds = pool.broadcast("load_weights", str(folder), replay_key="weights")
        self._generators[size] = (pool, Path(folder).resolve())
        return max((s for s in seconds if s is not None), default=0.0)

    def sync_from_trainers(self, size: str, key: str) -> float:
        """The model the trainer ranks keep as `ctx.state[key]` into the generator pool of `size`, by
        `cluster.weight_sync` (pipeline.cluster.weight_sync); returns the slowest actor's load seconds."""
        pool, _ = self._generators[size]
        sync = self._syncs.get(size)
        if sync is None or sync.generators is not pool or sync.trainers is not self.trainers():
            cluster = self.config
            sync = WeightSync(cluster.weight_sync, pool, self.trainers(), int(cluster.weight_bucket_mib * 2**20),
                              self._scratch / f"weight-sync-{size}")
            self._syncs[size] = sync
        seconds = sync(key)
        self._generators[size] = (pool, None)
        return seconds

    def trainers(self):
        from actors.trainer import TrainerGroup

        trainer = self.config.trainer
        if self._trainers is None:
            self._trainers = self._start(trainer.name, Reservation.of(trainer), lambda: (
                ColocatedTrainers(trainer, lambda: [pool for pool, _ in self._generators.values()])
                if self.config.colocate else TrainerGroup(trainer)))
        self._ledger.use(trainer.name)
        return self._trainers

    def _start(self, name: str, reservation: Reservation, start: Callable[[], Any]) -> Any:
        """`start()` for the pool `name` once it fits: live pools released first where it would not."""
        for released in self._ledger.to_release(reservation):
            self._release(released, name)
        started = start()
        self._ledger.use(name, reservation)
        return started

    def _release(self, name: str, wanted_by: str) -> None:
        """Shut the live pool `name` down to give its devices to `wanted_by`; a stage that needs it again starts
        it again (from its checkpoint)."""
        log.info("pools: releasing '%s' to make room for '%s'", name, wanted_by)
        self._ledger.drop(name)
        if self._trainers is not None and name == self.config.trainer.name:
            self._trainers.shutdown()
            self._trainers = None
        elif self._scorer is not None and name == self.config.scorer.name:
            self._scorer[0].shutdown()
            self._scorer = None
        else:
            size = next(s for s, (pool, _) in self._generators.items() if pool.config.name == name)
            self._generators.pop(size)[0].shutdown()

    def train(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on every rank of the trainer group (a top-level function that reads its rank from
        torch.distributed); returns rank 0's result."""
        group = self.trainers()
        return group.run(CallOnRank(fn), [args] * group.world_size)[0]

    def shutdown(self) -> None:
        for pool, _ in self._generators.values():
            pool.shutdown()
        self._generators = {}
        if self._scorer is not None:
            self._scorer[0].shutdown()
            self._scorer = None
        if self._trainers is not None:
            self._trainers.shutdown()
            self._trainers = None
        self._ledger = pools_ledger(self.config)

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# How a stage runs its training function: `runner(fn, *args)` returns fn's result (rank 0's on a trainer group).
Runner = Callable[..., Any]


def in_process(fn: Callable[..., Any], *args: Any) -> Any:
    """The Runner for tests and single-process use: fn(*args) here."""
    return fn(*args)


@dataclass(frozen=True)
class CallOnRank:
    """Trainer loop function that calls `fn(*args)`; the stage functions find their rank in torch.distributed.
    Its `loop_name` is `fn`'s, so the trainer's metrics name the stage function, not this wrapper."""

    fn: Callable[..., Any]

    def __call__(self, ctx: Any, args: Sequence[Any]) -> Any:
        return self.fn(*args)

    @property
    def loop_name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)
