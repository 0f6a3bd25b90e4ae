"""PPO math as LLaMA-2 uses it (Touvron et al. 2023, section 3.2.3): rewards, KL penalty, GAE and the losses.

The paper's reward for a generation g of prompt p is

    R(g|p) = whiten(logit(R_c(g|p))) - beta * KL(pi(g|p) || pi_0(g|p))

with R_c the (sigmoid) reward-model score. Here it is assembled per token: `kl_penalty` gives the KL term per
response token, `token_rewards` spreads -beta * KL over the tokens and adds the whitened logit score at the last
one, then `gae` turns the token rewards into advantages and returns for `policy_loss` and `value_loss`.
All tensors are (batch, time) over response tokens, right-padded, with a mask that is 1 on real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


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

    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Merge the (masked) entries of `values` into the running statistics."""
        values = values.detach().double()
        if mask is not None:
            values = values[mask.bool()]
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, *,
           moments: RunningMoments | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries, so rewards/advantages have a fixed scale whatever the RM.

    Statistics: per batch by default (population variance over the masked entries of this tensor); pass
    `moments` (already updated with this batch) to use running ones instead. shift_mean=False adds the mean
    back: only the scale changes, the sign of each value relative to zero is kept. Padding comes back as 0.
    """
    values = values.float()
    if moments is not None:
        mean = torch.tensor(moments.mean, dtype=values.dtype, device=values.device)
        var = torch.tensor(moments.var, dtype=values.dtype, device=values.device)
    else:
        mean = masked_mean(values, mask)
        var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
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
    # k3 with log r = -log_ratio: expm1 keeps it accurate near 0; the clamp removes rounding below 0
    return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0)


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
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = torch.where(real[:, t], values[:, t], 0.0)
        advantages[:, t] = next_advantage
    return advantages, torch.where(real, advantages + values, 0.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)).

    Also returns (detached) the clip fraction, the share of tokens where the clipped term wins (their gradient is
    zero: the policy already moved far enough that way), and approx_kl = mean((ratio - 1) - log ratio), the k3
    estimate of KL(old || new) that tells how far this update has moved the policy.
    """
    # zeroed at padding: an overflowing exp there would turn the (zero) gradient into NaN
    log_ratio = torch.where(mask.bool(), logprobs.float() - old_logprobs.float(), 0.0)
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
