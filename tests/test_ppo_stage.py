"""PPO's trainer side on a tiny model, in one process: answer alignment, and an update that follows the reward."""

from __future__ import annotations

import random

import pytest
import torch

from actors.trainer import RankContext
from conftest import tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.tokenizer import SentencePieceTokenizer
from pipeline.stages.ppo import (PPOConfig, answer_logits, answer_positions, export_policy, ppo_iteration, ppo_setup,
                                 token_logprobs)

WORDS = "the cat sat on a mat and the dog ran to the park with a red ball".split()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)],
                                             vocab_size=300)
    policy = tiny_model(seed=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    policy_dir = save_checkpoint(policy, root / "policy", tokenizer=tokenizer)
    return policy_dir, save_checkpoint(load_checkpoint(policy_dir, head="reward", seed=1), root / "rm")


def test_answer_positions_read_each_answer_token_from_the_position_before_it(folders):
    model = load_checkpoint(folders[0])
    prompts, answers = [[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]]
    positions, mask = answer_positions([3, 2], [2, 3])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]] and positions.tolist() == [[2, 3, 2], [1, 2, 3]]
    ids = torch.tensor([[1, 5, 6, 8, 9, 0], [1, 7, 10, 11, 12, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    logprobs = token_logprobs(answer_logits(model, ids, attention, positions), torch.tensor([[8, 9, 0], [10, 11, 12]]))
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):  # each row alone, unpadded
        full = torch.log_softmax(model(torch.tensor([prompt + answer]))[0], -1)
        expected = [full[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer)]
        assert logprobs[row, :len(answer)].tolist() == pytest.approx(expected, abs=1e-5)


def test_an_update_raises_the_likelihood_of_the_rewarded_answer(folders, tmp_path):
    policy_dir, rm_dir = folders
    ctx = RankContext(0, 1, torch.device("cpu"), "gloo")
    config = PPOConfig(batch_size=8, mini_batch=4, lr=1e-3, value_lr=1e-3, beta=0.0)
    ppo_setup(ctx, (str(policy_dir), str(rm_dir), config))
    good, bad = [20, 21, 22, 2], [30, 31, 32, 2]
    batch = {"prompt_token_ids": [[1, 5, 6]] * 8, "token_ids": [good, bad] * 4,
             "logprobs": [[-1.0] * 4] * 8, "r_help": [0.9, 0.1] * 4, "r_safe": [0.5] * 8,
             "r_combined": [0.9, 0.1] * 4}

    def answer_logprob(folder, answer):
        model = load_checkpoint(folder)
        logits = torch.log_softmax(model(torch.tensor([[1, 5, 6, *answer]]))[0], -1)
        return sum(logits[2 + j, t].item() for j, t in enumerate(answer))

    before = answer_logprob(policy_dir, good) - answer_logprob(policy_dir, bad)
    metrics = ppo_iteration(ctx, batch)
    export_policy(ctx, str(tmp_path / "live"))
    after = answer_logprob(tmp_path / "live", good) - answer_logprob(tmp_path / "live", bad)
    assert after > before  # the better-rewarded answer gained on the worse one
    assert metrics["r_combined"] == pytest.approx(0.5) and metrics["answer_length"] == 4
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update is measured against the start
    assert 0 <= metrics["clip_fraction"] <= 1 and metrics["logprob_mismatch"] > 0
    assert not load_checkpoint(tmp_path / "live").config.tie_word_embeddings  # vLLM reloads untied weights
