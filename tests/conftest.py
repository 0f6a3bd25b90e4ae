"""Shared fixtures. Tiny sizes everywhere; expensive things (vLLM engine, SmolLM2 folder) once per session."""

from __future__ import annotations

import os

import pytest
import torch

from model.config import ModelConfig
from model.llama import LlamaForCausalLM

# Keep torch from oversubscribing the 2 cores when vLLM or Ray workers run beside the test process.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=128, rms_norm_eps=1e-5)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.init_weights(seed)
    return model.eval()


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory):
    """One vLLM engine per test session, serving an exported tiny model: (engine, our model, folder).

    GQA, tied embeddings and a non-default rope theta, so the export exercises the paths most likely to differ.
    The KV cache and the memory share stay small: several of these must fit beside Ray on a 24 GiB machine.
    """
    from actors.vllm_engine import EngineConfig, VLLMEngine
    from model.checkpoint import save_checkpoint

    model = tiny_model(seed=11, vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0,
                       max_position_embeddings=256)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("vllm") / "tiny")
    engine = VLLMEngine(folder, EngineConfig(max_model_len=256))
    yield engine, model, folder
    # Stop the engine processes now, not at interpreter exit (after pytest's summary line).
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a HF folder, converted once and cached under .cache/ (gitignored)."""
    from model.smollm2 import build

    return build()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (~5 s to start): 4 logical CPUs, no dashboard.

    Test modules are not installed packages, so the workers get tests/ on PYTHONPATH to unpickle the actor
    classes and loop functions the tests define.
    """
    import ray

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=512 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


# The public LLaMA-2 shapes: hidden, intermediate, layers, heads, KV heads.
LLAMA2 = {"7b": (4096, 11008, 32, 32, 32), "13b": (5120, 13824, 40, 40, 40), "70b": (8192, 28672, 80, 64, 8)}


@pytest.fixture(scope="session")
def llama2(tmp_path_factory) -> dict[str, str]:
    """Config-only LLaMA-2 checkpoint folders (the public shapes): they plan like the real checkpoints."""
    folders = {}
    for name, (hidden, intermediate, layers, heads, kv_heads) in LLAMA2.items():
        folder = tmp_path_factory.mktemp(f"llama2-{name}")
        ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                    dtype="bfloat16").save(folder, architecture="LlamaForCausalLM")
        folders[name] = str(folder)
    return folders
