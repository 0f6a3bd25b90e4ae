"""Run store: atomic shards that survive a SIGKILL mid-write, manifests that notice every change."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schemas import PREFERENCES, SCHEMA_VERSION
from pipeline.data.store import RunStore, StageStore, digest_config, digest_file, write_table_atomic

REPO = Path(__file__).resolve().parents[1]


def preferences(first: int, n: int) -> pa.Table:
    rows = [
        {"id": f"p{i}", "batch": 1, "prompt": [{"role": "user", "content": f"question {i}"}], "chosen": "yes",
         "rejected": "no", "rating": "better", "kind": "helpfulness"}
        for i in range(first, first + n)
    ]
    return pa.Table.from_pylist(rows, schema=PREFERENCES)


def temp_name(final: str, host: str, pid: int) -> str:
    return f".{final}~{host}~{pid}~0123abcd.tmp"


def test_layout_and_read_order(tmp_path):
    stage = RunStore(tmp_path / "runs" / "demo").stage(3, "reward")
    assert stage.path == tmp_path / "runs" / "demo" / "round-03" / "reward"
    assert not stage.path.exists() and stage.done_shards() == set()  # created lazily
    stage.write_shard(2, preferences(4, 2))
    stage.write_shard(0, preferences(0, 3))
    stage.write_shard(1, preferences(3, 1))
    assert sorted(p.name for p in stage.path.iterdir()) == ["part-00000.parquet", "part-00001.parquet",
                                                            "part-00002.parquet"]
    assert stage.done_shards() == {0, 1, 2}
    table = stage.read()
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(6)]
    assert table.schema.equals(PREFERENCES, check_metadata=True)
    with pytest.raises(ValueError):
        RunStore(tmp_path).stage(100, "sft")
    with pytest.raises(ValueError):
        RunStore(tmp_path).stage(0, "../sft")
    with pytest.raises(FileNotFoundError):
        RunStore(tmp_path).stage(0, "never-ran").read()


def test_temp_files_are_ignored_and_cleaned_only_when_abandoned(tmp_path):
    stage = StageStore(tmp_path)
    stage.write_shard(0, preferences(0, 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = tmp_path / temp_name("part-00001.parquet", host, int(dead.stdout))
    live = tmp_path / temp_name("part-00002.parquet", host, os.getpid())
    foreign_old = tmp_path / temp_name("part-00003.parquet", "elsewhere", 1)
    foreign_new = tmp_path / temp_name("part-00004.parquet", "elsewhere", 1)
    for path in (abandoned, live, foreign_old, foreign_new):
        path.write_bytes(b"PAR1 half a file")
    os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))
    assert stage.done_shards() == {0}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["part-00000.parquet", live.name, foreign_new.name])
    assert stage.read().num_rows == 1


WRITER = """
import sys
import numpy as np
import pyarrow as pa
from pathlib import Path
from pipeline.data.store import StageStore

stage = StageStore(Path(sys.argv[1]))
rng = np.random.default_rng(0)
payload = pa.table({"blob": pa.array([rng.bytes(1 << 19) for _ in range(4)], pa.binary())})  # 2 MiB, incompressible
print("ready", flush=True)
for step in range(1_000_000):
    stage.write_shard(step % 16, payload)  # overwrites too: a replaced shard must never be seen half-written
"""


def test_shards_survive_a_writer_killed_mid_write(tmp_path):
    expected_digest = None
    saw_temp = False
    for attempt in range(8):
        folder = tmp_path / f"attempt-{attempt}"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], cwd=REPO, stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"ready\n"
        delay = random.uniform(0.05, 0.5)
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        shards = sorted(folder.glob("part-*.parquet"))
        saw_temp |= any(p.name.endswith(".tmp") for p in folder.iterdir())
        for path in shards:
            blobs = pq.read_table(path).column("blob").to_pylist()  # reads fully: a whole file, never a part
            digest = hashlib.sha256(b"".join(blobs)).hexdigest()
            expected_digest = expected_digest or digest
            assert len(blobs) == 4 and digest == expected_digest, f"{path} after a kill at {delay:.3f}s"
        assert StageStore(folder).done_shards() == {int(p.name[5:10]) for p in shards}, f"kill at {delay:.3f}s"
        assert not any(p.name.endswith(".tmp") for p in folder.iterdir())  # the dead writer's temp is gone
        if saw_temp and attempt >= 1:
            break
    assert saw_temp, "no kill landed mid-write"


def test_manifest_matches_inputs_config_and_shards(tmp_path):
    stage = RunStore(tmp_path).stage(1, "rm_data")
    assert stage.manifest() is None and not stage.is_complete({}, "config")
    first, second = preferences(0, 3), preferences(3, 2)
    stage.write_shard(0, first)
    stage.write_shard(1, second)
    source = tmp_path / "input.jsonl"
    source.write_text('{"x": 1}\n')
    inputs = {"preferences": digest_file(source)}
    config = digest_config({"lr": 1e-5, "layers": [1, 2], "out": Path("runs/x")})
    manifest = stage.finish("preferences", inputs, config, checkpoint="ckpt/rm-1", extra={"seed": 7})

    assert manifest == stage.manifest()
    shard_paths = [stage.shard_path(0), stage.shard_path(1)]
    assert manifest["schema_kind"] == "preferences" and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["rows"] == 5
    assert [(s["index"], s["rows"], s["digest"]) for s in manifest["shards"]] == [
        (0, 3, digest_file(shard_paths[0])), (1, 2, digest_file(shard_paths[1]))]
    both = hashlib.sha256(b"".join(p.read_bytes() for p in shard_paths)).hexdigest()
    assert manifest["content_digest"] == both
    assert manifest["input_digests"] == inputs and manifest["config_digest"] == config
    assert manifest["checkpoint"] == "ckpt/rm-1" and manifest["extra"] == {"seed": 7}
    assert set(manifest["code_version"]) == {"package", "commit"} and manifest["code_version"]["commit"]
    datetime.fromisoformat(manifest["created"])

    assert stage.is_complete(inputs, config)
    assert not stage.is_complete({"preferences": "0" * 64}, config)
    assert not stage.is_complete({**inputs, "prompts": "abc"}, config)
    assert not stage.is_complete(inputs, digest_config({"lr": 2e-5, "layers": [1, 2], "out": "runs/x"}))

    stage.write_shard(1, preferences(3, 1))  # modified
    assert not stage.is_complete(inputs, config)
    stage.write_shard(1, second)  # the same bytes again
    assert stage.is_complete(inputs, config)
    stage.write_shard(2, second)  # a shard the manifest does not list
    assert not stage.is_complete(inputs, config)
    stage.shard_path(2).unlink()
    stage.shard_path(0).unlink()  # deleted
    assert not stage.is_complete(inputs, config)


def test_finish_checks_the_declared_schema_and_an_empty_stage_reads_empty(tmp_path):
    stage = StageStore(tmp_path / "stage")
    stage.write_shard(0, pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="declares"):
        stage.finish("preferences", {}, "c")
    empty = StageStore(tmp_path / "empty")
    assert empty.finish("samples", {}, "c")["rows"] == 0
    assert empty.read().num_rows == 0 and empty.read().schema.metadata[b"kind"] == b"samples"
    assert empty.is_complete({}, "c")


def test_digests_and_atomic_single_files(tmp_path):
    assert digest_config({"a": 1, "b": [1, 2]}) == digest_config({"b": [1, 2], "a": 1})
    assert digest_config({"a": 1}) != digest_config({"a": 2})
    with pytest.raises(TypeError, match="convert the config"):
        digest_config({"a": object()})
    path = write_table_atomic(preferences(0, 2), tmp_path / "out" / "rejects.parquet")
    write_table_atomic(preferences(0, 1), path)  # replaces
    assert pq.read_table(path).num_rows == 1
    assert [p.name for p in path.parent.iterdir()] == ["rejects.parquet"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert digest_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_begin_resumes_same_config_and_clears_another(tmp_path):
    stage = RunStore(tmp_path / "run").stage(1, "rejection")
    assert stage.begin({"prompts": "a"}, "cfg1") == set()
    stage.write_shard(0, preferences(0, 3))
    stage.write_shard(1, preferences(3, 3))
    assert stage.begin({"prompts": "a"}, "cfg1") == {0, 1}  # a crashed run resumes from its shards
    assert stage.begin({"prompts": "a"}, "cfg2") == set()  # another config never reuses them
    assert not stage.shard_path(0).exists()
    stage.write_shard(0, preferences(0, 2))
    stage.finish("preferences", {"prompts": "a"}, "cfg2")
    assert stage.is_complete({"prompts": "a"}, "cfg2")
    assert stage.begin({"prompts": "b"}, "cfg2") == set() and stage.manifest() is None


def test_checkpoint_only_stage_has_no_shards(tmp_path):
    stage = RunStore(tmp_path / "run").stage(0, "pretrain")
    stage.begin({"corpus": "x"}, "cfg")
    manifest = stage.finish(None, {"corpus": "x"}, "cfg", checkpoint="ckpt", extra={"ppl": 3.5})
    assert manifest["rows"] == 0 and manifest["schema_kind"] is None
    assert stage.is_complete({"corpus": "x"}, "cfg") and stage.manifest()["extra"] == {"ppl": 3.5}
