"""Arrow tables of the world, in the declared schemas of pipeline/data/schemas.py, and their Parquet files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import schemas
from pipeline.world.corpus import corpus
from pipeline.world.preferences import Comparison, preference_batch
from pipeline.world.sft import demonstrations
from pipeline.world.world import SPLITS, Prompt, World


def dump_meta(meta: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, no spaces), so equal metas are equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompts_table(world: World, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ValueError(f"prompts_table: unknown split {split!r}, expected one of {SPLITS}")
    counters: dict[str, int] = {}
    prompts, ids = world.prompts(split), []
    for p in prompts:
        counters[p.category] = counters.get(p.category, 0) + 1
        ids.append(f"{split}-{p.category}-{counters[p.category]:05d}")
    return pa.Table.from_pylist(prompt_rows(prompts, ids), schema=schemas.PROMPTS)


def prompt_rows(prompts: Iterable[Prompt], ids: Iterable[str]) -> list[dict[str, Any]]:
    """PROMPTS rows (meta as JSON) of prompts with these ids."""
    return [{"id": i, "messages": p.messages, "category": p.category, "attack_vector": p.attack_vector,
             "is_safety": p.is_safety, "meta": dump_meta(p.meta)} for p, i in zip(prompts, ids, strict=True)]


def demonstrations_table(world: World) -> pa.Table:
    rows = []
    for i, d in enumerate(demonstrations(world)):
        meta = {**d.prompt.meta, "attack_vector": d.prompt.attack_vector} if d.prompt.is_safety else d.prompt.meta
        if d.writer is not None:  # world v3: who wrote it and its habits, for the oracle's side only
            meta = {**meta, "writer": d.writer, "habits": list(d.habits)}
        rows.append({"id": f"sft-{i:05d}", "messages": d.messages, "category": d.prompt.category,
                     "source": "world", "meta": dump_meta(meta)})
    return pa.Table.from_pylist(rows, schema=schemas.DEMONSTRATIONS)


def comparison_rows(comparisons: Iterable[Comparison], id_prefix: str, source: str) -> list[dict[str, Any]]:
    """PREFERENCES rows; the margin stays null so the rating decides it."""
    rows = []
    for i, c in enumerate(comparisons):
        meta = {"category": c.prompt.category, "attack_vector": c.prompt.attack_vector, "key": c.prompt.meta["key"],
                "scores": list(c.scores), "qualities": list(c.qualities) if c.qualities else None}
        rows.append({"id": f"{id_prefix}-{i:05d}", "batch": c.batch, "prompt": c.prompt.messages,
                     "chosen": c.chosen, "rejected": c.rejected, "rating": c.rating, "margin": None,
                     "chosen_safe": c.chosen_safe, "rejected_safe": c.rejected_safe, "kind": c.kind,
                     "source": source, "meta": dump_meta(meta)})
    return rows


def preferences_table(world: World, batch: int) -> pa.Table:
    rows = comparison_rows(preference_batch(world, batch), f"pref-b{batch:02d}", "world")
    return pa.Table.from_pylist(rows, schema=schemas.PREFERENCES)


def corpus_table(world: World) -> pa.Table:
    rows = [{"text": d.text, "kind": d.kind, "category": d.category, "quality": d.quality} for d in corpus(world)]
    return pa.Table.from_pylist(rows, schema=schemas.CORPUS)


def build_tables(world: World) -> dict[str, pa.Table]:
    """Every table by file stem: prompts_train, prompts_eval, demonstrations, preferences_bNN, corpus."""
    tables = {f"prompts_{split}": prompts_table(world, split) for split in SPLITS}
    tables["demonstrations"] = demonstrations_table(world)
    for batch in range(1, len(world.config.batch_sizes) + 1):
        tables[f"preferences_b{batch:02d}"] = preferences_table(world, batch)
    tables["corpus"] = corpus_table(world)
    return tables


def write_tables(tables: Mapping[str, pa.Table], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in tables.items():
        pq.write_table(table, out / f"{name}.parquet")
        paths.append(out / f"{name}.parquet")
    return paths
