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
