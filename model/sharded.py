"""A model too large for one device, loaded and saved shard by shard (docs/design.md, "Sharded loading, saving and
resume").

`load_for_training` builds the model on the meta device, shards it with FSDP2 (model.training.wrap) and lets each
rank read only the rows of each tensor its shards hold, straight from the safetensors files, with the checks of
model.checkpoint.load_checkpoint; no rank ever holds the whole model.

`save_train_state` / `load_train_state` keep what a killed training run needs to go on where it stopped (model,
optimizer, schedule and the loop's progress) with torch.distributed.checkpoint: each rank writes and reads its own
shards, and a state saved on N ranks loads on M.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.checkpoint import CheckpointError, Head, LoadPlan, iter_slices, load_checkpoint, plan_load
from model.config import ConfigError
from model.distributed import rank_and_world
from model.llama import PretrainedLlama
from model.training import Trainer, TrainSetup, offloads, rank_device, wrap

# Errors whose text every rank raises as they are (they name the tensor or field and the file).
_SHARED_ERRORS = {cls.__name__: cls for cls in (CheckpointError, ConfigError)}
_STATE_PREFIX = "step-"
_PROGRESS_FILE = "progress.json"


def shards_model(setup: TrainSetup) -> bool:
    """Whether the setup shards the model over its ranks (FSDP on more than one rank)."""
    return setup.strategy == "fsdp" and setup.world > 1


def load_for_training(directory: str | Path, setup: TrainSetup, head: Head = "causal_lm", seed: int = 0,
                      trainable: bool = True, offload: bool | None = None) -> PretrainedLlama:
    """The model in a HF folder, ready for model.training's Trainer (or `wrap`), its weights in fp32 (the master
    copy, whatever the checkpoint's dtype; an export writes the checkpoint's dtype back).

    Sharded setups (FSDP on several ranks): the model comes back already sharded, each rank having read only its
    own rows of each tensor; every rank of the group must call this (it ends in a collective), and any failure
    (a missing, unexpected, mis-shaped or non-finite tensor, named with its file) is raised with the same text on
    every rank. Otherwise (one rank, DDP) it is `load_checkpoint` in fp32 and the Trainer wraps it.
    head="reward" on a causal-LM checkpoint gets a fresh score head from `seed`, as `load_checkpoint` gives it.
    """
    if not shards_model(setup):
        return load_checkpoint(directory, head, seed=seed).float()
    model, failure = None, None
    try:
        plan, model = plan_load(directory, head)
        sources = _checked_sources(plan)
        wrap(model, setup, trainable, offload)
        model.to_empty(device=_shard_device(setup, trainable, offload))
        failure = _fill_shards(model, plan, sources, seed)
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below, whatever went wrong
        failure = (-1, err)
    _raise_first_failure(failure, f"loading {directory}")
    return model.eval()


def _shard_device(setup: TrainSetup, trainable: bool, offload: bool | None) -> torch.device:
    """Where wrap's FSDP keeps this rank's shards: the host when they are offloaded, else the rank's device."""
    return torch.device("cpu") if offloads(setup, trainable, offload) else setup.device or rank_device()


def _checked_sources(plan: LoadPlan) -> dict[str, Path]:
    """The file of each tensor the model loads, after checking every name and shape from the files' headers
    (no tensor read yet) and that none is missing."""
    sources = {}
    for name, tensor, path in iter_slices(plan.directory):
        if plan.skips(name):
            continue
        plan.check_shape(name, tuple(tensor.get_shape()), path)
        sources[name] = path
    plan.check_complete([*sources, *(["score.weight"] if plan.new_reward_head else [])])
    return sources


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of a tensor's dim 0 that FSDP2's Shard(0) gives `rank`: torch.chunk's split (chunks of
    ceil(rows / world)), so the last ranks hold fewer rows, or none."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _fill_shards(model: PretrainedLlama, plan: LoadPlan, sources: dict[str, Path],
                 seed: int) -> tuple[int, Exception] | None:
    """Copy this rank's rows of every tensor into its shards; the first non-finite tensor as (its position in the
    checkpoint, the error), or None."""
    params = dict(model.named_parameters())
    position = 0
    with torch.no_grad():
        for name, tensor, path in iter_slices(plan.directory):
            if name not in sources:
                continue
            start, stop = _local_rows(params[name], name)
            rows = tensor[start:stop]
            try:
                plan.check_values(name, rows, path)
            except CheckpointError as err:
                return position, err
            _local(params[name]).copy_(rows.to(plan.dtype))  # the config's rounding, then fp32 as load + float()
            position += 1
        if plan.new_reward_head:
            start, stop = _local_rows(params["score.weight"], "score.weight")
            _local(params["score.weight"]).copy_(plan.fresh_reward_head(seed)[start:stop])
    return None


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _local_rows(param: torch.Tensor, name: str) -> tuple[int, int]:
    """This rank's rows of a parameter sharded on dim 0, checked against the shard FSDP gave it."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"'{name}': placements {param.placements}; sharded loading reads FSDP2's Shard(0) only")
    mesh = param.device_mesh
    start, stop = row_range(param.shape[0], mesh.get_local_rank(), mesh.size())
    if stop - start != param.to_local().shape[0]:
        raise RuntimeError(f"'{name}': FSDP holds {param.to_local().shape[0]} rows on this rank, torch.chunk's split "
                           f"of {param.shape[0]} rows gives {stop - start}")
    return start, stop


def _raise_first_failure(failure: tuple[int, BaseException] | None, what: str) -> None:
    """Every rank raises the first failure (in checkpoint order) any rank met, with the same text, instead of the
    ranks that succeeded going on to wait in a collective the others never join."""
    seen: list[Any] = [None] * rank_and_world()[1]
    mine = None if failure is None else (failure[0], type(failure[1]).__name__, str(failure[1]))
    dist.all_gather_object(seen, mine)
    found = sorted((report, rank) for rank, report in enumerate(seen) if report is not None)
    if not found:
        return
    (_, kind, message), rank = found[0]
    if mine is not None and mine[1:] == (kind, message):
        raise failure[1]
    if kind in _SHARED_ERRORS:
        raise _SHARED_ERRORS[kind](message)
    raise RuntimeError(f"rank {rank} failed {what}: {kind}: {message}")


# --- resumable training state ---------------------------------------------------------------------------------

def save_train_state(trainer: Trainer, directory: str | Path, step: int, progress: dict[str, Any]) -> Path:
    """Save the model, optimizer and schedule after `step` optimizer steps, with `progress` (plain JSON data: what
    the loop needs to go on), as `directory/step-<step>`; earlier saves are removed once it is complete. Every
    rank calls this; each writes its own shards into one temp folder that rank 0 renames after all have written,
    so a run killed while saving leaves the previous save intact."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    rank, world = rank_and_world()
    final = directory / f"{_STATE_PREFIX}{step:08d}"
    tmp = directory / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half way
        tmp.mkdir(parents=True)
    _barrier(world)
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    with _one_process_quietly():
        save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    _barrier(world)
    if rank == 0:
        record = {**progress, "step": step, "schedule": trainer.schedule.state_dict()}
        (tmp / _PROGRESS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, final)
        for older in _saved_steps(directory)[:-1]:
            shutil.rmtree(older, ignore_errors=True)
    _barrier(world)
    return final


def load_train_state(trainer: Trainer, directory: str | Path, run: str) -> dict[str, Any] | None:
    """Load the latest save in `directory` into the trainer (model, optimizer, schedule, step count) and return
    its progress, when it was saved by the same run (`run`: the caller's digest of its config and data); None
    when there is none. A save of another run is stale: the folder is removed. Every rank calls this and they load
    the save rank 0 chose."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    rank, world = rank_and_world()
    choice = [_latest_progress(directory) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    latest, progress = choice[0] or (None, None)
    if progress is not None and progress.get("run") != run:
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        _barrier(world)
        return None
    if progress is None:
        return None
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _one_process_quietly():
        load(state, checkpoint_id=latest)
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    trainer.schedule.load_state_dict(progress["schedule"])
    trainer.steps = progress["step"]
    return progress


def resumed_progress(trainer: Trainer, directory: str | Path | None, run: str, batches: Iterator[Any],
                     fresh: dict[str, Any]) -> dict[str, Any]:
    """A training loop's progress: the latest save of this run in `directory` loaded into `trainer` (its progress,
    with "step"), or `fresh` at step 0 when there is none (or no directory); `batches` is advanced past the steps
    already trained, so the resumed run sees the batches it would have seen."""
    progress = load_train_state(trainer, directory, run) if directory is not None else None
    progress = progress or {**fresh, "step": 0}
    for _ in range(progress["step"]):
        next(batches)
    return progress


def saves_after(done: int, steps: int, save_every: int, state_dir: str | Path | None) -> bool:
    """Whether a run saves its state after `done` of its `steps` steps: every `save_every`, never after the last (the
    caller writes the result)."""
    return state_dir is not None and save_every > 0 and done % save_every == 0 and done < steps


def state_digest(what: dict[str, Any], data: Sequence[torch.Tensor], setup: TrainSetup) -> str:
    """What a saved state must have been trained with to be resumed: the loop's own settings (`what`), the ranks,
    the switches that change the arithmetic and every rank's data (a collective on several ranks)."""
    mine = hashlib.sha256()
    for tensor in data:
        mine.update(tensor.contiguous().cpu().numpy().tobytes())
    every_rank = [mine.hexdigest()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, mine.hexdigest())
    train = {key: value for key, value in dataclasses.asdict(setup.train).items() if key != "save_every"}
    key = {**what, "world": setup.world, "strategy": setup.strategy, "train": train, "data": every_rank}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _saved_steps(directory: Path) -> list[Path]:
    """The complete saves in `directory`, oldest first (a temp folder is not one)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(_STATE_PREFIX) and (p / _PROGRESS_FILE).is_file())


def _latest_progress(directory: Path) -> tuple[str, dict[str, Any]] | None:
    saves = _saved_steps(directory)
    if not saves:
        return None
    return str(saves[-1]), json.loads((saves[-1] / _PROGRESS_FILE).read_text())


def remove_train_state(directory: str | Path) -> None:
    """Rank 0 removes the saves of a run that finished (its checkpoint written); the other ranks do nothing."""
    if rank_and_world()[0] == 0:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP saves and loads without a process group too, warning each time that it assumes so: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
