"""Resuming a killed run (docs/design.md, "Run store and resuming"): the driver is SIGKILLed at three
moments of one quick run, the same command run again continues from the run store, and a changed config key
recomputes only what depends on it.

One run folder for all of it: killed in pretraining (the driver alone, as `kill -9 <pid>` does: what its local
Ray leaves behind must not keep the next run from starting), killed with its whole process group in rejection
sampling after the first of its three shards, killed in PPO once it has copied its starting policy, then run to
the end. Checked afterwards: every manifest that existed before a kill is byte for byte the same (the stage was
not redone), the interrupted sharded stage kept its earlier shards and has every (prompt, sample) exactly once,
the tables have the row counts an uninterrupted run has. Then `rounds.ppo.iterations` changes: PPO and the stages
downstream of the large policy get new manifests, nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config.run import compose_run
from pipeline.data.schemas import PREFERENCES
from pipeline.data.store import MANIFEST, PROGRESS, RunStore
from pipeline.data.store import CHECKPOINT_DIR
from pipeline.stages.cached import checkpoint_stage, stage_digest, table_stage
from pipeline.stages.rejection_sampling.stage import choose_prompts
from process_helpers import free_port, session_members, signal_all

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 900  # one driver, start to end or to its kill (a quick run takes 3-5 min on 2 busy cores)
PRETRAIN_WORK_S = 5.0  # how long pretraining runs before the first kill (work that is lost and redone)
SHARD_PROMPTS = 16  # cluster.prompts_per_shard: the quick run's 48 rejection-sampling prompts make 3 shards


# --- the store side of resuming, without Ray ---------------------------------------------------------------

def test_checkpoint_stage_starts_over_from_a_clean_folder(tmp_path):
    """What a killed checkpoint stage left (a half-copied policy, PPO's `live` export, a temp folder, a manifest
    whose checkpoint is gone) is cleared before it trains again: PPO's copytree into an existing folder failed."""
    store = RunStore(tmp_path / "run")
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text("{}")
    (start / "model.safetensors").write_bytes(b"weights")

    def train(out: Path) -> dict:
        import shutil

        shutil.copytree(start, out)  # as run_ppo_loop does with the starting policy
        return {"steps": 1}

    stage = store.stage(1, "ppo")
    stage.begin({"policy": "a"}, "cfg")
    (stage.path / CHECKPOINT_DIR).mkdir()
    (stage.path / CHECKPOINT_DIR / "config.json").write_text("{}")  # copied before the kill
    (stage.path / "live").mkdir()
    (stage.path / ".checkpoint.tmp-x1y2").mkdir()
    folder, metrics, cached = checkpoint_stage(store, 1, "ppo", {"policy": "a"}, {"lr": 1}, train)
    assert not cached and metrics == {"steps": 1}
    assert sorted(p.name for p in stage.path.iterdir()) == [CHECKPOINT_DIR, MANIFEST, PROGRESS]
    assert (folder / "model.safetensors").read_bytes() == b"weights"

    (folder / "config.json").unlink()  # finished, then its checkpoint went: trained again, the manifest redone
    folder, _, cached = checkpoint_stage(store, 1, "ppo", {"policy": "a"}, {"lr": 1}, train)
    assert not cached and (folder / "config.json").is_file()
    assert checkpoint_stage(store, 1, "ppo", {"policy": "a"}, {"lr": 1}, train)[2]  # and then cached


def test_a_raised_stage_version_remakes_the_stage_and_version_0_adds_nothing(tmp_path):
    from pipeline.data.store import digest_config
    assert stage_digest({"a": 1}) == digest_config({"a": 1})
    assert stage_digest({"a": 1}, 3) == digest_config({"a": 1, "version": 3}) != stage_digest({"a": 1}, 4)
    store, made = RunStore(tmp_path), []

    def make(stage, _):
        made.append(stage.path.name)
        return {"n": len(made)}

    for version in (1, 1, 2):
        table_stage(store, 1, "judged", {"x": "1"}, {"a": 1}, make, None, version)
    assert made == ["judged", "judged"]  # the second call found it done; version 2 remade it


def test_finishing_a_stage_again_with_the_same_content_keeps_its_manifest(tmp_path):
    """A resumed run that rebuilds a deterministic stage (the world's tables after a kill mid-world) writes the
    same shards again: the manifest, and so the record that the stage was not redone, stays as it was."""
    stage = RunStore(tmp_path).stage(0, "world_preferences_b01")
    table = pa.Table.from_pylist([{"id": "p0", "batch": 1, "prompt": [{"role": "user", "content": "q"}],
                                   "chosen": "y", "rejected": "n", "rating": "better", "kind": "helpfulness"}],
                                 schema=PREFERENCES)
    stage.begin({}, "cfg")
    stage.write_shard(0, table)
    stage.finish("preferences", {}, "cfg")
    earlier = json.loads((stage.path / MANIFEST).read_text())
    earlier["created"] = "2000-01-01T00:00:00+00:00"  # written by an earlier run
    (stage.path / MANIFEST).write_text(json.dumps(earlier, indent=2, sort_keys=True) + "\n")
    before = (stage.path / MANIFEST).read_bytes()

    stage.begin({}, "cfg")
    stage.write_shard(0, table)
    assert stage.finish("preferences", {}, "cfg")["created"] == earlier["created"]
    assert (stage.path / MANIFEST).read_bytes() == before
    assert stage.finish("preferences", {}, "cfg", extra={"n": 1})["created"] != earlier["created"]  # changed


# --- the whole driver, killed and run again --------------------------------------------------------------

class Driver:
    """`python -m pipeline experiment=quick ...` in a process session of its own, its output in a log file."""

    def __init__(self, root: Path, name: str, *overrides: str) -> None:
        self.name = name
        self.log = root / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)  # a local Ray instance of its own, never someone's cluster
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "experiment=quick", f"run.root={root}",
                                          *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.sid = self.proc.pid  # every Ray process it starts stays in this session
        self.wall_s: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return f"--- {self.log} ---\n{self.output()[-6000:]}"

    def wait_until(self, condition, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name}: the driver exited ({self.proc.returncode}) before {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill(group=True)
                pytest.fail(f"{self.name}: no {what} within {timeout_s} s\n{self.tail()}")
            time.sleep(0.05)

    def kill(self, group: bool) -> float:
        """SIGKILL the driver (`group`: and its whole process group, Ray included); the time it died (epoch s)."""
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.kill()
        self.proc.wait()
        self.wall_s = time.monotonic() - self.started
        return time.time()

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> str:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(group=True)
            pytest.fail(f"{self.name}: not done within {timeout_s} s\n{self.tail()}")
        self.wall_s = time.monotonic() - self.started
        assert code == 0, f"{self.name}: exit {code}\n{self.tail()}"
        return self.output()

    def end(self) -> None:
        """Kill whatever of its session is still alive (by process id: never anyone else's Ray)."""
        if self.proc.poll() is None:
            self.kill(group=True)
        signal_all(session_members(self.sid), signal.SIGKILL)


def manifests(run: Path) -> dict[str, bytes]:
    return {str(p.parent.relative_to(run)): p.read_bytes() for p in sorted(run.glob("round-*/*/" + MANIFEST))}


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def files(run: Path, stages) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of these stage folders: a stage done again rewrites its files (temp file and
    rename: a new inode), even where its new bytes are the same (sampling and training are seeded here)."""
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for stage in stages for p in sorted((run / stage).rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.long
def test_a_killed_run_resumes_where_it_stopped_and_a_config_change_redoes_only_what_depends_on_it(tmp_path):
    # One dashboard port for every run: a dashboard the killed driver left listening would stop the next start.
    overrides = [f"cluster.prompts_per_shard={SHARD_PROMPTS}", f"cluster.dashboard_port={free_port()}"]
    config = compose_run("experiment=quick", *overrides)
    run = tmp_path / config.run.name
    round0, round1 = run / "round-00", run / "round-01"
    drivers: list[Driver] = []
    lost: dict[str, float] = {}  # work thrown away by each kill, seconds

    def start(name: str, *extra: str) -> Driver:
        drivers.append(Driver(tmp_path, name, *overrides, *extra))
        return drivers[-1]

    try:
        # 1. Pretraining (a checkpoint stage), the driver alone SIGKILLed: its Ray goes down by itself.
        first = start("1-killed-in-pretrain")
        first.wait_until(lambda: (round0 / "pretrain" / PROGRESS).exists(), "pretraining")
        time.sleep(PRETRAIN_WORK_S)
        before_pretrain = manifests(run)
        files_pretrain = files(run, before_pretrain)
        lost["pretrain"] = first.kill(group=False) - (round0 / "pretrain" / PROGRESS).stat().st_mtime
        assert not (round0 / "pretrain" / MANIFEST).exists(), "pretraining finished before the kill"
        assert sorted(before_pretrain) == sorted(f"round-00/{p.name}" for p in round0.glob("world_*")), before_pretrain

        # 2. At once the same command again (what the killed driver's Ray still runs must not stop it); its whole
        # process group killed in rejection sampling once the first of its shards is written.
        second = start("2-killed-in-rejection-sampling")
        rs = round1 / "rs_samples"
        second.wait_until(lambda: (rs / "part-00000.parquet").exists(), "the first rejection-sampling shard")
        killed = second.kill(group=True)
        assert not (rs / MANIFEST).exists(), "rejection sampling finished before the kill"
        rs_shards_at_kill = shards(rs)
        rs_files_at_kill = files(run, ["round-01/rs_samples"])
        lost["rs_samples"] = killed - max((rs / name).stat().st_mtime for name in rs_shards_at_kill)  # its last
        before_rs = manifests(run)
        files_rs = files(run, before_rs)

        # 3. PPO (a checkpoint stage), killed once it has copied its starting policy into its checkpoint folder.
        third = start("3-killed-in-ppo")
        ppo = round1 / "ppo"
        third.wait_until(lambda: (ppo / CHECKPOINT_DIR).exists(), "PPO's copy of its starting policy")
        lost["ppo"] = third.kill(group=True) - (ppo / PROGRESS).stat().st_mtime
        assert not (ppo / MANIFEST).exists(), "PPO finished before the kill"
        before_ppo = manifests(run)
        files_ppo = files(run, before_ppo)

        # 4. To the end.
        last = start("4-resumed")
        output = last.finish()
        after = manifests(run)
        for when, before, identities in (("pretrain", before_pretrain, files_pretrain),
                                         ("rejection sampling", before_rs, files_rs), ("PPO", before_ppo, files_ppo)):
            redone = sorted(stage for stage in before if after.get(stage) != before[stage])
            assert not redone, f"finished before the kill in {when}, recomputed after it: {redone}"
            now = files(run, before)
            rewritten = sorted(path for path in now.keys() | identities.keys() if now.get(path) != identities.get(path))
            assert not rewritten, f"finished before the kill in {when}, files rewritten after it: {rewritten}"
        assert "== world (cached)" in output and "== pretrain (cached)" in output, last.tail()
        assert "trained" not in output.split("== pretrain", 1)[1].split("\n", 1)[0]

        # The interrupted sharded stage: its shards from before the kill unchanged, every sample exactly once.
        store = RunStore(run)
        rs_stage = store.stage(1, "rs_samples")
        assert {name: shards(rs)[name] for name in rs_shards_at_kill} == rs_shards_at_kill
        assert {path: files(run, ["round-01/rs_samples"])[path] for path in rs_files_at_kill if "part-" in path} \
            == {path: identity for path, identity in rs_files_at_kill.items() if "part-" in path}  # not rewritten
        samples = rs_stage.read()
        prompts_train = store.stage(0, "world_prompts_train").read()
        rejection = config.rounds.rejection
        chosen = choose_prompts(prompts_train, rejection.prompts, rejection.seed).num_rows
        expected_shards = -(-chosen // SHARD_PROMPTS)
        assert expected_shards >= 2 and len(rs_shards_at_kill) < expected_shards
        assert sorted(rs_stage.done_shards()) == list(range(expected_shards))
        keys = list(zip(samples.column("prompt_id").to_pylist(), samples.column("sample_index").to_pylist()))
        assert len(keys) == len(set(keys)) == chosen * rejection.k, (len(keys), len(set(keys)), chosen)
        assert rs_stage.manifest()["rows"] == chosen * rejection.k
        assert 0 < store.stage(1, "rs_kept").manifest()["rows"] <= chosen

        # Every evaluation answered each single-turn held-out prompt n times, as in an uninterrupted run.
        prompts_eval = store.stage(0, "world_prompts_eval").read()
        single_turn = sum(c != "dialogue" for c in prompts_eval.column("category").to_pylist())
        sizes = [s.name for s in config.pretrain.sizes]
        rows = {f"{r}/{prefix}_{size}": store.stage(r, f"{prefix}_{size}").manifest()["rows"]
                for r, prefixes in ((0, ("base_eval", "sft_eval")), (1, ("eval",))) for prefix in prefixes
                for size in sizes}
        assert set(rows.values()) == {config.eval_sampling.n * single_turn}, rows
        for name in ("rm_helpfulness", "rm_safety", "ppo", *(f"rs_sft_{size}" for size in sizes),
                     *(f"winrate_{size}" for size in sizes)):
            assert store.stage(1, name).manifest() is not None, name
        assert (run / "report.md").is_file()

        # The first driver was killed alone: whatever of its Ray outlived it (Ray's agents wait up to a minute to
        # notice their raylet is gone) did not stop the runs after it, and is gone by now.
        deadline = time.monotonic() + 90
        while session_members(first.sid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not session_members(first.sid), session_members(first.sid)

        # 5. One key of a late stage changed: PPO and what the PPO policy feeds are redone, nothing before it.
        iterations = 1 if config.rounds.ppo.iterations > 1 else 2
        changed = start("5-ppo-iterations-changed", f"rounds.ppo.iterations={iterations}")
        changed.finish()
        final = manifests(run)
        redone = {stage for stage in after if final.get(stage) != after[stage]}
        created = {stage: json.loads(data)["created"] for stage, data in after.items()}
        assert {"round-01/ppo", f"round-01/eval_{sizes[-1]}"} <= redone, redone
        assert all(created[stage] >= created["round-01/ppo"] for stage in redone), redone
        assert not any(stage.startswith("round-00/") or stage.startswith(("round-01/rm_", "round-01/rs_"))
                       for stage in redone), redone
        assert not any(f"_{size}" in stage for stage in redone for size in sizes[:-1]), redone  # other sizes
        new_ppo = json.loads(final["round-01/ppo"])["extra"]["metrics"]
        assert len(new_ppo["iterations"]) <= iterations

        report = {"lost_s": {k: round(v, 1) for k, v in lost.items()},
                  "wall_s": {d.name: round(d.wall_s or 0, 1) for d in drivers},
                  "recomputed_after_resume": 0, "redone_after_config_change": sorted(redone),
                  "rs_rows": len(keys), "rs_shards_kept": len(rs_shards_at_kill), "eval_rows": rows}
        print("resume:", json.dumps(report))
    finally:
        for driver in drivers:
            driver.end()


if __name__ == "__main__":  # pragma: no cover - `python tests/test_resume.py` prints nothing more than pytest -s
    sys.exit(pytest.main([__file__, "-s", "-p", "no:cacheprovider"]))
