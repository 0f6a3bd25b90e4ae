"""Autoscaling (docs/design.md, "Operations"): a pool larger than the cluster makes Ray's autoscaler add nodes, its work
finishes, and the idle nodes go away after the pool is shut down.

The cluster is Ray's fake multi-node one (the autoscaler "launches" worker nodes as extra raylets on this
machine), the set-up of `ray.cluster_utils.AutoscalingCluster`. That class is not used as is, for two reasons:
its `start` and `shutdown` run `ray stop --force`, which kills every Ray process of the machine (the test
session's own instance, other runs), and it reads a config template (fake_multi_node/example.yaml) that the Ray
wheel does not ship. `_Cluster` below builds the same config and starts the head with the same environment
(RAY_FAKE_CLUSTER=1, AUTOSCALER_UPDATE_INTERVAL_S=1), on free ports and in a temp dir of its own.

It is a second Ray instance, so it never shares the session fixture's: the test runs this file as a script in a
new process session, with a timeout, and afterwards kills whatever is left in that session (every Ray process
of the cluster: head, autoscaler, fake nodes, workers) by process id. `python tests/test_autoscaling.py` does the
same from a shell and prints the timings.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from process_helpers import end_session, free_port

HEAD_CPUS = 1
WORKER_CPUS = 2  # per fake worker node
MAX_WORKERS = 2
IDLE_TIMEOUT_MIN = 0.1  # 6 s
POOL_SIZE = 3  # x 1 CPU: more than the head holds, so at least one worker node must come
SHARDS = 9
CHILD_TIMEOUT_S = 300


def test_a_pool_larger_than_the_cluster_grows_it_and_idle_nodes_go_away():
    code, output = _run_isolated(CHILD_TIMEOUT_S)
    assert code == 0, output[-8000:]
    report = json.loads(output.strip().splitlines()[-1])
    assert report["nodes_before"] == 1
    assert 2 <= report["nodes_peak"] <= 1 + MAX_WORKERS
    assert report["actor_nodes"] >= 2  # the pool's actors really run on an added node
    assert report["nodes_after"] == 1


# --- the child: one autoscaling cluster, one pool ------------------------------------------------------------

class _Cluster:
    """Ray's fake autoscaling cluster (as AutoscalingCluster makes it), stopped by process id, never by name."""

    def __init__(self, temp_dir: str, head_cpus: int, worker_node_types: dict, **config: object) -> None:
        self.temp_dir = temp_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_cpus = head_cpus
        self.config = {
            "cluster_name": "fake_multinode",
            "max_workers": MAX_WORKERS,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {**worker_node_types,
                                     "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                          "max_workers": 0}},
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **config,
        }

    def start(self) -> None:
        path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(self.config, f)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS", None)
        subprocess.run([ray_cli, "start", "--head", f"--autoscaling-config={path}", f"--port={self.port}",
                        "--node-ip-address=127.0.0.1", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                        f"--object-store-memory={100 * 1024**2}", f"--temp-dir={self.temp_dir}",
                        "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
                        f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)

    def log_tail(self, name: str = "monitor.log", chars: int = 3000) -> str:
        try:
            with open(os.path.join(self.temp_dir, "session_latest", "logs", name)) as f:
                return f.read()[-chars:]
        except OSError as err:
            return f"({err})"


def _child(temp_dir: str) -> None:
    """Start the cluster, run a stage-like map over shards on a pool that does not fit the head, watch the nodes."""
    if os.getsid(0) != os.getpid():
        sys.exit("run through _run_isolated: the clean-up kills this process session")
    import ray

    from actors.pool import Pool, PoolActor, PoolConfig
    from pipeline.cluster.pools import ClusterConfig, connect

    class ShardWorker(PoolActor):  # defined here: pickled by value, the workers need no tests/ on their path
        def work(self, shard: list[int]) -> dict:
            import time

            import ray

            time.sleep(0.2)
            return {"total": sum(x * x for x in shard), "node": ray.get_runtime_context().get_node_id()}

    def alive_nodes() -> int:
        return sum(node["Alive"] for node in ray.nodes())

    def wait_for(predicate, timeout_s: float, what: str) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{what}: not within {timeout_s} s; alive nodes {alive_nodes()}\n"
                                   f"{cluster.log_tail()}")
            time.sleep(0.5)
        return time.monotonic() - start

    t0 = time.monotonic()
    cluster = _Cluster(temp_dir, HEAD_CPUS, {
        "ray.worker.cpu2": {"resources": {"CPU": WORKER_CPUS, "object_store_memory": 100 * 1024**2},
                            "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
    }, idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    cluster.start()
    timings = {"cluster_start_s": time.monotonic() - t0}

    pool_config = PoolConfig("autoscaled", size=POOL_SIZE, num_cpus=1, start_timeout_s=180, call_timeout_s=60)
    config = ClusterConfig(address=cluster.address, num_cpus=HEAD_CPUS, generator=pool_config)
    config.check_fits(generator_pools=1)  # a joined cluster is not held to what it has now
    connect(config)
    nodes_before = alive_nodes()
    assert ray.cluster_resources().get("CPU") == HEAD_CPUS, ray.cluster_resources()

    t1 = time.monotonic()
    shards = [list(range(i * 10, i * 10 + 10)) for i in range(SHARDS)]
    with Pool(ShardWorker, pool_config) as pool:  # pending placement group -> the autoscaler adds a node
        timings["pool_start_s"] = time.monotonic() - t1
        nodes_peak = alive_nodes()
        t2 = time.monotonic()
        results = pool.map_shards("work", shards)
        timings["map_s"] = time.monotonic() - t2
        nodes_peak = max(nodes_peak, alive_nodes())
    assert [r["total"] for r in results] == [sum(x * x for x in shard) for shard in shards]
    actor_nodes = len({r["node"] for r in results})

    # Idle nodes are removed after idle_timeout_minutes (plus an autoscaler round or two).
    timings["scale_down_s"] = wait_for(lambda: alive_nodes() == 1, 60 + IDLE_TIMEOUT_MIN * 60,
                                       "idle worker nodes removed")
    nodes_after = alive_nodes()
    ray.shutdown()
    timings["total_s"] = time.monotonic() - t0
    print(json.dumps({"nodes_before": nodes_before, "nodes_peak": nodes_peak, "nodes_after": nodes_after,
                      "actor_nodes": actor_nodes, **{k: round(v, 1) for k, v in timings.items()}}), flush=True)


# --- isolation: a new process session, cleaned up by process id ---------------------------------------------

def _run_isolated(timeout_s: float) -> tuple[int, str]:
    """Run `_child` in a new process session; afterwards end every process left in it (the Ray cluster)."""
    # This Ray turns token authentication on for `ray start` when ~/.ray/auth_token exists, but not for a driver
    # given an explicit address: one token of its own, on both sides, whatever the machine has.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")  # short: Ray's Unix sockets live under it
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", temp_dir],
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    try:
        output, _ = child.communicate(timeout=timeout_s)
        code = child.returncode
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        code, output = -1, f"{output}\n(timed out after {timeout_s} s)"
    finally:
        end_session(child.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    return code, output


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2])
    else:
        start = time.monotonic()
        code, output = _run_isolated(CHILD_TIMEOUT_S)
        print(output, end="")
        print(f"exit {code} after {time.monotonic() - start:.1f} s")
        sys.exit(code)
