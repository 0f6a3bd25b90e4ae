"""PPO on the combined reward (PAPER.md, "Iterative fine-tuning"), on top of the rejection-sampling checkpoint.

Each iteration: the generator pool samples one answer per prompt of a batch with the current policy (vLLM); the
scorer pool adds R_h, R_s and R_c; the trainer group takes one PPO update (policy and value, one gradient step per
mini-batch) and publishes the policy's tensors to Ray's object store, which the generators reload in place (one
object, one call per actor: the tensors travel together, never one call per tensor, and no file is written). The
policy is written to disk only when it is the best so far on held-out prompts.

Reward: R = whiten(logit(R_c)) - beta * KL(pi || pi_0), KL per token against the frozen starting policy (k1 by
default, `kl_estimator`), the sequence score added at the last answer token. Whitening uses running statistics
over all iterations (RunningMoments): per-batch statistics would zero the mean reward of every batch, hiding
whether the policy improves. The critic starts from the helpfulness RM (its head read at every token); GAE with
`gamma` and `lam` (not in the paper). Old log-probabilities for the ratio are recomputed by the trainer, not taken
from vLLM; `logprob_mismatch` (mean |vLLM - trainer| over answer tokens) measures how far the two differ.
Early stopping: every `eval_every` iterations the policy answers held-out prompts and the best held-out mean R_c
(the starting policy included) is the stage's checkpoint.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from actors.metrics import record_ppo
from actors.trainer import RankContext
from actors.vllm_engine import Sampling
from model.checkpoint import load_checkpoint
from model.lm_training import optimizer_step
from model.optim import adamw
from model.packing import pad_right
from model.ppo import (KL_ESTIMATORS, RunningMoments, entropy_from_logits, gae, kl_penalty, logit, masked_mean,
                       policy_loss, token_rewards, value_loss, whiten)
from model.tokenizer import load_tokenizer
from pipeline.stages.sft import check_positive, check_ratio


@dataclass
class PPOConfig:
    """Sized for the tiny models on 2 CPU cores; the paper's values are in `llama2()`."""

    iterations: int = 12  # paper: 200-400 with early stopping
    batch_size: int = 64  # prompts (one answer each) per iteration; paper 512
    mini_batch: int = 16  # one gradient step each; paper 64
    lr: float = 3e-5  # constant; paper 1e-6 (measured: 5e-6 left the tiny policy's KL at ~0 after 12 iterations)
    value_lr: float = 5e-5
    beta: float = 0.05  # KL penalty; paper 0.01 (7B, 13B), 0.005 (34B, 70B)
    kl_estimator: str = "k1"
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_tokens: int = 48
    kl_bound: float = 8.0  # mean KL per answer (nats) above which PPO stops
    eval_every: int = 4
    patience: int = 2  # held-out evaluations without improvement before stopping
    heldout_prompts: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        errors = check_positive(self, "ppo", ("iterations", "batch_size", "mini_batch", "lr", "value_lr", "clip",
                                              "value_clip", "grad_clip", "temperature", "max_tokens", "kl_bound",
                                              "eval_every", "patience", "heldout_prompts"))
        errors += check_ratio(self, "ppo", ("gamma", "lam"))
        if self.beta < 0:
            errors.append(f"ppo.beta = {self.beta}: must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            errors.append(f"ppo.kl_estimator = {self.kl_estimator!r}: allowed: {', '.join(KL_ESTIMATORS)}")
        if self.mini_batch > self.batch_size:
            errors.append(f"ppo.mini_batch = {self.mini_batch}: larger than ppo.batch_size = {self.batch_size}")
        if errors:
            raise ValueError("\n".join(errors))

    @classmethod
    def llama2(cls, beta: float = 0.01) -> PPOConfig:
        """PAPER.md: constant lr 1e-6, batch 512, mini-batch 64, clip 0.2, beta 0.01 (7B) / 0.005 (70B), AdamW
        (0.9, 0.95), eps 1e-5, weight decay 0.1, grad clip 1.0, up to 400 iterations with early stopping."""
        return cls(iterations=400, batch_size=512, mini_batch=64, lr=1e-6, beta=beta, heldout_prompts=512,
                   eval_every=20, patience=3)


# --- on the trainer ranks -----------------------------------------------------------------------------------

class Critic(torch.nn.Module):
    """The value function as a module whose forward gives per-token values, so DDP can wrap it."""

    def __init__(self, reward_model: torch.nn.Module):
        super().__init__()
        self.reward_model = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward_model.token_values(input_ids, attention_mask)


_STATE: dict[str, Any] = {}  # this rank's PPO models and optimizers, kept between iterations


def ppo_setup(ctx: RankContext, payload: tuple[str, str, PPOConfig]) -> int:
    """Load the policy, a frozen reference copy and the critic on this rank; returns the policy's parameters."""
    policy_dir, value_dir, config = payload
    torch.manual_seed(config.seed + ctx.rank)
    policy, reference = load_checkpoint(policy_dir), load_checkpoint(policy_dir)
    value = Critic(load_checkpoint(value_dir, head="reward"))
    reference.requires_grad_(False)

    def optimizer(model: torch.nn.Module, lr: float) -> tuple:
        opt = adamw(model, lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # constant, as in the paper

    _STATE.clear()
    _STATE.update(policy=policy, trained_policy=ctx.wrap(policy), reference=reference.to(ctx.device).eval(),
                  value=value, trained_value=ctx.wrap(value), policy_opt=optimizer(policy, config.lr),
                  value_opt=optimizer(value, config.value_lr), moments=RunningMoments(),
                  tokenizer=load_tokenizer(policy_dir), config=config, device=ctx.device)
    return policy.num_parameters


def answer_positions(prompt_lengths: Sequence[int], answer_lengths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """(positions, mask), both (batch, longest answer): answer token j of row b sits at prompt_len + j and is
    predicted from position prompt_len + j - 1, which is what `positions` holds (clamped inside the row on padding)."""
    width = max(answer_lengths)
    j = torch.arange(width)
    mask = (j[None, :] < torch.tensor(answer_lengths)[:, None]).float()
    positions = torch.tensor(prompt_lengths)[:, None] - 1 + j[None, :]
    return torch.where(mask.bool(), positions, torch.tensor(prompt_lengths)[:, None] - 1), mask


def answer_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids, attention_mask=attention_mask)
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def ppo_iteration(ctx: RankContext, batch: dict[str, list]) -> dict[str, float]:
    """One PPO update on this rank's share of the batch."""
    s, config = _STATE, _STATE["config"]
    device = s["device"]
    keep = [i for i, t in enumerate(batch["token_ids"]) if t]  # an empty answer has no action to learn from
    prompts = [batch["prompt_token_ids"][i] for i in keep]
    answers = [batch["token_ids"][i] for i in keep]
    input_ids, attention_mask = (t.to(device) for t in pad_right([p + a for p, a in zip(prompts, answers)], 0))
    positions, mask = (t.to(device) for t in answer_positions([len(p) for p in prompts], [len(a) for a in answers]))
    targets, _ = pad_right(answers, 0)
    targets = targets.to(device)
    rc = torch.tensor([batch["r_combined"][i] for i in keep], device=device)

    with torch.no_grad():
        old_logprobs = token_logprobs(answer_logits(s["policy"], input_ids, attention_mask, positions), targets)
        ref_logprobs = token_logprobs(answer_logits(s["reference"], input_ids, attention_mask, positions), targets)
        old_values = s["value"](input_ids, attention_mask).gather(1, positions)
        vllm_logprobs = pad_sequence([torch.tensor(batch["logprobs"][i]) for i in keep], batch_first=True)
        mismatch = masked_mean((vllm_logprobs.to(device) - old_logprobs).abs(), mask).item()
        kl = kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator)
        score = logit(rc)
        s["moments"].update(score)
        rewards = token_rewards(whiten(score, moments=s["moments"]), kl, mask, config.beta)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)

    stats: dict[str, list[float]] = {"policy_loss": [], "clip_fraction": [], "approx_kl": [], "value_loss": [],
                                     "entropy": []}
    # A new mini-batch order every iteration (the moments count grows with each batch), the same on re-runs.
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(config.seed + s["moments"].count))
    per_rank = max(1, config.mini_batch // ctx.world_size)
    for rows in order.split(per_rank):
        logits = answer_logits(s["trained_policy"], input_ids[rows], attention_mask[rows], positions[rows])
        loss, clip_fraction, approx_kl = policy_loss(token_logprobs(logits, targets[rows]), old_logprobs[rows],
                                                     advantages[rows], mask[rows], config.clip)
        optimizer_step(s["policy"], loss, *s["policy_opt"], config.grad_clip, "ppo policy step")
        values = s["trained_value"](input_ids[rows], attention_mask[rows]).gather(1, positions[rows])
        v_loss = value_loss(values, old_values[rows], returns[rows], mask[rows], config.value_clip)
        optimizer_step(s["value"], v_loss, *s["value_opt"], config.grad_clip, "ppo value step")
        with torch.no_grad():
            stats["entropy"].append(entropy_from_logits(logits, mask[rows]).item())
        for name, value in (("policy_loss", loss), ("clip_fraction", clip_fraction), ("approx_kl", approx_kl),
                            ("value_loss", v_loss)):
            stats[name].append(float(value.detach()))
    lengths = mask.sum(1)
    return {**{name: sum(v) / len(v) for name, v in stats.items()},
            "kl": (kl * mask).sum(1).mean().item(),  # per answer, summed over its tokens
            "answer_length": lengths.mean().item(), "empty_answers": len(batch["token_ids"]) - len(keep),
            "logprob_mismatch": mismatch,
            **{f"r_{k}": sum(batch[f"r_{k}"]) / len(batch[f"r_{k}"]) for k in ("help", "safe", "combined")}}


def publish_policy(ctx: RankContext, _: Any = None) -> Any:
    """The policy's tensors in Ray's object store for the generators (rank 0's reference; None on other ranks)."""
    return ctx.publish(_STATE["policy"])


def export_policy(ctx: RankContext, directory: str) -> str:
    """The policy as a checkpoint folder (untied: the form vLLM reloads in place), written atomically."""
    return str(ctx.export(_STATE["policy"], directory, tokenizer=_STATE["tokenizer"], untie=True))


# --- in the driver ------------------------------------------------------------------------------------------

def split_rows(table: pa.Table, parts: int) -> list[dict[str, list]]:
    """The batch's columns as lists, one share per rank."""
    columns = ("prompt_token_ids", "token_ids", "logprobs", "r_help", "r_safe", "r_combined")
    return [table.take(pa.array(range(r, table.num_rows, parts), pa.int64())).select(list(columns)).to_pydict()
            for r in range(parts)]


def run_ppo_loop(out: Path, policy_dir: Path, value_dir: Path, train_prompts: pa.Table, heldout: pa.Table,
                 config: PPOConfig, stop: tuple[int, ...], generator, scorer, trainers, sync,
                 round: int | None = None) -> dict[str, Any]:  # noqa: A002
    """The iterations; the best policy by held-out reward is written to `out`. `generator` and `scorer` are
    pools, `trainers` the trainer group, `sync(weights)` reloads the generators from published weights (a
    reference `RankContext.publish` returned) and returns seconds."""
    world = trainers.world_size
    trainers.run(ppo_setup, [(str(policy_dir), str(value_dir), config)] * world)

    def heldout_reward(iteration: int) -> float:
        sampling = Sampling(n=1, temperature=config.temperature, max_tokens=config.max_tokens,
                            seed=config.seed + 100_000 + iteration, stop_token_ids=stop)
        [samples] = generator.map_shards("generate", [heldout], sampling, 0, "ppo-heldout")
        [scored] = scorer.map_shards("score", [samples])
        return sum(scored.column("r_combined").to_pylist()) / scored.num_rows

    best, best_iteration, stale = heldout_reward(0), 0, 0
    shutil.copytree(policy_dir, out)  # the starting policy is the checkpoint until PPO beats it
    curve = [{"iteration": 0, "heldout_reward": best}]
    rows, stopped = [], "iterations done"
    for it in range(1, config.iterations + 1):
        start = (it - 1) * config.batch_size % train_prompts.num_rows
        batch = train_prompts.take(pa.array([(start + i) % train_prompts.num_rows for i in range(config.batch_size)],
                                            pa.int64()))
        sampling = Sampling(n=1, temperature=config.temperature, max_tokens=config.max_tokens,
                            seed=config.seed + it, stop_token_ids=stop)
        t0 = time.perf_counter()
        [samples] = generator.map_shards("generate", [batch], sampling, it, "ppo")
        t1 = time.perf_counter()
        [scored] = scorer.map_shards("score", [samples])
        t2 = time.perf_counter()
        metrics = trainers.run(ppo_iteration, split_rows(scored, world))[0]
        t3 = time.perf_counter()
        sync(trainers.run(publish_policy, [None] * world)[0])
        t4 = time.perf_counter()
        rows.append({"iteration": it, **metrics, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
                     "sync_s": t4 - t3})
        record_ppo(it, rows[-1], round)  # the dashboard's view of the same row
        if metrics["kl"] > config.kl_bound:
            stopped = f"KL {metrics['kl']:.2f} above ppo.kl_bound = {config.kl_bound}"
            break
        if it % config.eval_every == 0 or it == config.iterations:
            reward = heldout_reward(it)
            curve.append({"iteration": it, "heldout_reward": reward})
            if reward > best:
                best, best_iteration, stale = reward, it, 0
                trainers.run(export_policy, [str(out)] * world)  # replaces `out` atomically
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = f"no held-out gain in {stale} evaluations"
                    break
    return {"iterations": rows, "heldout": curve, "best_iteration": best_iteration, "best_heldout_reward": best,
            "stopped": stopped}
