"""The pretraining stage trains the tokenizer and each size, and held-out perplexity beats chance."""

from __future__ import annotations

import random

from model.checkpoint import load_checkpoint
from model.tokenizer import load_tokenizer
from pipeline.stages.pretrain import ModelSize, PretrainConfig, is_heldout, pretrain


def toy_corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    names, towns = ["Alva", "Borin", "Cyra", "Dax"], ["Pellmar", "Quist", "Rontu"]
    return [f"{rng.choice(names)} lives in {rng.choice(towns)} and is {rng.randint(20, 60)} years old. "
            f"{rng.choice(names)} likes {rng.choice(['tea', 'maps', 'boats'])}." for _ in range(n)]


def test_pretrain_two_sizes_beats_chance(tmp_path):
    sizes = [ModelSize("a", 32, 64, 1, 1, 1, steps=40), ModelSize("b", 64, 128, 2, 2, 1, steps=40)]
    config = PretrainConfig(sizes=sizes, vocab_size=320, seq_len=64, batch_size=8, lr=5e-3, warmup_steps=5)
    results = pretrain(toy_corpus(), tmp_path, config)
    assert [r.size for r in results] == ["a", "b"]
    for r in results:
        assert r.heldout_perplexity < 320 / 4  # far below the uniform distribution's perplexity
        model = load_checkpoint(r.checkpoint)
        assert model.num_parameters == r.parameters
        assert load_tokenizer(r.checkpoint).vocab_size == model.config.vocab_size == 320
    assert results[0].parameters < results[1].parameters


def test_heldout_split_is_by_content_not_position():
    texts = toy_corpus(200)
    flags = {t: is_heldout(t, 0.1) for t in texts}
    assert 0 < sum(flags.values()) < len(texts)
    assert all(is_heldout(t, 0.1) == flags[t] for t in reversed(texts))
