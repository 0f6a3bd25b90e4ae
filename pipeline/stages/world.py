"""Round 0: build the embedded world once and keep its tables in the run store (one stage per table)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from pipeline.data.schemas import schema_of
from pipeline.data.store import RunStore
from pipeline.stages.cached import stage_digest
from pipeline.world import World, WorldConfig, build_tables

ROUND = 0
STAGE_VERSION = 2  # raised when the same config would give other tables (2: world v3's pairs never show one text)


def world_stage_name(table: str) -> str:
    return f"world_{table}"


def run_world(store: RunStore, config: WorldConfig) -> tuple[dict[str, pa.Table], bool]:
    """The world's tables (prompts_train, prompts_eval, demonstrations, preferences_bNN, corpus) and whether they
    came from the store (True) or were built now."""
    config_digest = stage_digest(dataclasses.asdict(config), STAGE_VERSION)
    names = _table_names(config)
    stages = {name: store.stage(ROUND, world_stage_name(name)) for name in names}
    if all(stage.is_complete({}, config_digest) for stage in stages.values()):
        return {name: stage.read() for name, stage in stages.items()}, True
    tables = build_tables(World(config))
    for name, table in tables.items():
        stage = stages[name]
        stage.begin({}, config_digest)
        stage.write_shard(0, table)
        stage.finish(schema_of(table), {}, config_digest)
    return tables, False


def _table_names(config: WorldConfig) -> list[str]:
    weeks = [f"preferences_b{b:02d}" for b in range(1, len(config.batch_sizes) + 1)]
    return ["prompts_train", "prompts_eval", "demonstrations", *weeks, "corpus"]
