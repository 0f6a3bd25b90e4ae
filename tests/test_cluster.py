"""The driver's pools: started only when a stage needs them, training functions run on the trainer ranks."""

from __future__ import annotations

import pytest
import ray
import torch.distributed as dist

from actors.pool import PoolConfig
from pipeline.cluster.pools import ClusterConfig, Pools, in_process


def rank_sum(a: int, b: int) -> tuple[int, int, int]:
    """What a stage function sees on a trainer rank: its rank in torch.distributed."""
    return dist.get_rank(), dist.get_world_size(), a + b


def test_pools_start_on_first_use_and_train_runs_on_every_rank(ray_session):
    config = ClusterConfig(trainer=PoolConfig("lazy-trainer", size=2, num_cpus=0.5, call_timeout_s=60,
                                              start_timeout_s=60))
    with Pools(config) as pools:
        with pytest.raises(ValueError):
            ray.get_actor("lazy-trainer-0")  # nothing started yet
        assert pools.train(rank_sum, 2, 3) == (0, 2, 5)  # rank 0's result
        assert ray.get_actor("lazy-trainer-1")
    with pytest.raises(ValueError):
        ray.get_actor("lazy-trainer-0")  # shut down with the Pools


def test_in_process_runner_calls_the_function_here():
    assert in_process(divmod, 7, 2) == (3, 1)


def test_local_cluster_must_hold_every_pool():
    config = ClusterConfig(num_cpus=6)
    config.check_fits(generator_pools=1)  # 2 + 2 + 2
    with pytest.raises(ValueError, match=r"cluster.num_cpus = 6: the pools reserve 8 CPUs"):
        config.check_fits(generator_pools=2)
    ClusterConfig(num_cpus=6, address="auto").check_fits(generator_pools=5)  # a joined cluster scales itself
