"""The stage-time profile: manifests carry each stage's seconds and cores busy, a stage finished again
with the same content keeps its manifest, and the end-of-run table tells computed stages from cached ones."""

from __future__ import annotations

import json
import re
import time

import pyarrow as pa

from pipeline.data import store as store_module
from pipeline.data.schemas import CORPUS
from pipeline.data.store import MANIFEST, PROGRESS, RunStore
from pipeline.output.profile import StageTime, profile_table, stage_profile


def corpus(n: int) -> pa.Table:
    return pa.Table.from_pylist([{"text": f"doc {i}", "kind": "qa", "category": None, "quality": "high"}
                                 for i in range(n)], schema=CORPUS)


def make(store: RunStore, round: int, name: str, n: int, work_s: float = 0.0) -> dict:  # noqa: A002
    stage = store.stage(round, name)
    stage.begin({}, "cfg")
    time.sleep(work_s)
    stage.write_shard(0, corpus(n))
    return stage.finish("corpus", {}, "cfg")


def shares(table: str) -> list[float]:
    return [float(share) for share in re.findall(r"\s(\d+\.\d)%", table)]


def test_manifests_carry_time_and_a_refinished_stage_keeps_its_manifest(tmp_path):
    store = RunStore(tmp_path / "run")
    first = make(store, 0, "world_corpus", 3)
    assert first["seconds"] >= 0 and "cores_busy" in first
    assert first["cores_busy"] is None or first["cores_busy"] >= 0
    progress = json.loads((store.stage(0, "world_corpus").path / PROGRESS).read_text())
    assert progress["attempt"]["started"] <= time.time()

    path = store.stage(0, "world_corpus").path / MANIFEST
    earlier = json.loads(path.read_text())
    earlier.update(created="2000-01-01T00:00:00+00:00", seconds=123.0, cores_busy=1.5)  # an earlier run's
    path.write_text(json.dumps(earlier, indent=2, sort_keys=True) + "\n")
    before = path.read_text()
    assert make(store, 0, "world_corpus", 3) == earlier  # same content, other timing: not changed
    assert path.read_text() == before


def test_a_resumed_stage_keeps_its_shards_and_times_this_attempt(tmp_path, monkeypatch):
    stage = RunStore(tmp_path).stage(1, "rs_samples")
    stage.begin({"p": "a"}, "cfg")
    stage.write_shard(0, corpus(1))
    # A progress file from before attempts were recorded: still the same inputs and config, its shard is kept.
    (stage.path / PROGRESS).write_text(json.dumps({"config_digest": "cfg", "input_digests": {"p": "a"}}))
    assert stage.begin({"p": "a"}, "cfg") == {0}
    monkeypatch.setattr(store_module, "_cpu_busy_jiffies", lambda: None)  # no /proc/stat
    progress = json.loads((stage.path / PROGRESS).read_text())
    progress["attempt"]["started"] = time.time() + 3600  # a clock stepped back since begin
    (stage.path / PROGRESS).write_text(json.dumps(progress))
    manifest = stage.finish("corpus", {"p": "a"}, "cfg")
    assert manifest["seconds"] == 0 and manifest["cores_busy"] is None
    assert stage.begin({"p": "b"}, "cfg") == set()  # other inputs: emptied as before


def test_the_profile_lists_computed_and_cached_stages(tmp_path):
    store = RunStore(tmp_path / "run")
    make(store, 0, "world_corpus", 3)
    path = store.stage(0, "world_corpus").path / MANIFEST
    old = json.loads(path.read_text())
    old["created"] = "2000-01-01T00:00:00+00:00"  # made by an earlier invocation
    path.write_text(json.dumps(old))
    since = time.time()
    make(store, 1, "rs_samples", 2, work_s=0.05)
    (store.root / "report.md").write_text("not a stage")

    rows = stage_profile(store, since)
    assert [(r.round, r.stage, r.cached, r.rows) for r in rows] == [(0, "world_corpus", True, 3),
                                                                  (1, "rs_samples", False, 2)]
    assert all(r.seconds is not None and r.seconds >= 0 for r in rows)
    table = profile_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and "world_corpus" in lines[1] and "cached" in lines[1] and "%" not in lines[1]
    assert "rs_samples" in lines[2] and lines[-1].split()[0] == "total"
    assert rows[1].seconds >= 0.05 and shares(table) == [100.0]
    assert not any(r.cached for r in stage_profile(store, None))

    # An older store's manifests have no timing: shown as "?", left out of the shares.
    del old["seconds"], old["cores_busy"]
    path.write_text(json.dumps(old))
    assert stage_profile(store, None)[0].seconds is None
    assert "?" in profile_table(stage_profile(store, None)).splitlines()[1]


def test_shares_sum_to_100_percent():
    rows = [StageTime(0, name, seconds, 1.0, 10, float(i), False)
            for i, (name, seconds) in enumerate([("a", 1.0), ("b", 2.0), ("c", 3.0)])]
    rows.append(StageTime(0, "d", 50.0, 2.0, 5, 4.0, True))  # cached: no share
    table = profile_table(rows)
    assert abs(sum(shares(table)) - 100) <= 0.1 and len(shares(table)) == 3
    total = table.splitlines()[-1].split()
    assert total[0] == "total" and "6.0" in total and "100%" in total
