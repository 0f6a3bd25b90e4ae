"""The main job as a Ray job (docs/design.md, "Operations"): `ray start --head`,
`ray job submit --working-dir . -- python -m pipeline ...`, `ray job stop` once the first stages are in the run
store, a second submit that resumes from them and runs to the end. Only the venv's `ray` CLI, as the README's
"Running as a Ray job" section has it.

The head is a Ray instance of this test alone: free ports, its own `--temp-dir`, token authentication with a token
of its own (Ray turns it on for `ray start` when ~/.ray/auth_token exists; the job CLI must then send one), and
it is stopped by process id, never with `ray stop` (which ends every Ray process of the machine, other people's
test clusters included): `ray start` runs in a new process session, and every process left in it is killed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cluster.pools import ClusterConfig
from process_helpers import end_session, free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.long]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 1500  # a quick run: ~5 min on 2 idle cores, 20 on busy ones
STATUS_EVERY_S = 10.0


class RayHead:
    """A `ray start --head` of this test (the README's command with free ports and a temp dir of its own)."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-job-", dir="/tmp")  # short: Ray's Unix sockets live under it
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # the job's `python` is the venv's: the entrypoint runs with the head's environment
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # either would override --address
            self.env.pop(name, None)
        self.sid: int | None = None

    def start(self) -> None:
        # --num-cpus: what a local run's instance advertises (cluster.num_cpus): every pool at once.
        command = [RAY, "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--num-cpus={ClusterConfig().num_cpus}", "--num-gpus=0", f"--object-store-memory={1 << 30}",
                   f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        starter = subprocess.Popen(command, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        self.sid = starter.pid  # the head's processes stay in this session after `ray start` returns
        output, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, output[-4000:]

    def job(self, command: str, *args: str, timeout_s: float = 120) -> str:
        """`ray job <command> --address <this head> <args>` (before a submit's `--`, which ends the options)."""
        result = subprocess.run([RAY, "job", command, "--address", self.address, *args], env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, \
            f"ray job {command} {' '.join(args)}: exit {result.returncode}\n{result.stderr[-4000:]}"
        return result.stdout + result.stderr

    def submit(self, submission_id: str, run_root: Path) -> None:
        self.job("submit", "--no-wait", "--working-dir", ".", "--submission-id", submission_id, "--",
                 "python", "-m", "pipeline", "experiment=quick", f"run.root={run_root}")

    def status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, STOPPED or FAILED, from what `ray job status` prints for each."""
        text = self.job("status", submission_id)
        for status, said in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed")):
            if f"Job '{submission_id}' {said}" in text:
                return status
        found = re.search(rf"Status for job '{submission_id}': (\w+)", text)
        assert found, text
        return found[1]

    def wait_for(self, submission_id: str, condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Until `condition()` (checked twice a second); the job's status only every STATUS_EVERY_S (each `ray job`
        call is a Python start, a second of CPU)."""
        deadline, asked = time.monotonic() + timeout_s, 0.0
        while not condition():
            if time.monotonic() - asked > STATUS_EVERY_S:
                asked = time.monotonic()
                if (status := self.status(submission_id)) not in ("PENDING", "RUNNING"):
                    pytest.fail(f"job {submission_id} is {status} before {what}\n{self.logs(submission_id)[-8000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {submission_id}: no {what} within {timeout_s} s\n{self.logs(submission_id)[-8000:]}")
            time.sleep(0.5)

    def wait_done(self, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while (status := self.status(submission_id)) in ("PENDING", "RUNNING"):
            if time.monotonic() > deadline:
                pytest.fail(f"job {submission_id} not done within {timeout_s} s\n{self.logs(submission_id)[-8000:]}")
            time.sleep(STATUS_EVERY_S)
        return status

    def logs(self, submission_id: str) -> str:
        return self.job("logs", submission_id)

    def alive_actors(self) -> list[str]:
        """Class names of the cluster's live actors (`ray list actors`; it says "No resource" for none)."""
        result = subprocess.run([RAY, "list", "actors", "--address", self.address, "--filter", "state=ALIVE",
                                 "--format", "json", "--limit", "1000"], env=self.env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-4000:]
        text = result.stdout
        return [actor["class_name"] for actor in json.loads(text[text.index("["):])] if "[" in text else []

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, to every process of the head's session (all started by `ray start`)."""
        if self.sid is not None:
            end_session(self.sid, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def manifests(run: Path) -> dict[str, bytes]:
    return {str(p.parent.relative_to(run)): p.read_bytes() for p in sorted(run.glob("round-*/*/manifest.json"))}


def test_the_main_job_runs_as_a_ray_job_stops_and_a_second_submit_resumes_it(tmp_path):
    head = RayHead()
    run = tmp_path / "quick"
    pretrain = run / "round-00" / "pretrain"
    try:
        head.start()
        head.submit("quick-1", tmp_path)
        # Stopped once the world's tables are finished stages and pretraining is under way.
        head.wait_for("quick-1", lambda: (pretrain / "progress.json").exists(), "pretraining")
        time.sleep(3)
        head.job("stop", "quick-1")
        assert head.status("quick-1") == "STOPPED"
        deadline = time.monotonic() + 60  # the stopped driver's actors (pools, its job supervisor) go with it
        while (alive := head.alive_actors()) and time.monotonic() < deadline:
            time.sleep(5)
        assert not alive, alive
        before = manifests(run)
        assert before and all(stage.startswith("round-00/world_") for stage in before), sorted(before)
        assert not (pretrain / "manifest.json").exists(), "pretraining finished before the stop"

        head.submit("quick-2", tmp_path)
        status = head.wait_done("quick-2")
        logs = head.logs("quick-2")
        assert status == "SUCCEEDED", logs[-8000:]
        assert "== world (cached)" in logs and "== pretrain (trained" in logs, logs[-8000:]
        after = manifests(run)
        assert {stage: after.get(stage) for stage in before} == before  # the first job's stages were not redone
        assert {"round-00/pretrain", "round-01/ppo"} <= set(after) and (run / "report.md").is_file()
    finally:
        head.stop()
