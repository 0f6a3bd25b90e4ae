"""PPO math as LLaMA-2 uses it (Touvron et al. 2023, section 3.2.3): rewards, KL penalty, GAE and the losses.

The paper's reward for a generation g of prompt p is

    R(g|p) = whiten(logit(R_c(g|p))) - beta * KL(pi(g|p) || pi_0(g|p))

with R_c the (sigmoid) reward-model score. Here it is assembled per token: `kl_penalty` gives the KL term per
response token, `token_rewards` spreads -beta * KL over the tokens and adds the whitened logit score at the last
one, then an advantage estimator (`ADVANTAGE_ESTIMATORS`: GAE with a critic, or the critic-free RLOO and GRPO,
which compare several answers to one prompt) turns the token rewards into advantages for `policy_loss`, and GAE's
returns feed `value_loss`. All tensors are (batch, time) over response tokens, right-padded, with a mask that is 1
on real tokens. Statistics that must agree across data-parallel ranks (whitening) take a `reduce` function that
sums a tensor over the ranks (an all-reduce); without it they are this process's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
LOG_RATIO_CLAMP = 20.0  # |log pi_new / pi_old| per real token in the policy loss
K3_CLAMP = 10.0  # the k3 KL estimate per token

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the data-parallel ranks


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is non-zero (weighted by mask); 0, not NaN, where the mask is all zero.

    Masked-out entries are never read, so NaN or inf in the padding cannot leak into the result.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    weighted = torch.where(mask != 0, x * mask, 0.0)
    total = mask.sum() if dim is None else mask.sum(dim)
    summed = weighted.sum() if dim is None else weighted.sum(dim)
    return torch.where(total != 0, summed / torch.where(total != 0, total, torch.ones_like(total)),
                       torch.zeros_like(summed))


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid, clamped to [eps, 1 - eps]: the RM's sigmoid scores saturate, and logit(0 or 1) is inf.

    Computed in float64 (it only sees one score per sequence): in float32, 1 - 1e-6 rounds and the clamp would
    no longer be symmetric.
    """
    p = p.double().clamp(eps, 1 - eps)
    return (torch.log(p) - torch.log1p(-p)).float()


class RunningMoments:
    """Mean and variance of every value seen so far, merged batch by batch (Chan et al.'s parallel Welford).

    Whitening with these (`whiten(..., moments=m)` after `m.update(batch)`) keeps the reward scale stable across
    PPO iterations; per-batch statistics (the default of `whiten`) adapt at once but make a lone batch's scores
    always look centred. The variance is the population one (divide by count), like `whiten`'s.
    Before any update: mean 0, variance 1 (whitening is then the identity).
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None, reduce: Reduce | None = None) -> None:
        """Merge the (masked) entries of `values` into the running statistics; with `reduce`, the entries of every
        rank (each rank calls this with its share and all end with the same statistics)."""
        count, total, squares = shifted_sums(values, mask, self._mean, reduce)
        if count == 0:
            return
        batch_mean = self._mean + total / count
        # sums of squares lose the last digits to cancellation: a batch that does not vary can come out just below 0
        batch_m2 = max(squares - total * total / count, 0.0)
        merged = self.count + count
        delta = batch_mean - self._mean
        self._mean += delta * count / merged
        self._m2 += batch_m2 + delta * delta * self.count * count / merged
        self.count = merged

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self._mean, self._m2 = int(state["count"]), state["mean"], state["m2"]

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


def shifted_sums(values: torch.Tensor, mask: torch.Tensor | None, shift: float,
                 reduce: Reduce | None = None) -> tuple[int, float, float]:
    """(count, sum of x - shift, sum of (x - shift)^2) over the masked entries, in float64, summed over the ranks by
    `reduce`: one all-reduce gives every rank the moments of the whole batch. The shift (a value every rank
    shares, e.g. the running mean) keeps the sum of squares from cancelling when the mean is large."""
    values = values.detach().double()
    if mask is not None:
        values = values[mask.bool()]
    values = values - shift
    sums = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device),
                        values.sum(), (values * values).sum()])
    if reduce is not None:
        sums = reduce(sums)
    count, total, squares = sums.tolist()
    return int(round(count)), total, squares


def masked_moments(values: torch.Tensor, mask: torch.Tensor | None = None,
                   reduce: Reduce | None = None) -> tuple[float, float]:
    """(mean, population variance) of the masked entries (over every rank with `reduce`); (0, 1) when empty."""
    shift = 0.0
    if reduce is None and values.numel():  # one pass here; across ranks there is no shared shift to use
        shift = masked_mean(values.detach().double(), mask).item()
    count, total, squares = shifted_sums(values, mask, shift, reduce)
    if count == 0:
        return 0.0, 1.0
    return shift + total / count, max(squares / count - (total / count) ** 2, 0.0)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, *,
           moments: RunningMoments | None = None, eps: float = 1e-8, reduce: Reduce | None = None) -> torch.Tensor:
    """(values - mean) / std over the masked entries, so rewards/advantages have a fixed scale whatever the RM.

    Statistics: per batch by default (population variance over the masked entries of this tensor, on every rank
    with `reduce`); pass `moments` (already updated with this batch) to use running ones instead.
    shift_mean=False adds the mean back: only the scale changes, the sign of each value relative to zero is kept.
    Values whose variance is at most `eps` are only centred, not scaled: there is no spread to measure a scale by,
    and dividing by ~0 would blow rounding noise up to whole units. Padding comes back as 0.
    """
    values = values.float()
    if moments is not None:
        mean, var = moments.mean, moments.var
    else:
        mean, var = masked_moments(values, mask, reduce)
    scale = 1.0 / math.sqrt(var) if var > eps else 1.0
    whitened = (values - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    if mask is not None:
        whitened = torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
    return whitened


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_0) from tokens sampled from pi (Schulman's k1/k2/k3, or |log ratio|).

    k1 = log p - log q is unbiased but can be negative per token; k3 = (r - 1) - log r, r = q/p, is unbiased
    and never negative; k2 = (log p - log q)^2 / 2 is biased but low-variance.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {list(KL_ESTIMATORS)}")
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "abs":
        return log_ratio.abs()
    # k3 with log r = -log_ratio: expm1 keeps it accurate near 0; the clamp removes rounding below 0 and, as the
    # peers do, bounds a token the policy has all but ruled out (its exp grows without limit)
    return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0, max=K3_CLAMP)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * kl at every response token, plus the sequence score at each row's last real response token.

    The score judges the whole generation, so it arrives when the generation ends; the KL term is paid per token.
    A row with no response token gets no reward at all. `score` is (batch,), the rest (batch, time).
    """
    mask = response_mask.to(torch.float32)
    rewards = torch.where(mask != 0, -beta * kl.float() * mask, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1, keepdim=True)  # index of the last 1 (0 for an empty row)
    has_response = (mask.sum(dim=1, keepdim=True) > 0).float()
    return rewards.scatter_add(1, last, score.float().view(-1, 1) * has_response)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded rows: (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A after the last
    real token taken as 0 (the generation has ended). Padding contributes nothing and gets A = returns = 0.
    Both outputs are targets, so they carry no gradient.
    """
    rewards, values = rewards.detach().float(), values.detach().float()
    real = mask.bool()
    check_right_padded(real)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = torch.where(real[:, t], values[:, t], 0.0)
        advantages[:, t] = next_advantage
    return advantages, torch.where(real, advantages + values, 0.0)


def check_right_padded(real: torch.Tensor) -> None:
    """ValueError unless every row's real tokens come first: GAE's recursion takes the first padding as the end."""
    after_padding = real[:, 1:] & ~real[:, :-1]
    if after_padding.any():
        row = int(after_padding.any(dim=1).nonzero()[0])
        raise ValueError(f"row {row}: a real token after padding; the mask must be right-padded (1s, then 0s)")


# --- advantage estimators ---------------------------------------------------------------------------------

class AdvantageFn(Protocol):
    def __call__(self, rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None,
                 groups: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class AdvantageEstimator:
    """One way to turn token rewards into (advantages, returns for the critic or None)."""

    name: str
    fn: AdvantageFn
    needs_critic: bool  # GAE bootstraps from V; the outcome estimators compare a prompt's answers instead
    whiten: bool  # PPO whitens GAE's advantages; GRPO's are normalised per group, RLOO's kept unbiased

    def __call__(self, rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None, gamma: float = 1.0,
                 lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.needs_critic and values is None:
            raise ValueError(f"advantage estimator {self.name!r} needs the critic's values")
        if groups is None:
            groups = torch.arange(rewards.shape[0], device=rewards.device)
        return self.fn(rewards, mask, values=values, groups=groups, gamma=gamma, lam=lam)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}  # name -> estimator (`ppo.advantage`)


def register_advantage(name: str, *, needs_critic: bool = False,
                       whiten: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: `fn` becomes the estimator `name` (as verl's core_algos registers its estimators)."""
    def register(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, whiten)
        return fn
    return register


def advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; allowed: {list(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


@register_advantage("gae", needs_critic=True, whiten=True)
def gae_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None, groups: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gae` as an estimator: per-token advantages and the critic's returns."""
    return gae(rewards, values, mask, gamma, lam)


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each answer's undiscounted return, the sum of its token rewards: its score minus beta * its summed KL."""
    return torch.where(mask.bool(), rewards.detach().float(), 0.0).sum(dim=1)


def group_stats(returns: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row: (size, sum, sum of squared deviations from the mean) of the returns of its group."""
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1 if index.numel() else 0, dtype=torch.float64, device=returns.device)
    returns = returns.double()
    size = count.index_add(0, index, torch.ones_like(returns))[index]
    total = count.index_add(0, index, returns)[index]
    deviation = returns - total / size
    return size, total, count.index_add(0, index, deviation * deviation)[index]


def _broadcast(per_answer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-answer advantage on every one of its tokens (0 on padding)."""
    return torch.where(mask.bool(), per_answer.float()[:, None], 0.0)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None, groups: torch.Tensor,
                    gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i - mean of the other answers' returns to the same
    prompt (`groups` holds a prompt id per row), on every token. Unbiased: the baseline never sees R_i.
    An answer alone in its group has no baseline and gets 0. Ignores gamma and lam (one return per answer)."""
    returns = sequence_returns(rewards, mask).double()
    size, total, _ = group_stats(returns, groups)
    others = torch.where(size > 1, (total - returns) / (size - 1).clamp(min=1), returns)
    return _broadcast(returns - others, mask), None


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None, groups: torch.Tensor,
                    gamma: float, lam: float, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GRPO (Shao et al. 2024, outcome supervision): A_i = (R_i - mean_g) / (std_g + eps) over the returns of the
    answers to the same prompt, std the sample one (n - 1, as verl), on every token. A group whose returns are all
    equal gives 0 (nothing to prefer); an answer alone in its group gets 0. Ignores gamma and lam."""
    returns = sequence_returns(rewards, mask).double()
    size, total, squares = group_stats(returns, groups)
    std = torch.sqrt(squares / (size - 1).clamp(min=1))
    advantages = torch.where(size > 1, (returns - total / size) / (std + eps), 0.0)
    return _broadcast(advantages, mask), None


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)).

    Also returns (detached) the clip fraction, the share of tokens where the clipped term wins (their gradient is
    zero: the policy already moved far enough that way), and approx_kl = mean((ratio - 1) - log ratio), the k3
    estimate of KL(old || new) that tells how far this update has moved the policy.
    """
    # Zeroed at padding and clamped to +-LOG_RATIO_CLAMP on real tokens (as verl, OpenRLHF and TRL do): an exp that
    # overflows would turn the gradient into NaN; the clamp's gradient is zero there, the clipped term's anyway.
    log_ratio = torch.where(mask.bool(), logprobs.float() - old_logprobs.float(), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped within old_values +- clip.

    The max makes clipping pessimistic: a value moved more than `clip` from the one used for the advantages
    gets no further gradient towards the return.
    """
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    errors = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(errors, mask)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions (batch, time, vocab) over the masked positions.

    -inf logits (forbidden tokens) are fine: their 0 * log 0 terms count as 0, in value and in gradient.
    """
    logp = F.log_softmax(logits.float(), dim=-1).clamp(min=torch.finfo(torch.float32).min)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return masked_mean(entropy, mask)
