"""PPO math (model/ppo.py) against hand-computed values: rewards, KL, whitening (one process and split over
ranks), the advantage estimators (GAE, RLOO, GRPO) and the losses."""

from __future__ import annotations

import math

import pytest
import torch

from model.ppo import (ADVANTAGE_ESTIMATORS, RunningMoments, advantage_estimator, entropy_from_logits, gae,
                       kl_penalty, logit, masked_mean, policy_loss, register_advantage, shifted_sums, token_rewards,
                       value_loss, whiten)

NAN = float("nan")


def test_logit_inverts_sigmoid_and_clamps_the_ends():
    x = torch.tensor([-5.0, -1.0, 0.0, 0.5, 3.0])
    assert torch.allclose(logit(torch.sigmoid(x)), x, atol=1e-5)
    ends = logit(torch.tensor([0.0, 1.0]), eps=1e-6)
    bound = math.log((1 - 1e-6) / 1e-6)  # ~13.8155
    assert ends.tolist() == pytest.approx([-bound, bound], rel=1e-4)


def test_masked_mean_by_hand_and_on_an_all_zero_mask():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, 8.0, 16.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(1.5)  # the NaN in the padding is never read
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 0.0])  # empty row: 0, not NaN
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_mean(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)


def test_whiten_by_hand_and_padding_comes_back_zero():
    # [1, 2, 3]: mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3) = [-1.2247, 0, 1.2247]
    assert whiten(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([-1.224744, 0.0, 1.224744], abs=1e-5)
    values = torch.tensor([[1.0, 5.0, 9.0, 100.0], [3.0, 7.0, NAN, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = whiten(values, mask)
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert out[~mask.bool()].tolist() == [0.0, 0.0, 0.0]  # documented choice: padding is zeroed (NaN included)
    # entries 1, 3, 5, 7, 9: mean 5, population std sqrt(8); the padding did not move the statistics
    assert out[0, 0].item() == pytest.approx(-4 / math.sqrt(8), rel=1e-5)
    kept = whiten(values, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(5.0, rel=1e-5)
    assert kept.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_running_moments_over_two_batches_equal_the_concatenation():
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([[10.0, -3.0], [0.5, 7.0]])
    moments = RunningMoments()
    assert (moments.mean, moments.var, moments.count) == (0.0, 1.0, 0)
    moments.update(a)
    moments.update(b)
    both = torch.cat([a, b.flatten()]).double()
    assert moments.count == 7
    assert moments.mean == pytest.approx(both.mean().item(), rel=1e-12)
    assert moments.var == pytest.approx(both.var(unbiased=False).item(), rel=1e-12)
    assert moments.std == pytest.approx(both.std(unbiased=False).item(), rel=1e-12)
    # a mask keeps padding out; an empty batch changes nothing
    masked = RunningMoments()
    masked.update(torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[1, 1, 0]]))
    masked.update(torch.tensor([4.0]), torch.tensor([0]))
    assert (masked.count, masked.mean, masked.var) == (2, pytest.approx(1.5), pytest.approx(0.25))


def test_whiten_with_running_moments_uses_their_statistics():
    moments = RunningMoments()
    moments.update(torch.tensor([0.0, 4.0]))  # mean 2, std 2
    assert whiten(torch.tensor([2.0, 6.0]), moments=moments).tolist() == pytest.approx([0.0, 2.0], rel=1e-6)


def other_rank(values: torch.Tensor, mask: torch.Tensor | None = None):
    """A `reduce` for one rank of two: adds the other rank's sums (about the same shift), as an all-reduce would."""
    def reduce(sums: torch.Tensor) -> torch.Tensor:
        return sums + torch.tensor(shifted_sums(values, mask, reduce.shift), dtype=torch.float64)
    reduce.shift = 0.0
    return reduce


def test_running_moments_over_ranks_equal_one_process_on_the_whole_batch():
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([10.0, -3.0, 0.5, 7.0])
    whole, split = RunningMoments(), RunningMoments()
    whole.update(torch.cat([a, b]))
    split.update(a, reduce=other_rank(b))  # first batch: the shift is the starting mean, 0
    assert (split.count, split.mean, split.var) == (7, pytest.approx(whole.mean, rel=1e-12),
                                                     pytest.approx(whole.var, rel=1e-12))
    # second batch: both ranks shift by the running mean they share
    c, d = torch.tensor([[3.0, 99.0]]), torch.tensor([[5.0, 6.0]])
    cmask, dmask = torch.tensor([[1, 0]]), torch.tensor([[1, 1]])
    reduce = other_rank(d, dmask)
    reduce.shift = split.mean
    split.update(c, cmask, reduce=reduce)
    whole.update(torch.tensor([3.0, 5.0, 6.0]))
    assert (split.count, split.mean, split.var) == (10, pytest.approx(whole.mean, rel=1e-12),
                                                     pytest.approx(whole.var, rel=1e-12))


def test_whiten_over_ranks_uses_the_whole_batchs_statistics():
    # rank 0 holds [1, 2], rank 1 holds [3, 6] (padding 50 masked out): whole batch mean 3, population var 3.5
    mine, theirs = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0, 50.0]])
    out = whiten(mine, torch.ones(1, 2), reduce=other_rank(theirs, torch.tensor([[1, 1, 0]])))
    assert out.tolist()[0] == pytest.approx([-2 / math.sqrt(3.5), -1 / math.sqrt(3.5)], rel=1e-5)


def test_a_first_batch_without_spread_does_not_blow_up_the_next():
    moments = RunningMoments()
    first = torch.full((4,), logit(torch.tensor(0.9)).item())  # a saturated RM: every score alike
    moments.update(first)
    assert moments.var == pytest.approx(0.0, abs=1e-12) and math.isfinite(moments.std)
    assert whiten(first, moments=moments).abs().max().item() == 0.0  # centred, not divided by ~0
    # next batch: whitened with the pooled statistics of all 6 values, exactly as one batch of them would be
    second = first[:2] + torch.tensor([-1.0, 1.0])
    moments.update(second)
    both = torch.cat([first, second]).double()
    expected = ((second.double() - both.mean()) / both.std(unbiased=False)).tolist()  # +-1 / sqrt(1/3) = +-1.732
    assert whiten(second, moments=moments).tolist() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx([-math.sqrt(3), math.sqrt(3)], rel=1e-5)
    # values that differ only by rounding have no scale to divide by: not blown up to whole units
    noise = torch.tensor([1.0, 1.0 + 1e-6, 1.0 - 1e-6])
    assert whiten(noise).abs().max().item() < 1e-5


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])  # log p - log q = [1, -1, 0]
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, -1.0, 0.0])  # sign: positive where p > q
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert kl_penalty(logp, ref, "abs").tolist() == pytest.approx([1.0, 1.0, 0.0])
    # k3 = (r - 1) - log r, r = q / p: r = e^-1 -> e^-1 - 1 + 1 = e^-1; r = e -> e - 1 - 1 = e - 2
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1), math.e - 2, 0.0], rel=1e-6)


def test_k3_is_never_negative_and_zero_when_the_policies_agree():
    gen = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(64, generator=gen) * 5, -torch.rand(64, generator=gen) * 5
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, logp + 1e-9, "k3") >= 0).all()
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0


def test_unknown_kl_estimator_names_the_allowed_ones():
    with pytest.raises(ValueError, match="k1.*k2.*k3.*abs"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def test_token_rewards_put_the_score_at_each_rows_last_real_token():
    score = torch.tensor([10.0, 20.0, 30.0, 40.0])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, NAN, 9.0], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    expected = torch.tensor([
        [-0.1, -0.2, -0.3, 10.0 - 0.4],  # full row: score on the last column
        [-0.1, 20.0 - 0.1, 0.0, 0.0],    # 2 tokens: score on token 1; padding (even NaN KL) gives 0
        [30.0 - 0.05, 0.0, 0.0, 0.0],    # 1 token
        [0.0, 0.0, 0.0, 0.0],            # no response token: no reward at all
    ])
    assert torch.allclose(token_rewards(score, kl, mask, beta=0.1), expected, atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # reward-to-go [3, 2, 2] minus values [0.5, 1, 1]
    assert advantages.tolist()[0] == pytest.approx([2.5, 1.0, 1.0])
    assert returns.tolist()[0] == pytest.approx([3.0, 2.0, 2.0])


def test_gae_with_discounting_by_hand():
    # gamma = lam = 0.5, rewards [1, 0, 2], values [0.5, 1, 1], value after the last token 0:
    #   delta_2 = 2 + 0.5 * 0 - 1 = 1           A_2 = 1
    #   delta_1 = 0 + 0.5 * 1 - 1 = -0.5        A_1 = -0.5 + 0.25 * 1 = -0.25
    #   delta_0 = 1 + 0.5 * 1 - 0.5 = 1         A_0 = 1 + 0.25 * -0.25 = 0.9375
    # returns = A + V = [1.4375, 0.75, 2]
    advantages, returns = gae(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.0]]), torch.ones(1, 3),
                              gamma=0.5, lam=0.5)
    assert advantages.tolist()[0] == pytest.approx([0.9375, -0.25, 1.0])
    assert returns.tolist()[0] == pytest.approx([1.4375, 0.75, 2.0])


def test_gae_padding_gives_zero_and_does_not_leak():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    garbage_rewards, garbage_values = rewards.clone(), values.clone()
    garbage_rewards[0, 3], garbage_values[0, 3] = 100.0, NAN
    garbage_rewards[1, 2:], garbage_values[1, 2:] = torch.tensor([NAN, 7.0]), torch.tensor([-9.0, 3.0])
    advantages, returns = gae(garbage_rewards, garbage_values, mask, gamma=0.5, lam=0.5)
    # row 0 is the hand example above; row 1 ends after 2 tokens:
    #   delta_1 = 0 - 1 = -1 = A_1; delta_0 = 1 + 0.5 * 1 - 0.5 = 1, A_0 = 1 + 0.25 * -1 = 0.75
    assert advantages.tolist() == [pytest.approx([0.9375, -0.25, 1.0, 0.0]), pytest.approx([0.75, -1.0, 0.0, 0.0])]
    assert returns.tolist() == [pytest.approx([1.4375, 0.75, 2.0, 0.0]), pytest.approx([1.25, 0.0, 0.0, 0.0])]
    # each row alone, cut to its length, gives the same numbers: no leak across the batch or from the padding
    alone, _ = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma=0.5, lam=0.5)
    assert torch.allclose(alone, advantages[1:, :2])


def test_policy_loss_inside_the_clip_range_is_minus_advantage_times_ratio():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.4]]))
    new = old + torch.log(torch.tensor([[1.1, 0.9, 1.0]]))  # ratios 1.1, 0.9, 1.0: all within 1 +- 0.2
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    loss, clip_fraction, approx_kl = policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx((-2.2 + 0.9 - 3.0) / 3, rel=1e-5)
    assert clip_fraction.item() == 0.0
    by_hand = ((0.1 - math.log(1.1)) + (-0.1 - math.log(0.9)) + 0.0) / 3
    assert approx_kl.item() == pytest.approx(by_hand, rel=1e-4)


def test_policy_loss_outside_the_clip_range_by_hand():
    # clip 0.2; per token: ratio, A -> max(-A r, -A clamp(r)), clipped term active?
    #   1.1, +2 -> max(-2.2, -2.2) = -2.2   inside the range
    #   1.5, +1 -> max(-1.5, -1.2) = -1.2   clipped (counted)
    #   0.5, +1 -> max(-0.5, -0.8) = -0.5   outside the range, but the unclipped term wins (not counted)
    #   0.5, -1 -> max( 0.5,  0.8) =  0.8   clipped (counted)
    #   padding with an absurd ratio and advantage: ignored
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1e30]])
    old = torch.full((1, 5), -1.0)
    new = (old + torch.log(ratios)).requires_grad_()
    adv = torch.tensor([[2.0, 1.0, 1.0, -1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = policy_loss(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-2.2 - 1.2 - 0.5 + 0.8) / 4, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(0.5)
    kl_by_hand = ((0.1 - math.log(1.1)) + (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4
    assert approx_kl.item() == pytest.approx(kl_by_hand, rel=1e-4)
    loss.backward()
    # d/dlogp of -A r is -A r / 4 on the unclipped tokens; clipped tokens and padding get no gradient
    assert new.grad.tolist()[0] == pytest.approx([-2.2 / 4, 0.0, -0.5 / 4, 0.0, 0.0], rel=1e-5)


def test_value_loss_clipped_by_hand():
    # clip 0.2, old value 1 everywhere:
    #   V 1.5, R 2: unclipped 0.25, clipped V 1.2 -> 0.64; max 0.64
    #   V 0.9, R 0: within the clip range, both 0.81
    #   V 1.5, R 1: unclipped 0.25, clipped 1.2 -> 0.04; max 0.25
    #   padding: ignored
    values = torch.tensor([[1.5, 0.9, 1.5, 50.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = value_loss(values, torch.ones(1, 4), returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3, rel=1e-5)
    # a huge clip range is the plain 0.5 * MSE
    plain = value_loss(values, torch.ones(1, 4), returns, mask, clip=1e9)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.25) / 3, rel=1e-5)


def test_entropy_from_logits_by_hand():
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits = torch.stack([torch.zeros(4), probs.log(), torch.tensor([0.0, 0.0, -math.inf, -math.inf]),
                          torch.full((4,), 123.0)]).view(1, 4, 4).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]])
    skewed = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    # uniform over 4: log 4; the skewed one by hand; two of four allowed: log 2; the last position is padding
    entropy = entropy_from_logits(logits, mask)
    assert entropy.item() == pytest.approx((math.log(4) + skewed + math.log(2)) / 3, rel=1e-5)
    entropy.backward()
    assert torch.isfinite(logits.grad).all()


# --- advantage estimators ---------------------------------------------------------------------------------------

def shaped_rewards():
    """Six answers to three prompts (groups 3, 3, 3, 7, 7, 9) through token_rewards with beta 0.1, built so each
    answer's return (score minus 0.1 * its summed KL) is a round number:
        row 0: tokens 2, KL [1, 1],   score 1.2 -> 1.2 - 0.2  = 1     (group 3)
        row 1: tokens 1, KL [0],      score 2   -> 2                 (group 3)
        row 2: tokens 3, KL [2, 0, 0], score 6.2 -> 6.2 - 0.2 = 6     (group 3)
        row 3: tokens 2, KL [.5, .5], score 0.1 -> 0.1 - 0.1  = 0     (group 7)
        row 4: tokens 1, KL [-1],     score 3.9 -> 3.9 + 0.1  = 4     (group 7; k1 can be negative)
        row 5: tokens 1, KL [0],      score 5   -> 5                 (group 9, alone)
    Padding holds NaN KL: it must not reach any advantage."""
    kl = torch.tensor([[1.0, 1.0, NAN], [0.0, NAN, NAN], [2.0, 0.0, 0.0], [0.5, 0.5, NAN], [-1.0, NAN, NAN],
                       [0.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([1.2, 2.0, 6.2, 0.1, 3.9, 5.0]), kl, mask, beta=0.1)
    return rewards, mask, torch.tensor([3, 3, 3, 7, 7, 9])


def per_token(per_answer: list[float], mask: torch.Tensor) -> list[list[float]]:
    return [[a if m else 0.0 for m in row] for a, row in zip(per_answer, mask.tolist())]


def test_rloo_by_hand():
    rewards, mask, groups = shaped_rewards()
    advantages, returns = advantage_estimator("rloo")(rewards, mask, groups=groups)
    # A_i = R_i - mean of the other answers to the same prompt:
    #   group 3 (returns 1, 2, 6): 1 - (2 + 6) / 2 = -3;  2 - (1 + 6) / 2 = -1.5;  6 - (1 + 2) / 2 = 4.5
    #   group 7 (returns 0, 4):    0 - 4 = -4;  4 - 0 = 4
    #   group 9 (one answer): no other answer to compare with -> 0
    expected = per_token([-3.0, -1.5, 4.5, -4.0, 4.0, 0.0], mask)
    assert returns is None
    for got, want in zip(advantages.tolist(), expected):
        assert got == pytest.approx(want, abs=1e-5)


def test_grpo_by_hand():
    rewards, mask, groups = shaped_rewards()
    advantages, returns = advantage_estimator("grpo")(rewards, mask, groups=groups)
    # A_i = (R_i - group mean) / (group sample std + 1e-6):
    #   group 3: mean 3, deviations -2, -1, 3, sample var (4 + 1 + 9) / 2 = 7 -> -2/sqrt7, -1/sqrt7, 3/sqrt7
    #            = -0.75593, -0.37796, 1.13389
    #   group 7: mean 2, deviations -2, 2, sample var (4 + 4) / 1 = 8 -> -2/sqrt8, 2/sqrt8 = -0.70711, 0.70711
    #   group 9: one answer -> 0
    r7, r8 = math.sqrt(7), math.sqrt(8)
    expected = per_token([-2 / r7, -1 / r7, 3 / r7, -2 / r8, 2 / r8, 0.0], mask)
    assert returns is None
    for got, want in zip(advantages.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # a group whose answers all earned the same return has nothing to prefer: 0, not a division by 0
    flat, _ = advantage_estimator("grpo")(torch.tensor([[0.3, 0.0], [0.3, 0.0]]), torch.ones(2, 2),
                                          groups=torch.tensor([1, 1]))
    assert flat.abs().max().item() < 1e-6


def test_gae_through_the_registry_is_gae():
    # the hand example of test_gae_with_discounting_by_hand
    estimator = advantage_estimator("gae")
    advantages, returns = estimator(torch.tensor([[1.0, 0.0, 2.0]]), torch.ones(1, 3),
                                    values=torch.tensor([[0.5, 1.0, 1.0]]), gamma=0.5, lam=0.5)
    assert advantages.tolist()[0] == pytest.approx([0.9375, -0.25, 1.0])
    assert returns.tolist()[0] == pytest.approx([1.4375, 0.75, 2.0])
    assert estimator.needs_critic and estimator.whiten
    assert not advantage_estimator("rloo").needs_critic and not advantage_estimator("grpo").needs_critic
    with pytest.raises(ValueError, match="'gae' needs the critic's values"):
        estimator(torch.zeros(1, 2), torch.ones(1, 2))


def test_the_registry_takes_new_estimators_and_names_the_known_ones():
    assert list(ADVANTAGE_ESTIMATORS)[:3] == ["gae", "rloo", "grpo"]

    @register_advantage("sign")
    def sign(rewards, mask, *, values, groups, gamma, lam):
        return torch.sign(rewards) * mask, None

    try:
        advantages, _ = advantage_estimator("sign")(torch.tensor([[2.0, -3.0]]), torch.tensor([[1, 0]]))
        assert advantages.tolist() == [[1.0, 0.0]]
        with pytest.raises(ValueError, match="'sign' is registered twice"):
            register_advantage("sign")(sign)
    finally:
        del ADVANTAGE_ESTIMATORS["sign"]
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; allowed: \['gae', 'rloo', 'grpo'\]"):
        advantage_estimator("ppo")


def test_policy_loss_clamps_the_log_ratio_on_real_tokens():
    """new = -5, old = -100 on a real token: log ratio 95, exp overflows to inf and the gradient was NaN; clamped to
    +-20 as the peers do, the loss and gradient are finite (and the clipped term's gradient is zero anyway)."""
    new = torch.tensor([[-5.0, -1.0]], requires_grad=True)
    old, advantages, mask = torch.tensor([[-100.0, -1.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    loss, _, approx_kl = policy_loss(new, old, advantages, mask, clip=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad).all() and torch.isfinite(approx_kl)
    # the clamped token sits at 1 + clip (its -A * 1.2 term), the other at ratio 1: mean -(1.2 + 1) / 2
    assert loss.item() == pytest.approx(-1.1)
    assert approx_kl.item() == pytest.approx((math.expm1(20.0) - 20.0) / 2)


def test_k3_is_clamped_at_ten_per_token():
    """logp -12 against ref -0.5: k3 = e^11.5 - 1 - 11.5 = 98,703 unclamped; at most 10 (k1 is left alone)."""
    logp, ref = torch.tensor([-12.0, -1.0]), torch.tensor([-0.5, -1.0])
    assert math.expm1(11.5) - 11.5 == pytest.approx(98_703, abs=1)
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([10.0, 0.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([-11.5, 0.0])


def test_gae_refuses_a_mask_that_is_not_right_padded():
    rewards, values = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"row 1: a real token after padding; the mask must be right-padded"):
        gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), 1.0, 0.95)
