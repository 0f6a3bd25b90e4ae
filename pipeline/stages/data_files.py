"""Round 0 from the user's own files instead of the embedded world: SFT demonstrations, helpfulness and safety
preference pairs (any layout `pipeline.data.readers` knows: TRL, HF, LLaMA-Factory, Alpaca; JSON, JSONL, CSV,
Parquet), loaded once into the run store as the same tables the world gives the driver:

- `demonstrations`; `preferences_bNN`, one per weekly batch (a file's `batch`), kind helpfulness or safety;
- `prompts_eval`: the prompts of the pairs the reward models hold out (rm.heldout_share per batch, the same hash
  draw as the RM stage), so no model trained on them; `prompts_train`: every other distinct pair prompt, which
  rejection sampling and PPO sample from;
- `rejects`: every row any file could not give (file, row, field, reason, the row itself);
- with `data.gatt`, `gatt_instructions` and `gatt_dialogues`: Ghost Attention's inputs
  (pipeline/stages/gatt/sources.py).

There is no oracle for such data: the driver judges these runs with the reward models and the LLM judge only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from model.tokenizer import Tokenizer
from pipeline.data.readers import load
from pipeline.data.schemas import PROMPTS, REJECTS, RISK_CATEGORIES, schema_of
from pipeline.data.store import RunStore, digest_config, digest_file
from pipeline.stages.gatt.sources import GAttFiles, load_instructions
from pipeline.stages.reward_model.algorithm import split_heldout

ROUND = 0
FILE_KINDS = ("sft", "helpfulness", "safety")
GATT_FILES = ("instructions", "dialogues")


@dataclass
class DataFile:
    path: str
    limit: int | None = None  # keep the first `limit` accepted rows (sizes a run); null: all
    batch: int = 1  # the weekly batch its preference pairs arrive in (rounds.new_batches ingests them)
    column_map: dict[str, str] = field(default_factory=dict)  # {our field: your column}
    defaults: dict[str, Any] = field(default_factory=dict)  # values for fields a file or a row lacks

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit = {self.limit}: must be >= 1 (or null for every row)")
        if self.batch < 1:
            raise ValueError(f"batch = {self.batch}: weekly batches count from 1")


@dataclass
class DataConfig:
    """`data.sft` / `data.helpfulness` / `data.safety`: lists of files; all empty (the default): the world."""

    sft: list[DataFile] = field(default_factory=list)
    helpfulness: list[DataFile] = field(default_factory=list)
    safety: list[DataFile] = field(default_factory=list)
    max_tokens: int = 1024  # rows longer than this in the policy's chat format are rejected (with the reason)
    max_reject_share: float = 0.1  # more rejects than this share of a file stops the run, naming the rows
    eval_prompts: int = 64  # at most this many held-out prompts per kind are evaluated on
    # Ghost Attention's instruction list and multi-turn dialogues (rounds.gatt.gatt_from needs them in such a run).
    gatt: GAttFiles = field(default_factory=GAttFiles)
    # The command that creates these files (an experiment's set-up), named when one of them is missing.
    setup: str | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.enabled and not (self.sft and self.helpfulness and self.safety):
            missing = [kind for kind in FILE_KINDS if not getattr(self, kind)]
            errors.append(f"data.{missing[0]}: no files; a run from files needs SFT demonstrations and helpfulness "
                          "and safety pairs (leave all three empty for the embedded world)")
        files = [(f"data.{kind}[{i}].path", spec, "path")
                 for kind in FILE_KINDS for i, spec in enumerate(getattr(self, kind))]
        files += [(f"data.gatt.{name}", self.gatt, name) for name in GATT_FILES if getattr(self.gatt, name) is not None]
        for key, owner, name in files:
            path = Path(getattr(owner, name)).expanduser().resolve()
            if not path.exists():
                errors.append(f"{key} = {getattr(owner, name)!r}: no such file or folder ({path})")
            setattr(owner, name, str(path))  # absolute: Ray jobs may run elsewhere
        if errors and self.setup:
            errors.append(f"this experiment's own files are made by `{self.setup}`: run it first")
        if self.max_tokens < 16:
            errors.append(f"data.max_tokens = {self.max_tokens}: must be >= 16")
        if not 0 <= self.max_reject_share < 1:
            errors.append(f"data.max_reject_share = {self.max_reject_share}: must be in [0, 1)")
        if self.eval_prompts < 1:
            errors.append(f"data.eval_prompts = {self.eval_prompts}: must be >= 1")
        if errors:
            raise ValueError("\n".join(errors))

    @property
    def enabled(self) -> bool:
        return bool(self.sft or self.helpfulness or self.safety)


def data_stage_name(table: str) -> str:
    return f"data_{table}"


def run_data_files(store: RunStore, config: DataConfig, tokenizer: Tokenizer, heldout_share: float,
                   heldout_pairs: int | None) -> tuple[dict[str, pa.Table], bool]:
    """The tables (see the module doc) and whether they came from the store. The stage's inputs are the files'
    bytes, so an edited file reloads; `tokenizer` is the policy's (its chat format decides `max_tokens`)."""
    inputs = {f"{kind}[{i}]": digest_file(spec.path) for kind in FILE_KINDS
              for i, spec in enumerate(getattr(config, kind))}
    if config.gatt.enabled:
        inputs |= {f"gatt.{name}": digest_file(getattr(config.gatt, name)) for name in GATT_FILES}
    config_digest = digest_config({"data": dataclasses.asdict(config), "heldout": [heldout_share, heldout_pairs],
                                   "tokenizer": tokenizer.vocab_size, "template": tokenizer.chat_template})
    names = _table_names(config)
    stages = {name: store.stage(ROUND, data_stage_name(name)) for name in names}
    if all(stage.is_complete(inputs, config_digest) for stage in stages.values()):
        return {name: stage.read() for name, stage in stages.items()}, True
    tables = load_tables(config, tokenizer, heldout_share, heldout_pairs, store.root / "rejects")
    for name, table in tables.items():
        stage = stages[name]
        stage.begin(inputs, config_digest)
        stage.write_shard(0, table)
        stage.finish(schema_of(table), inputs, config_digest)
    return tables, False


def load_tables(config: DataConfig, tokenizer: Tokenizer, heldout_share: float, heldout_pairs: int | None,
                rejects_dir: Path) -> dict[str, pa.Table]:
    """Every file's rows also land in `rejects_dir/<kind><i>-<file>.parquet` when rejected, before a file with
    too many rejects stops the run (so they can be looked at)."""
    loaded: dict[str, list[pa.Table]] = {kind: [] for kind in FILE_KINDS}
    rejects = []
    for kind in FILE_KINDS:
        for i, spec in enumerate(getattr(config, kind)):
            defaults = ({"batch": spec.batch, "kind": kind} if kind != "sft" else {}) | spec.defaults
            result = load(spec.path, "demonstrations" if kind == "sft" else "preferences",
                          column_map=spec.column_map, defaults=defaults, tokenizer=tokenizer,
                          max_tokens=config.max_tokens, max_reject_share=config.max_reject_share,
                          rejects_path=rejects_dir / f"{kind}{i}-{Path(spec.path).stem}.parquet")
            loaded[kind].append(result.table if spec.limit is None else result.table.slice(0, spec.limit))
            rejects.append(result.rejects)
    pairs = pa.concat_tables(loaded["helpfulness"] + loaded["safety"])
    tables = {"demonstrations": pa.concat_tables(loaded["sft"])}
    for batch in sorted(set(pairs.column("batch").to_pylist())):
        tables[f"preferences_b{batch:02d}"] = pairs.filter(pc.equal(pairs["batch"], batch))
    _, heldout = split_heldout(pairs, heldout_share, heldout_pairs)
    tables["prompts_eval"] = prompts_of(heldout, limit=config.eval_prompts)
    held = set(_prompt_key(m) for m in tables["prompts_eval"].column("messages").to_pylist())
    train = prompts_of(pairs)
    keep = [_prompt_key(m) not in held for m in train.column("messages").to_pylist()]
    tables["prompts_train"] = train.filter(pa.array(keep, pa.bool_()))
    if config.gatt.enabled:  # their rejected rows join the files' in the rejects table
        tables["gatt_instructions"], rejected = load_instructions(
            config.gatt.instructions, rejects_dir / f"gatt_instructions-{Path(config.gatt.instructions).stem}.parquet",
            config.max_reject_share)
        chats = load(config.gatt.dialogues, "demonstrations", tokenizer=tokenizer, max_tokens=config.max_tokens,
                     max_reject_share=config.max_reject_share,
                     rejects_path=rejects_dir / f"gatt_dialogues-{Path(config.gatt.dialogues).stem}.parquet")
        tables["gatt_dialogues"] = chats.table
        rejects += [rejected, chats.rejects]
    tables["rejects"] = pa.concat_tables(rejects).cast(REJECTS)
    return tables


def prompts_of(pairs: pa.Table, limit: int | None = None) -> pa.Table:
    """The distinct prompts of preference pairs as a PROMPTS table, at most `limit` per kind: helpfulness pairs'
    prompts are "helpful"; safety pairs' take the risk category in their meta ({"category": ...}) when it names
    one, else the first (files rarely label it; only the safety metrics by category read it)."""
    rows, seen, per_kind = [], set(), {"helpfulness": 0, "safety": 0}
    for pair in pairs.select(["prompt", "kind", "meta"]).to_pylist():
        key = _prompt_key(pair["prompt"])
        if key in seen or (limit is not None and per_kind[pair["kind"]] >= limit):
            continue
        seen.add(key)
        per_kind[pair["kind"]] += 1
        safety = pair["kind"] == "safety"
        category = "helpful"
        if safety:
            named = _meta(pair["meta"]).get("category")
            category = named if named in RISK_CATEGORIES else RISK_CATEGORIES[0]
        rows.append({"id": hashlib.sha256(key.encode()).hexdigest()[:24], "messages": pair["prompt"],
                     "category": category, "attack_vector": None, "is_safety": safety, "meta": "{}"})
    return pa.Table.from_pylist(rows, schema=PROMPTS)


def _meta(text: str | None) -> dict[str, Any]:
    try:
        meta = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _prompt_key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def _table_names(config: DataConfig) -> list[str]:
    batches = sorted({spec.batch for kind in ("helpfulness", "safety") for spec in getattr(config, kind)})
    return ["demonstrations", *(f"preferences_b{b:02d}" for b in batches), "prompts_eval", "prompts_train",
            "rejects", *(("gatt_instructions", "gatt_dialogues") if config.gatt.enabled else ())]
