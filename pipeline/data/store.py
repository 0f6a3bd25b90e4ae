"""The run store: `runs/<name>/round-RR/<stage>/part-NNNNN.parquet` shards and a `manifest.json`.

Every file is written to a temp file in its own folder, fsynced and renamed into place (then the folder is fsynced),
so a reader sees a whole file or none. A stage whose manifest matches its inputs and config is complete and skipped;
a crashed stage resumes from `done_shards()`, so no row is lost or written twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schemas import SCHEMA_VERSION, SCHEMAS

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # which inputs and config the shards in the folder were written for
CHECKPOINT_DIR = "checkpoint"  # a training stage's model, in its stage folder
_DISTRIBUTION = "llama2-alignment"
_SHARD = re.compile(r"part-(\d{5})\.parquet")
# Temp files say who writes them, so a cleanup never removes one a live writer is still filling.
_TEMP = re.compile(r"\.(?P<final>.+)~(?P<host>[^~]*)~(?P<pid>\d+)~[0-9a-f]+\.tmp")
_FOREIGN_TEMP_AGE_S = 3600.0  # another host's temp file: its writer is presumed dead after this long idle
_CHUNK = 1 << 20


def _host() -> str:
    return socket.gethostname().replace("~", "_")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}~{_host()}~{os.getpid()}~{secrets.token_hex(4)}.tmp"
    try:
        # os.open rather than mkstemp: the final file gets the usual umask permissions, not 0600.
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` at `path`: readers see the old file, or the complete new one."""
    path = Path(path)
    _write_atomic(path, lambda file: file.write(data))
    return path


def write_table_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write `table` as Parquet at `path`: readers see the old file, or the complete new one."""
    path = Path(path)
    _write_atomic(path, lambda file: pq.write_table(table, file))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_abandoned_temp(path: Path) -> bool:
    match = _TEMP.fullmatch(path.name)
    if match is None:
        return False
    if match["host"] == _host():
        return not _pid_alive(int(match["pid"]))
    return time.time() - path.stat().st_mtime > _FOREIGN_TEMP_AGE_S


def _hash_file(path: Path, *also: Any) -> str:
    """sha256 of a file's bytes, also fed to every hash object in `also`."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            for other in also:
                other.update(chunk)
    return digest.hexdigest()


def digest_file(path: str | Path) -> str:
    return _hash_file(Path(path))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot digest a {type(value).__name__}; convert the config to JSON types first")


def digest_config(config: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): equal configs, equal digests, whatever the key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def model_digest(stage_manifest: Mapping[str, Any]) -> str:
    """Identify a checkpoint by what made it (its stage's inputs and config), not by its path or its metrics, whose
    timings differ when a stage reruns."""
    keys = ("input_digests", "config_digest")
    return digest_config({k: stage_manifest.get(k) for k in keys})


def _git_commit(tree: Path) -> str:
    if not (tree / ".git").exists():
        return "unknown"
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


@functools.cache
def code_version() -> dict[str, str]:
    """The package version and the source tree's git commit ("+dirty" with uncommitted changes, else "unknown")."""
    try:
        package = metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"package": package, "commit": _git_commit(Path(__file__).resolve().parents[2])}


def _schema_mismatch(table: pa.Table, schema: pa.Schema) -> str | None:
    """What keeps `table` from casting to `schema`: missing or unexpected fields, or the first field that fails."""
    missing = [name for name in schema.names if name not in table.column_names]
    unexpected = [name for name in table.column_names if name not in schema.names]
    if missing or unexpected:
        return "; ".join([*([f"missing field(s) {missing}"] if missing else []),
                          *([f"unexpected field(s) {unexpected}"] if unexpected else [])])
    for field in schema:
        try:
            table[field.name].cast(field.type)
        except (pa.ArrowException, ValueError) as err:
            found = table.schema.field(field.name).type
            return f"field {field.name!r} is {found}, the schema says {field.type} ({err})"
    return None


def read_parquet(path: Path, what: str = "Parquet file", error: type[ValueError] = ValueError) -> pa.Table:
    """pq.read_table, where a truncated or corrupted file raises one `error` naming it (a missing file stays a
    FileNotFoundError)."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise error(f"{path}: not a readable {what}, truncated or corrupted? ({err})") from None


def _read_shard(path: Path) -> pa.Table:
    """A shard in its declared schema: Parquet renames list items ("element"), the cast names them back.

    A shard that cannot be read or does not fit its schema raises one ValueError naming the file (and the field)."""
    table = read_parquet(path, "Parquet shard")
    kind = (table.schema.metadata or {}).get(b"kind", b"").decode()
    if kind not in SCHEMAS:
        return table
    try:
        return table.cast(SCHEMAS[kind])
    except (pa.ArrowException, ValueError) as err:
        problem = _schema_mismatch(table, SCHEMAS[kind]) or str(err)
        raise ValueError(f"{path}: does not match the {kind!r} schema: {problem}") from None


# When and how long a stage ran say nothing about what it made: a stage finished again with the same content keeps
# its earlier manifest, timing included.
_TIMING_KEYS = frozenset({"created", "seconds", "cores_busy"})


def _same_but_time(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return ({k: v for k, v in a.items() if k not in _TIMING_KEYS}
            == {k: v for k, v in b.items() if k not in _TIMING_KEYS})


def _cpu_busy_jiffies() -> int | None:
    """Machine-wide non-idle CPU time (all cores, in clock ticks) from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as file:
            fields = file.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already counted in user and
    # nice, idle and iowait are not busy.
    ticks = [int(value) for value in fields[1:9]]
    return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)


def _attempt_start() -> dict[str, Any]:
    return {"started": time.time(), "cpu_busy_jiffies": _cpu_busy_jiffies()}


def _attempt_timing(attempt: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Seconds since `attempt` began (wall clock) and the cores the machine kept busy meanwhile, on average.

    Machine-wide: on a shared machine it counts other processes too; it says how loaded the machine was while the
    stage ran, not what the stage alone used."""
    if not attempt or not isinstance(attempt.get("started"), (int, float)):
        return {"seconds": None, "cores_busy": None}
    seconds = max(0.0, time.time() - attempt["started"])  # a clock stepped back reads as 0, never negative
    before, now = attempt.get("cpu_busy_jiffies"), _cpu_busy_jiffies()
    cores = None
    if isinstance(before, int) and now is not None and seconds > 0:
        cores = round(max(0, now - before) / (seconds * os.sysconf("SC_CLK_TCK")), 2)
    return {"seconds": round(seconds, 3), "cores_busy": cores}


class StageStore:
    """One stage of one round: numbered Parquet shards and, once finished, a manifest."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def shard_path(self, index: int) -> Path:
        return self.path / f"part-{index:05d}.parquet"

    def write_shard(self, index: int, table: pa.Table) -> Path:
        if not 0 <= index <= 99_999:
            raise ValueError(f"shard index must be in [0, 99999], got {index}")
        return write_table_atomic(table, self.shard_path(index))

    def done_shards(self) -> set[int]:
        """Indices of complete shards; temp files left by dead writers are removed."""
        if not self.path.is_dir():
            return set()
        done = set()
        for entry in self.path.iterdir():
            match = _SHARD.fullmatch(entry.name)
            if match:
                done.add(int(match[1]))
            elif _is_abandoned_temp(entry):
                entry.unlink(missing_ok=True)
        return done

    def read(self) -> pa.Table:
        """All shards in index order; a finished stage without shards reads as an empty table of its schema."""
        paths = [self.shard_path(index) for index in sorted(self.done_shards())]
        if paths:
            return pa.concat_tables([_read_shard(path) for path in paths])
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.path}: no shards and no manifest")
        return SCHEMAS[manifest["schema_kind"]].empty_table()

    def begin(self, input_digests: Mapping[str, str], config_digest: str) -> set[int]:
        """Start (or resume) the stage for these inputs and config; returns the shards already done.

        Shards left by a run with other inputs or another config are not ours to resume: the folder is emptied
        first, so a resumed stage never mixes rows from two configs.
        """
        wanted = {"input_digests": dict(input_digests), "config_digest": config_digest}
        started = self._progress()
        same = started is not None and {key: started.get(key) for key in wanted} == wanted
        if not same and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        # Every begin starts a new attempt: a stage resumed after a crash is timed from here, so its manifest counts
        # this attempt only, not the work the crashed one did (or the time between the two). The attempt lives in
        # the progress file (not a file of its own) because checkpoint stages clear all else from their folder.
        text = json.dumps({**wanted, "attempt": _attempt_start()}, indent=2, sort_keys=True) + "\n"
        _write_atomic(self.path / PROGRESS, lambda file: file.write(text.encode()))
        return self.done_shards()

    def _progress(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / PROGRESS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def finish(
        self,
        schema_kind: str | None,
        input_digests: Mapping[str, str],
        config_digest: str,
        checkpoint: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write manifest.json for the shards present; every shard must declare `schema_kind`.

        `schema_kind=None` marks a stage whose output is only its checkpoint (and `extra`): it has no shards.
        """
        if schema_kind is not None and schema_kind not in SCHEMAS:
            raise ValueError(f"schema_kind: expected one of {sorted(SCHEMAS)} or None, got {schema_kind!r}")
        content = hashlib.sha256()
        shards = []
        for index in sorted(self.done_shards()):
            path = self.shard_path(index)
            parquet = pq.ParquetFile(path)
            declared = (parquet.schema_arrow.metadata or {}).get(b"kind", b"").decode()
            if declared != schema_kind:
                raise ValueError(f"{path}: its schema declares {declared or 'no kind'!r}, not {schema_kind!r}")
            shards.append({"index": index, "file": path.name, "rows": parquet.metadata.num_rows,
                           "digest": _hash_file(path, content)})
        manifest = {
            "schema_kind": schema_kind,
            "schema_version": SCHEMA_VERSION,
            "rows": sum(shard["rows"] for shard in shards),
            "content_digest": content.hexdigest(),
            "shards": shards,
            "input_digests": dict(input_digests),
            "config_digest": config_digest,
            "code_version": code_version(),
            "checkpoint": checkpoint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extra": extra or {},
            # Wall seconds and machine-wide cores busy since begin() (None when finished without one).
            **_attempt_timing((self._progress() or {}).get("attempt")),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        earlier = self.manifest()
        if earlier is not None and _same_but_time(earlier, json.loads(text)):
            # Finished again with the same shards, inputs, config and extra (a resumed run that rebuilt a
            # deterministic stage, e.g. the world's tables after a kill mid-world): the stage was not changed,
            # so neither is its manifest.
            return earlier
        _write_atomic(self.path / MANIFEST, lambda file: file.write(text.encode()))
        return manifest

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def is_complete(self, input_digests: Mapping[str, str], config_digest: str) -> bool:
        """Finished with these inputs and this config, under this schema version, and the shards on disk are
        exactly the ones recorded, byte for byte."""
        manifest = self.manifest()
        if manifest is None or manifest["schema_version"] != SCHEMA_VERSION:
            return False
        if manifest["input_digests"] != dict(input_digests) or manifest["config_digest"] != config_digest:
            return False
        if {shard["index"] for shard in manifest["shards"]} != self.done_shards():
            return False
        return all(digest_file(self.path / shard["file"]) == shard["digest"] for shard in manifest["shards"])


class RunStore:
    """`root` is one run's folder, `runs/<name>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage(self, round_no: int, name: str) -> StageStore:
        if not 0 <= round_no <= 99:
            raise ValueError(f"round must be in [0, 99], got {round_no}")
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(f"stage name must be a plain folder name, got {name!r}")
        return StageStore(self.root / f"round-{round_no:02d}" / name)
