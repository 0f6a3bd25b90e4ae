"""Bad inputs and security defaults.

Every bad input gives one clear error naming the file, and the row and field where there is one (or a rejects
table with the reason), never a bare library error; and nothing an earlier stage wrote to the run store is touched
(bytes and mtimes compared before and after). The simpler cases of each kind live beside their module
(tests/test_readers.py: bad JSON lines, missing columns in JSON, empty files, duplicate ids, over-long rows in JSON
lines; tests/test_checkpoint.py: missing, extra and mis-shaped tensors in a single-file checkpoint); here they
run against a run store, in the formats and layouts those tests do not use.

Security (docs/design.md, "Operations"): checkpoints are safetensors only and nothing unpickles a file,
`torch.load` only with `weights_only=True`, never `trust_remote_code`, the Ray dashboard on 127.0.0.1 unless
configured, and config paths resolved and checked before anything starts.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from model.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from model.tokenizer import SentencePieceTokenizer
from pipeline.data.readers import DataError, load
from pipeline.data.schemas import PREFERENCES
from pipeline.data.store import RunStore, digest_config
from pipeline.data.store import CHECKPOINT_DIR
from pipeline.stages.cached import checkpoint_stage

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64  # the model context the over-long rows are measured against


# --- a run store with finished earlier stages ------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: its bytes and mtime (ns). Folders are covered by the files they hold."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def preference_rows(n: int, **changes: Any) -> list[dict[str, Any]]:
    return [{"id": f"p{i}", "batch": 1, "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": f"It is {2 * i}.", "rejected": "No idea.", "rating": "better", "kind": "helpfulness",
             **changes} for i in range(n)]


@pytest.fixture
def store(tmp_path) -> RunStore:
    """Round 0 finished: a data stage (two shards and a manifest) and a checkpoint stage (sharded safetensors)."""
    store = RunStore(tmp_path / "runs" / "demo")
    world = store.stage(0, "world")
    world.begin({}, digest_config({"seed": 0}))
    world.write_shard(0, pa.Table.from_pylist(preference_rows(3), schema=PREFERENCES))
    world.write_shard(1, pa.Table.from_pylist(preference_rows(2), schema=PREFERENCES))
    world.finish("preferences", {}, digest_config({"seed": 0}))

    def train(out: Path) -> dict[str, float]:
        save_checkpoint(tiny_model(seed=1), out, max_shard_bytes=60_000)
        return {"loss": 1.0}

    folder, _, cached = checkpoint_stage(store, 0, "pretrain", {"corpus": "c0"}, {"lr": 1e-3}, train)
    assert not cached and len(list(folder.glob("model-*.safetensors"))) > 2
    return store


@pytest.fixture(scope="module")
def tokenizer() -> SentencePieceTokenizer:
    texts = [f"what is {i} plus {i} it is {2 * i} no idea paris is the capital number {i}" for i in range(100)]
    return SentencePieceTokenizer.train(texts, vocab_size=320)


# --- data files ------------------------------------------------------------------------------------------------


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def truncated_parquet(folder: Path) -> Path:
    data = parquet_bytes(preference_rows(20))
    (path := folder / "prefs.parquet").write_bytes(data[: len(data) // 2])  # the footer is gone
    return path


def corrupted_parquet(folder: Path) -> Path:
    data = bytearray(parquet_bytes(preference_rows(20)))
    data[100:140] = b"\xaa" * 40  # footer intact, a data page garbled
    (path := folder / "prefs.parquet").write_bytes(bytes(data))
    return path


def missing_column(folder: Path) -> Path:
    rows = [{k: v for k, v in row.items() if k != "kind"} for row in preference_rows(3)]
    pq.write_table(pa.Table.from_pylist(rows), path := folder / "prefs.parquet")
    return path


def wrong_type(folder: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(preference_rows(3, batch="1")), path := folder / "prefs.parquet")
    return path


def jsonl_with(folder: Path, bad_line: bytes) -> Path:
    lines = [json.dumps(row).encode() for row in preference_rows(3)]
    lines[1] = bad_line
    (path := folder / "prefs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return path


def non_utf8_jsonl(folder: Path) -> Path:
    return jsonl_with(folder, json.dumps(preference_rows(2)[1]).encode().replace(b"It is", b"It\xff\xfe is"))


def lone_surrogate_jsonl(folder: Path) -> Path:  # valid bytes, but a \u escape of half a UTF-16 pair
    return jsonl_with(folder, json.dumps(preference_rows(2)[1]).encode().replace(b"It is", b"It \\ud800 is"))


def non_utf8_csv(folder: Path) -> Path:
    text = "prompt,chosen,rejected,batch,kind\nQ0,A0,B0,1,helpfulness\nQ1,A\xe91,B1,1,helpfulness\n"
    (path := folder / "prefs.csv").write_bytes(text.encode("latin-1"))  # é as one byte: not UTF-8
    return path


def non_utf8_parquet(folder: Path) -> Path:
    chosen = pa.array([b"fine", b"\xff\xfe", b"fine too"], pa.binary()).view(pa.string())  # as other writers can
    table = pa.Table.from_pylist(preference_rows(3)).set_column(3, "chosen", chosen)
    pq.write_table(table, path := folder / "prefs.parquet")
    return path


def empty_parquet(folder: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(preference_rows(1)).slice(0, 0), path := folder / "prefs.parquet")
    return path


def over_long_parquet(folder: Path) -> Path:  # the Arrow path, the prompt/completion layout, demonstrations
    rows = [{"prompt": "What is 1 plus 1?", "completion": "It is 2."},
            {"prompt": "What is 2 plus 2?", "completion": "it is four " * (5 * CONTEXT)},  # > 10x the context
            {"prompt": "What is 3 plus 3?", "completion": "It is 6."}]
    pq.write_table(pa.Table.from_pylist(rows), path := folder / "sft.parquet")
    return path


def duplicate_ids_parquet(folder: Path) -> Path:
    rows = preference_rows(3)
    rows[2]["id"] = "p0"
    pq.write_table(pa.Table.from_pylist(rows), path := folder / "prefs.parquet")
    return path


class Case:
    def __init__(self, write: Callable[[Path], Path], message: str, rejects: list[tuple[int, str]] | None = None,
                 kind: str = "preferences", reason: str = "") -> None:
        self.write, self.message, self.rejects, self.kind, self.reason = write, message, rejects, kind, reason


# rejects: None for a file that cannot be read row by row (one DataError whatever max_reject_share), else the
# (row, field) of every rejected row, whose reason matches `reason`.
CASES = {
    "truncated parquet": Case(truncated_parquet, r"not a readable Parquet file, truncated or corrupted\?"),
    "corrupted parquet page": Case(corrupted_parquet, r"not a readable Parquet file, truncated or corrupted\?"),
    "missing column": Case(missing_column, r"no 'kind' column; add one, map yours with column_map"),
    "wrong column type": Case(wrong_type, r"3 of 3 rows rejected.*\n  row 0, field batch: expected an integer, got str",
                              [(0, "batch"), (1, "batch"), (2, "batch")], reason="expected an integer, got str"),
    "non-UTF-8 JSONL": Case(non_utf8_jsonl, r"row 1, field <json>: not valid UTF-8 \(byte 0xff at byte \d+ of",
                            [(1, "<json>")], reason=r"^not valid UTF-8 \(byte 0xff"),
    "lone surrogate JSONL": Case(lone_surrogate_jsonl, r"row 1, field <json>: not valid UTF-8 text: lone surrogate",
                                 [(1, "<json>")], reason="lone surrogate"),
    "non-UTF-8 CSV": Case(non_utf8_csv, r"line 3: not valid UTF-8 \(byte 0xe9\); save the file as UTF-8"),
    "non-UTF-8 Parquet": Case(non_utf8_parquet, r"row 1, field chosen: not valid UTF-8 text"),
    "zero rows": Case(empty_parquet, r": no rows$"),
    "over-long row": Case(over_long_parquet, r"row 1, field prompt\+completion: \d+ tokens > context 64",
                          [(1, "prompt+completion")], kind="demonstrations", reason=r"^\d+ tokens > context 64$"),
    "duplicate ids": Case(duplicate_ids_parquet, r"row 2, field id: duplicate id 'p0', first at row 0",
                          [(2, "id")], reason="duplicate id 'p0', first at row 0"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_data_file_gives_one_clear_error_and_touches_no_earlier_stage(tmp_path, store, tokenizer, name):
    case = CASES[name]
    (tmp_path / "in").mkdir()
    path = case.write(tmp_path / "in")
    earlier = snapshot(store.root / "round-00")
    rejects_path = store.stage(1, "ingest").path / "rejects.parquet"
    kwargs = {"tokenizer": tokenizer, "max_tokens": CONTEXT, "rejects_path": rejects_path}

    with pytest.raises(DataError) as raised:  # the default: no bad row is allowed
        load(path, case.kind, **kwargs)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message  # the file first, whatever went wrong
    assert re.search(case.message, message, re.MULTILINE), message
    # one error: no library exception chained under it ("During handling of the above exception ...")
    assert raised.value.__cause__ is None and (raised.value.__suppress_context__ or raised.value.__context__ is None)

    if case.rejects is None:
        with pytest.raises(DataError, match=re.escape(str(path))):  # a whole-file problem: no share allows it
            load(path, case.kind, **kwargs, max_reject_share=1.0)
        assert not rejects_path.exists()
    else:
        result = load(path, case.kind, **kwargs, max_reject_share=1.0)
        rejects = result.rejects.to_pylist()
        assert [(r["row"], r["field"]) for r in rejects] == case.rejects
        assert all(r["source"] == str(path) and re.search(case.reason, r["reason"]) for r in rejects), rejects
        assert result.summary.rejected == len(case.rejects)
        assert result.table.num_rows == result.summary.total - len(case.rejects)
        assert pq.read_table(rejects_path).to_pylist() == rejects  # kept in the later stage's folder
        result.table.to_pylist()  # what is accepted is whole: no bad text waiting to fail in a later stage
        if name == "over-long row":
            assert int(rejects[0]["reason"].split()[0]) > 10 * CONTEXT
    assert snapshot(store.root / "round-00") == earlier


# --- shards of an earlier stage --------------------------------------------------------------------------------


def _shard_without_rating(table: pa.Table) -> pa.Table:
    return table.drop_columns(["rating"]).replace_schema_metadata(PREFERENCES.metadata)


def _shard_with_text_batch(table: pa.Table) -> pa.Table:
    batch = pa.array(["week one"] * table.num_rows)
    return table.set_column(1, "batch", batch).replace_schema_metadata(PREFERENCES.metadata)


SHARDS = {
    "truncated": (None, r"not a readable Parquet shard, truncated or corrupted\?"),
    "missing field": (_shard_without_rating,
                      r"does not match the 'preferences' schema: missing field\(s\) \['rating'\]"),
    "wrong type": (_shard_with_text_batch, r"does not match the 'preferences' schema: field 'batch' is string, "
                                           r"the schema says int32"),
}


@pytest.mark.parametrize("name", SHARDS)
def test_bad_shard_is_named_with_its_field(store, name):
    edit, pattern = SHARDS[name]
    stage = store.stage(0, "world")
    shard = stage.shard_path(1)
    if edit is None:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    else:
        pq.write_table(edit(pq.read_table(shard)), shard)
    before = snapshot(store.root / "round-00")
    with pytest.raises(ValueError, match=pattern) as raised:
        stage.read()
    assert str(raised.value).startswith(f"{shard}: ")
    assert snapshot(store.root / "round-00") == before


# --- checkpoints of an earlier stage ---------------------------------------------------------------------------


def _edit_shard(folder: Path, tensor: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Apply `edit` to the tensors of the shard holding `tensor`; returns that shard."""
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    shard = folder / weight_map[tensor]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def _extra(folder: Path) -> Path:
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.mlp.bonus.weight"] = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return _edit_shard(folder, "model.layers.0.mlp.up_proj.weight",
                       lambda t: t.__setitem__("model.layers.0.mlp.bonus.weight", torch.zeros(3)))


def _missing(folder: Path) -> Path:
    name = "model.layers.1.self_attn.v_proj.weight"
    _edit_shard(folder, name, lambda t: t.pop(name))
    index = json.loads((folder / INDEX_FILE).read_text())
    del index["weight_map"][name]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder / INDEX_FILE


def _truncated(folder: Path) -> Path:
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


CHECKPOINTS = {
    "wrong shape": (lambda f: _edit_shard(f, "model.layers.0.self_attn.k_proj.weight",
                                          lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                                  torch.zeros(64, 64))),
                    r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), config\.json "
                    r"implies \(32, 64\)"),
    "missing tensor": (_missing, r"missing tensor\(s\) \['model\.layers\.1\.self_attn\.v_proj\.weight'\]"),
    "missing from its shard": (lambda f: _edit_shard(f, "model.norm.weight", lambda t: t.pop("model.norm.weight")),
                               r"tensor 'model\.norm\.weight' is listed in model\.safetensors\.index\.json but "
                               r"not in this file"),
    "unknown tensor": (_extra, r"unexpected tensor 'model\.layers\.0\.mlp\.bonus\.weight'"),
    "truncated shard": (_truncated, r"not a readable safetensors file .*truncated, corrupted or another format"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_bad_checkpoint_of_an_earlier_stage_is_named_and_left_alone(store, name):
    edit, pattern = CHECKPOINTS[name]
    folder = store.stage(0, "pretrain").path / CHECKPOINT_DIR
    named = edit(folder)
    before = snapshot(store.root / "round-00")

    def train(out: Path) -> dict[str, float]:  # a later stage starting from the earlier checkpoint
        save_checkpoint(load_checkpoint(folder), out)
        return {"loss": 0.5}

    with pytest.raises(CheckpointError, match=pattern) as raised:
        checkpoint_stage(store, 1, "sft", {"base": "b0"}, {"lr": 1e-4}, train)
    assert str(raised.value).startswith(f"{named}: ")  # the file (in the checkpoint folder) first
    assert str(folder) in str(raised.value)
    assert snapshot(store.root / "round-00") == before
    later = store.stage(1, "sft")
    assert later.manifest() is None and not (later.path / CHECKPOINT_DIR).exists()


# --- security defaults -----------------------------------------------------------------------------------------


def _booby_trapped_pickle(sentinel: Path) -> bytes:
    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))  # unpickling this creates the sentinel file

    return pickle.dumps({"model.norm.weight": Trap()})


def test_checkpoints_are_safetensors_only_and_pickles_are_never_opened(tmp_path):
    folder = save_checkpoint(tiny_model(seed=2), tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SINGLE_FILE]
    with safe_open(folder / SINGLE_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and len(list(f.keys())) > 0
    sharded = save_checkpoint(tiny_model(seed=2), tmp_path / "sharded", max_shard_bytes=60_000)
    assert {p.suffix for p in sharded.iterdir()} == {".json", ".safetensors"}

    sentinel = tmp_path / "unpickled"
    trap = _booby_trapped_pickle(sentinel)
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt", "training_args.bin"):
        (folder / name).write_bytes(trap)
    loaded = load_checkpoint(folder)  # the pickles beside the safetensors are ignored
    assert torch.equal(loaded.model.norm.weight, tiny_model(seed=2).model.norm.weight)
    # an index pointing at a pickle is refused by name, not unpickled
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"] = {name: "pytorch_model.bin" for name in index["weight_map"]}
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    (sharded / "pytorch_model.bin").write_bytes(trap)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable safetensors file"):
        load_checkpoint(sharded)
    assert not sentinel.exists()


def _sources(*suffixes: str) -> list[Path]:
    """The repository's own files with these suffixes: no virtualenv, run store, caches or build output."""
    skip = {"runs", "outputs", "multirun", "build", "dist", "node_modules", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")
                   and (not d.startswith(".") or d == ".ci")]
        found += [Path(folder) / name for name in files if Path(name).suffix in suffixes]
    return sorted(found)


def _dotted(node: ast.AST) -> str:
    return ast.unparse(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""


def unsafe_loads(source: str) -> list[str]:
    """Calls that may unpickle: torch.load without weights_only=True, pickle-family loads, np.load(allow_pickle)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            found += [f"line {node.lineno}: from {node.module} import load" for a in node.names if a.name == "load"]
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if func in ("torch.load", "torch.serialization.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif func in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load",
                      "dill.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif func in ("np.load", "numpy.load"):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_torch_load_only_with_weights_only_and_no_pickle_loads():
    assert unsafe_loads("import torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)"
                        "\nfrom torch import load\npickle.loads(b)\n") != []  # the checker finds what it should
    assert len(unsafe_loads("torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
                            "pickle.loads(b)\n")) == 4
    assert unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\n") == []
    sources = _sources(".py")
    assert len(sources) > 50 and REPO / "model" / "checkpoint.py" in sources
    found = {str(p.relative_to(REPO)): bad for p in sources if (bad := unsafe_loads(p.read_text()))}
    assert found == {}


def remote_code(source: str) -> list[str]:
    """trust_remote_code set to anything but False: as a keyword, or as a dict key."""
    found = []
    for node in ast.walk(ast.parse(source)):
        values = []
        if isinstance(node, ast.Call):
            values = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
        elif isinstance(node, ast.Dict):
            values = [v for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value == "trust_remote_code"]
        found += [f"line {v.lineno}: trust_remote_code={ast.unparse(v)}" for v in values
                  if not (isinstance(v, ast.Constant) and v.value is False)]
    return found


_REMOTE_CODE_TEXT = re.compile(r"trust[_-]remote[_-]code(?!\s*[:=]\s*(false|no|0)\b)", re.IGNORECASE)


def test_trust_remote_code_is_never_set():
    assert len(remote_code("f(trust_remote_code=True)\nf(trust_remote_code=flag)\nd = {'trust_remote_code': 1}\n"
                           "f(trust_remote_code=False)\n")) == 3
    found = {str(p.relative_to(REPO)): bad for p in _sources(".py") if (bad := remote_code(p.read_text()))}
    assert found == {}
    # configs, scripts and container files: any mention that is not an explicit false
    texts = _sources(".yaml", ".yml", ".json", ".toml", ".sh", ".cfg", ".ini", ".txt")
    texts += [p for p in (REPO / "Makefile", *REPO.glob("docker/**/Dockerfile*")) if p.is_file()]
    found = {str(p.relative_to(REPO)): m.group(0) for p in texts
             if (m := _REMOTE_CODE_TEXT.search(p.read_text(errors="replace")))}
    assert found == {}


def test_ray_dashboard_binds_to_localhost_unless_configured(monkeypatch):
    import ray

    from pipeline.cluster.pools import ClusterConfig, connect

    assert ClusterConfig().dashboard_host == "127.0.0.1"
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs) or type("Ctx", (), {"dashboard_url": ""}))
    monkeypatch.setattr(ray, "cluster_resources", dict)
    connect(ClusterConfig())
    assert calls[0]["dashboard_host"] == "127.0.0.1" and calls[0]["address"] == "local"
    # nothing in the code or the configs binds every interface
    found = [str(p.relative_to(REPO)) for p in _sources(".py", ".yaml", ".yml")
             if p.relative_to(REPO).parts[0] in ("pipeline", "actors", "model", "conf", "scripts")
             and "0.0.0.0" in p.read_text()]
    assert found == []


def test_config_paths_are_resolved_and_checked(tmp_path, monkeypatch):
    from pipeline.config.run import validate
    from pipeline.config.build import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder in (tmp_path / "models" / "base", tmp_path / "home" / "llama"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    config = validate({"base_models": {"small": "models/base", "large": "~/llama"}})
    assert config.base_models == {"small": str(tmp_path / "models" / "base"),  # absolute: actors run elsewhere
                                  "large": str(tmp_path / "home" / "llama")}

    missing = re.escape(str(tmp_path / "models" / "nope"))
    with pytest.raises(ConfigError, match=rf"^base_models\.small = 'models/nope' \(resolved to {missing}\): "
                                          r"no config\.json there \(expected a HF checkpoint folder\)$"):
        validate({"base_models": {"small": "models/nope"}})
    (tmp_path / "models" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"base_models\.small = '.*/models/empty': no config\.json there"):
        validate({"base_models": {"small": str(tmp_path / "models" / "empty")}})
    for name in ("../elsewhere", "a/b", ".hidden", ""):
        with pytest.raises(ConfigError, match=rf"^run: name = {re.escape(repr(name))}: must be a plain folder name"):
            validate({"run": {"name": name}})
    with pytest.raises(ConfigError, match=r"^run: root = '': set a folder"):
        validate({"run": {"root": ""}})
