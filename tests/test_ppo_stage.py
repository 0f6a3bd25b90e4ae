"""PPO's trainer side on a tiny model, in one process: answer alignment, an update that follows the reward, the KL
penalty pulling the policy back to the reference, GAE on the stage's own batch against a hand computation, the
clip fraction, the critic-free estimators, the sampling temperature, old log-probabilities from the sampler (and their
replacement beyond the tolerance), mini-batches by length, and the config's checks."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from actors.trainer import RankContext
from conftest import tiny_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.ppo import logit
from model.tokenizer import SentencePieceTokenizer
from model.training import TrainConfig
from pipeline.config.build import ConfigError, build
from pipeline.stages.ppo.algorithm import (PPOConfig, answer_logits, answer_positions, export_policy, mini_batches,
                                           ppo_iteration, ppo_setup, prepare_batch, rollout, token_logprobs)
from pipeline.stages.ppo.stage import split_rows

WORDS = "the cat sat on a mat and the dog ran to the park with a red ball".split()
ONE = RankContext(0, 1, torch.device("cpu"), "gloo")


def make_folders(root: Path) -> tuple[Path, Path]:
    """A tiny policy with its tokenizer, and a reward model from it (the critic's start)."""
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)],
                                             vocab_size=300)
    policy = tiny_model(seed=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    policy_dir = save_checkpoint(policy, root / "policy", tokenizer=tokenizer)
    return policy_dir, save_checkpoint(load_checkpoint(policy_dir, head="reward", seed=1), root / "rm")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("ppo"))


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
    assert metrics["sampler_logprobs"] == 0.0  # the batch's made-up -1.0s are far off: the trainer's replaced them
    assert not load_checkpoint(tmp_path / "live").config.tie_word_embeddings  # vLLM reloads untied weights


# --- helpers ------------------------------------------------------------------------------------------------------

PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11]]
ANSWERS = [[20, 21, 22, 2], [30, 31, 2], [40, 41, 42, 43, 2], [50, 2], [23, 24, 2], [33, 34, 35, 2],
           [44, 2], [51, 52, 53, 2]]


def batch_of(answers: list[list[int]], rewards: list[float], prompts: list[list[int]] | None = None,
             groups: list[int] | None = None) -> dict[str, list]:
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(answers))]
    batch = {"prompt_token_ids": prompts, "token_ids": answers, "logprobs": [[-1.0] * len(a) for a in answers],
             "r_help": rewards, "r_safe": [0.5] * len(answers), "r_combined": rewards}
    return batch if groups is None else {**batch, "group": groups}


def perturb_policy(seed: int = 0, scale: float = 0.05) -> None:
    """Move this rank's policy away from the reference (which stays at the checkpoint), so the KL is not 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in ONE.state["policy"].parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def row_logprobs(model: torch.nn.Module, prompt: list[int], answer: list[int], temperature: float = 1.0) -> list[float]:
    """Log-probabilities of the answer's tokens, the row alone and unpadded."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0] / temperature
    full = torch.log_softmax(logits, -1)
    return [full[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer)]


def log_ratio_to(reference: torch.nn.Module, batch: dict[str, list]) -> float:
    """Mean over the batch's answer tokens of (log pi - log pi_ref)^2: how far the policy is from the reference."""
    squares = [(p - q) ** 2 for prompt, answer in zip(batch["prompt_token_ids"], batch["token_ids"])
               for p, q in zip(row_logprobs(ONE.state["policy"], prompt, answer),
                               row_logprobs(reference, prompt, answer))]
    return sum(squares) / len(squares)


# --- config -------------------------------------------------------------------------------------------------------

def test_config_checks_the_estimator_and_its_samples_per_prompt():
    assert PPOConfig().advantage == "gae" and PPOConfig().samples_per_prompt == 1
    assert PPOConfig(advantage="rloo", samples_per_prompt=4).needs_critic is False
    for estimator in ("rloo", "grpo"):
        with pytest.raises(ConfigError, match=rf"rounds\.ppo: ppo\.samples_per_prompt = 1: must be >= 2 with "
                                              rf"ppo\.advantage = '{estimator}'"):
            build(PPOConfig, {"advantage": estimator}, "rounds.ppo")
    with pytest.raises(ConfigError, match=r"ppo\.advantage = 'a2c': allowed: gae, rloo, grpo"):
        build(PPOConfig, {"advantage": "a2c"}, "rounds.ppo")
    with pytest.raises(ValueError, match=r"ppo\.samples_per_prompt = 0: must be > 0"):
        PPOConfig(samples_per_prompt=0)
    # mini-batches count answers: 4 prompts x 2 answers fill one of 8, not one of 9
    assert PPOConfig(batch_size=4, samples_per_prompt=2, mini_batch=8).mini_batch == 8
    with pytest.raises(ValueError, match=r"ppo\.mini_batch = 9: larger than the 8 answers of an iteration"):
        PPOConfig(batch_size=4, samples_per_prompt=2, mini_batch=9)


def test_split_rows_keeps_a_prompts_answers_on_one_rank():
    rows = 8  # 4 prompts x 2 answers, in the generators' order
    table = pa.table({"prompt_token_ids": [[1, p] for p in range(rows)], "token_ids": [[r] for r in range(rows)],
                      "logprobs": [[-1.0]] * rows, "r_help": [0.5] * rows, "r_safe": [0.5] * rows,
                      "r_combined": [0.5] * rows, "sample_index": [r % 2 for r in range(rows)]})
    shares = split_rows(table, 3, samples_per_prompt=2)
    # prompts dealt round-robin: rank 0 gets prompts 0 and 3, rank 1 prompt 1, rank 2 prompt 2
    assert [s["token_ids"] for s in shares] == [[[0], [1], [6], [7]], [[2], [3]], [[4], [5]]]
    assert [s["group"] for s in shares] == [[0, 0, 3, 3], [1, 1], [2, 2]]
    # one answer per prompt: the old row round-robin
    single = split_rows(table.drop_columns(["sample_index"]), 3)
    assert [s["token_ids"] for s in single] == [[[0], [3], [6]], [[1], [4], [7]], [[2], [5]]]
    with pytest.raises(ValueError, match="not 4 answers per prompt in prompt order"):
        split_rows(table, 2, samples_per_prompt=4)


# --- behaviour on the stage's own batch ---------------------------------------------------------------------------

def test_gae_on_the_stages_batch_matches_a_hand_computation(folders):
    policy_dir, rm_dir = folders
    # mini-batches of 2: the passes without gradients run in two chunks, each padded to its own longest row
    config = PPOConfig(batch_size=4, mini_batch=2, beta=0.3, gamma=0.9, lam=0.8, old_logprobs="trainer")
    ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))
    perturb_policy()  # a KL that is not 0, so the per-token penalty is checked too
    rewards = [0.9, 0.2, 0.6, 0.35]
    batch = batch_of(ANSWERS[:4], rewards)
    _, rollout, targets = prepare_batch(ONE, batch)

    reference, critic = load_checkpoint(policy_dir), load_checkpoint(rm_dir, head="reward")
    scores = [logit(torch.tensor(r)).item() for r in rewards]
    mean = sum(scores) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / 4)  # population, as the running moments
    hand_advantages, hand_returns = [], []
    for prompt, answer, score in zip(batch["prompt_token_ids"], batch["token_ids"], scores):
        kl = [p - q for p, q in zip(row_logprobs(ONE.state["policy"], prompt, answer), row_logprobs(reference, prompt,
                                                                                                   answer))]
        with torch.no_grad():
            values = critic.token_values(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1].tolist()
        # r_t = -beta * kl_t, plus the whitened score at the last token; then from the end:
        # delta_t = r_t + gamma V_{t+1} - V_t (V after the answer 0), A_t = delta_t + gamma lam A_{t+1}
        reward = [-0.3 * k for k in kl]
        reward[-1] += (score - mean) / std
        advantage, next_value, next_advantage = [0.0] * len(answer), 0.0, 0.0
        for t in reversed(range(len(answer))):
            next_advantage = reward[t] + 0.9 * next_value - values[t] + 0.9 * 0.8 * next_advantage
            advantage[t], next_value = next_advantage, values[t]
        hand_advantages.append(advantage)
        hand_returns.append([a + v for a, v in zip(advantage, values)])

    width = rollout.mask.shape[1]
    for row, (advantage, ret) in enumerate(zip(hand_advantages, hand_returns)):
        assert targets.returns[row, :len(ret)].tolist() == pytest.approx(ret, abs=1e-4)
        assert targets.returns[row, len(ret):].tolist() == [0.0] * (width - len(ret))
    # the advantages PPO trains on are GAE's, whitened over every answer token of the batch
    flat = [a for row in hand_advantages for a in row]
    centre = sum(flat) / len(flat)
    spread = math.sqrt(sum((a - centre) ** 2 for a in flat) / len(flat))
    for row, advantage in enumerate(hand_advantages):
        assert targets.advantages[row, :len(advantage)].tolist() == pytest.approx(
            [(a - centre) / spread for a in advantage], abs=1e-4)


def test_the_kl_penalty_pulls_the_policy_back_to_the_reference(folders):
    policy_dir, rm_dir = folders
    reference = load_checkpoint(policy_dir)
    batch = batch_of(ANSWERS, [0.5] * len(ANSWERS))  # one score for all: only the KL term tells answers apart

    def distance_after(beta: float) -> tuple[float, float]:
        # lr 1e-4: at 1e-3 Adam's first steps overshoot the reference (measured: 0.14 -> 0.31 after one iteration)
        config = PPOConfig(batch_size=8, mini_batch=4, lr=1e-4, value_lr=1e-3, beta=beta, kl_estimator="k1")
        ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))
        perturb_policy(seed=3)
        before = log_ratio_to(reference, batch)
        for _ in range(3):
            metrics = ppo_iteration(ONE, batch)
        assert metrics["kl"] != 0.0
        return before, log_ratio_to(reference, batch)

    start, penalised = distance_after(beta=1.0)
    same_start, free = distance_after(beta=0.0)
    assert start == pytest.approx(same_start)  # both runs start from the same perturbed policy
    # measured: 0.142 -> 0.067 with beta = 1, 0.134 without
    assert penalised < 0.7 * start  # the penalty pulled the policy back towards the reference
    assert penalised < 0.7 * free  # and it was the penalty: without it the policy stays about as far


def test_the_clip_fraction_counts_tokens_whose_ratio_was_pushed_out(folders):
    policy_dir, rm_dir = folders
    batch = batch_of(ANSWERS[:4], [0.9, 0.1] * 2)

    def clip_fraction(lr: float) -> float:
        # 4 answers, 1 per step: from the second step on, the policy the ratio is taken against has already moved
        # (every token's probability shifts with the shared weights); a large learning rate moves it past 1 +- clip
        config = PPOConfig(batch_size=4, mini_batch=1, lr=lr, value_lr=1e-3, beta=0.0, clip=0.05)
        ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))
        return ppo_iteration(ONE, batch)["clip_fraction"]

    assert clip_fraction(1e-2) > 0.1  # measured: 0.29
    assert clip_fraction(1e-6) == 0.0  # a step that barely moves the policy (the paper's lr) clips nothing


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_train_the_policy_without_a_value_model(folders, tmp_path, estimator):
    policy_dir, _ = folders
    config = PPOConfig(batch_size=2, samples_per_prompt=2, mini_batch=4, lr=1e-3, beta=0.0, advantage=estimator)
    assert ppo_setup(ONE, (str(policy_dir), None, config)) > 0  # no critic folder: nothing is loaded
    assert "value" not in ONE.state and "value_trainer" not in ONE.state
    good, bad = [20, 21, 22, 2], [30, 31, 32, 2]
    # two prompts, each answered well and badly: the baseline is the other answer to the same prompt
    batch = batch_of([good, bad, bad, good], [0.9, 0.1, 0.2, 0.8], prompts=[[1, 5, 6]] * 2 + [[1, 7]] * 2,
                     groups=[0, 0, 1, 1])

    def margin(model: torch.nn.Module, prompt: list[int]) -> float:
        return sum(row_logprobs(model, prompt, good)) - sum(row_logprobs(model, prompt, bad))

    before = [margin(load_checkpoint(policy_dir), p) for p in ([1, 5, 6], [1, 7])]
    metrics = ppo_iteration(ONE, batch)
    export_policy(ONE, str(tmp_path / "live"))
    after = [margin(load_checkpoint(tmp_path / "live"), p) for p in ([1, 5, 6], [1, 7])]
    assert after[0] > before[0] and after[1] > before[1]
    assert metrics["value_loss"] == 0.0 and metrics["steps"] == 1
    with pytest.raises(ValueError, match="needs each answer's prompt"):
        ppo_iteration(ONE, {k: v for k, v in batch.items() if k != "group"})


def test_trainer_logprobs_use_the_sampling_temperature(folders):
    policy_dir, rm_dir = folders
    config = PPOConfig(batch_size=2, mini_batch=2, temperature=0.5, old_logprobs="trainer")
    ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))
    policy = load_checkpoint(policy_dir)
    raw = [row_logprobs(policy, PROMPTS[i], ANSWERS[i]) for i in range(2)]
    batch = {**batch_of(ANSWERS[:2], [0.7, 0.3]), "logprobs": raw}  # vLLM reports untempered log-probabilities
    _, _, targets = prepare_batch(ONE, batch)
    for row in range(2):
        tempered = row_logprobs(policy, PROMPTS[row], ANSWERS[row], temperature=0.5)
        assert targets.old_logprobs[row, :len(tempered)].tolist() == pytest.approx(tempered, abs=1e-5)
        assert tempered != pytest.approx(raw[row], abs=1e-3)  # the temperature made a difference
    assert ppo_iteration(ONE, batch)["logprob_mismatch"] == pytest.approx(0.0, abs=1e-5)


def test_a_batch_of_empty_answers_takes_no_step_and_reports_zeros(folders):
    policy_dir, rm_dir = folders
    ppo_setup(ONE, (str(policy_dir), str(rm_dir), PPOConfig(batch_size=2, mini_batch=2)))
    metrics = ppo_iteration(ONE, batch_of([[], []], [0.4, 0.6]))
    assert (metrics["steps"], metrics["empty_answers"], metrics["answer_length"]) == (0, 2, 0.0)
    assert metrics["r_combined"] == pytest.approx(0.5)


# --- old log-probabilities from the sampler, mini-batches by length -----------------------------------------------

def test_config_checks_the_old_logprobs_switch():
    assert PPOConfig().old_logprobs == "sampler" and PPOConfig().group_by_length
    with pytest.raises(ConfigError, match=r"ppo\.old_logprobs = 'vllm': allowed: sampler, trainer"):
        build(PPOConfig, {"old_logprobs": "vllm"}, "rounds.ppo")
    with pytest.raises(ValueError, match=r"ppo\.old_logprobs = 'sampler' needs ppo\.temperature = 1, not 0\.7"):
        PPOConfig(temperature=0.7)
    assert PPOConfig(temperature=0.7, old_logprobs="trainer").temperature == 0.7
    with pytest.raises(ValueError, match=r"ppo\.logprob_tolerance = 0: must be > 0"):
        PPOConfig(logprob_tolerance=0)


@pytest.mark.parametrize("offset", [0.004, 0.05])
def test_sampler_logprobs_are_used_within_the_tolerance_and_replaced_beyond_it(folders, offset):
    policy_dir, rm_dir = folders
    policy = load_checkpoint(policy_dir)
    sampler = [[x + offset for x in row_logprobs(policy, PROMPTS[i % 4], a)] for i, a in enumerate(ANSWERS)]
    batch = {**batch_of(ANSWERS, [0.9, 0.1] * 4), "logprobs": sampler}

    def setup(old_logprobs: str) -> None:
        config = PPOConfig(batch_size=8, mini_batch=4, lr=1e-3, value_lr=1e-3, old_logprobs=old_logprobs)
        ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))

    setup("sampler")
    _, rollout_, targets = prepare_batch(ONE, batch)
    for row, numbers in enumerate(sampler):  # the ratio's denominator and the KL are the sampler's numbers
        assert targets.old_logprobs[row, :len(numbers)].tolist() == pytest.approx(numbers, abs=1e-6)
        assert targets.kl[row, :len(numbers)].tolist() == pytest.approx([offset] * len(numbers), abs=1e-4)

    setup("sampler")
    metrics = ppo_iteration(ONE, batch)
    kept = offset < PPOConfig().logprob_tolerance
    assert metrics["sampler_logprobs"] == float(kept)
    assert metrics["logprob_mismatch"] == pytest.approx(offset, abs=1e-4)  # measured either way
    if not kept:  # replaced before the first step: the update is the trainer's
        sampled = torch.cat([p.detach().flatten() for p in ONE.state["policy"].parameters()])
        setup("trainer")
        trained = ppo_iteration(ONE, batch)
        assert trained["sampler_logprobs"] == 0.0
        assert torch.allclose(sampled, torch.cat([p.detach().flatten() for p in ONE.state["policy"].parameters()]),
                              atol=1e-6)


def test_mini_batches_by_length_hold_rows_of_similar_length():
    lengths = [5, 1, 9, 2, 8, 3, 7]

    def rows(batches: list[torch.Tensor]) -> list[int]:
        return sorted(i for b in batches for i in b.tolist())

    grouped = mini_batches(lengths, 2, True, seed=0)
    assert sorted(sorted(lengths[i] for i in b.tolist()) for b in grouped) == [[1, 2], [3, 5], [7, 8], [9]]
    assert rows(grouped) == list(range(7))
    orders = {tuple(tuple(b.tolist()) for b in mini_batches(lengths, 2, True, seed)) for seed in range(8)}
    assert len(orders) > 1  # the groups come in a random order
    mixed = mini_batches(lengths, 2, False, seed=0)
    assert rows(mixed) == list(range(7)) and [len(b) for b in mixed] == [2, 2, 2, 1]


def test_a_mini_batch_padded_to_its_own_longest_row_gives_the_unpadded_rows_numbers_and_gradients(folders):
    model = load_checkpoint(folders[0])
    prompts, picked = PROMPTS * 2, (3, 1)
    r = rollout(prompts, ANSWERS, torch.device("cpu"))
    part = r.take(torch.tensor(picked))
    assert part.input_ids.shape[1] == 5 < r.input_ids.shape[1]  # its rows' longest, not the batch's
    logprobs = token_logprobs(part.logits(model), part.targets)
    (logprobs * part.mask).sum().backward()
    gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone_sum = torch.zeros(())
    for row, i in enumerate(picked):  # each row alone, unpadded
        full = torch.log_softmax(model(torch.tensor([prompts[i] + ANSWERS[i]]))[0], -1)
        alone = torch.stack([full[len(prompts[i]) - 1 + j, token] for j, token in enumerate(ANSWERS[i])])
        assert logprobs[row, :len(alone)].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
        assert part.mask[row].sum() == len(alone)
        alone_sum = alone_sum + alone.sum()
    alone_sum.backward()
    for ours, expected in zip(gradients, (p.grad for p in model.parameters())):
        assert torch.allclose(ours, expected, atol=1e-5)


def test_micro_batches_accumulate_to_the_mini_batchs_update(folders):
    """ppo.train.micro_batch=1: each gradient step's 4 answers in 4 forwards, the gradients accumulated, each
    weighted by its share of the step's tokens: the policy and the critic end where one forward per step takes them,
    with the same losses."""
    policy_dir, rm_dir = folders
    batch = batch_of(ANSWERS, [0.9, 0.1] * 4)

    def update(micro_batch: int) -> tuple[dict, torch.Tensor]:
        config = PPOConfig(batch_size=8, mini_batch=4, lr=1e-3, value_lr=1e-3, old_logprobs="trainer",
                           train=TrainConfig(micro_batch=micro_batch))
        ppo_setup(ONE, (str(policy_dir), str(rm_dir), config))
        metrics = ppo_iteration(ONE, batch)
        weights = torch.cat([p.detach().flatten() for name in ("policy", "value")
                             for p in ONE.state[name].parameters()])
        return metrics, weights

    whole, whole_weights = update(0)
    micro, micro_weights = update(1)
    assert (micro_weights - whole_weights).abs().max().item() < 1e-5
    for stat in ("policy_loss", "value_loss", "approx_kl", "entropy"):
        assert micro[stat] == pytest.approx(whole[stat], abs=1e-5), stat
