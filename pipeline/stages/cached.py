"""Run a stage at most once per (inputs, config): `checkpoint_stage` for a checkpoint folder, `table_stage` for
Parquet shards or a manifest alone."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.data.store import CHECKPOINT_DIR, PROGRESS, RunStore, StageStore, digest_config

# Beside the checkpoint folder: what a training run saved to resume from (train.save_every; model/sharded.py).
TRAIN_STATE_DIR = "train_state"


def training_recipe(config: Any) -> dict[str, Any]:
    """A training config (with a `train` block) as its stage digests it: all of it but how often a run saves to
    resume, which is not part of what it trains."""
    recipe = dataclasses.asdict(config)
    del recipe["train"]["save_every"]
    return recipe


def stage_digest(config: Any, version: int = 0) -> str:
    """What a stage's manifest keeps of its config: the config, and its module's STAGE_VERSION, which a change to
    what the stage makes from the same inputs and config raises so that stores remake it (0 adds nothing)."""
    return digest_config({**config, "version": version} if version else config)


def checkpoint_stage(store: RunStore, round_no: int, name: str, inputs: Mapping[str, str],
                     config: Any, train: Callable[[Path], dict[str, Any]],
                     version: int = 0) -> tuple[Path, dict[str, Any], bool]:
    """(checkpoint folder, metrics, cached). `train(out_dir)` writes the checkpoint and returns its metrics;
    it runs only when the stage is not complete for these inputs, this config and `version` (`stage_digest`), or
    its folder is gone."""
    stage = store.stage(round_no, name)
    config_digest = stage_digest(config, version)
    folder = stage.path / CHECKPOINT_DIR
    if stage.is_complete(inputs, config_digest) and (folder / "config.json").is_file():
        return folder, stage.manifest()["extra"]["metrics"], True
    stage.begin(inputs, config_digest)
    _clear_leftovers(stage)
    metrics = train(folder)
    stage.finish(None, inputs, config_digest, checkpoint=CHECKPOINT_DIR, extra={"metrics": metrics})
    shutil.rmtree(stage.path / TRAIN_STATE_DIR, ignore_errors=True)  # done: nothing left to resume
    return folder, metrics, False


def train_state_dir(checkpoint_dir: str | Path) -> Path:
    """Where the training run writing `checkpoint_dir` saves its state to resume from: beside it, in the stage's
    folder, where `_clear_leftovers` keeps it for a re-run of the same stage."""
    return Path(checkpoint_dir).parent / TRAIN_STATE_DIR


def table_stage(store: RunStore, round_no: int, name: str, inputs: Mapping[str, str],
                config: Any, make: Callable[[StageStore, set[int]], dict[str, Any] | None],
                schema_kind: str | None, version: int = 0) -> tuple[StageStore, bool]:
    """(stage, cached). `make(stage, done)` writes the stage's shards of `schema_kind` (None: the manifest's
    `extra` is the whole output), skipping `done`, the shards an interrupted attempt with the same inputs and
    config finished, and returns the manifest's `extra`; it runs only when the stage is not complete for these
    inputs, this config and `version` (`stage_digest`)."""
    stage = store.stage(round_no, name)
    config_digest = stage_digest(config, version)
    if stage.is_complete(inputs, config_digest):
        return stage, True
    done = stage.begin(inputs, config_digest)
    stage.finish(schema_kind, inputs, config_digest, extra=make(stage, done))
    return stage, False


def _clear_leftovers(stage: StageStore) -> None:
    """A checkpoint stage has no shards to resume from: whatever an interrupted run left in its folder (a half
    made checkpoint, PPO's copy of the starting policy and its `live` export, temp folders, a stale manifest)
    goes before training starts again. PPO's `shutil.copytree(start, out)` fails on an existing `out`, so
    without this a run killed during PPO could never be resumed.

    The training state a killed run saved (TRAIN_STATE_DIR) stays: `stage.begin` has already emptied the folder
    if the inputs or the config changed, so what is left was saved by this same stage, and training resumes
    from it (the state also carries the run's own digest, checked before it is loaded)."""
    for entry in stage.path.iterdir():
        if entry.name in (PROGRESS, TRAIN_STATE_DIR):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
