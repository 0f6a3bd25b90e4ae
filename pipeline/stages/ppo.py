"""PPO on the combined reward (docs/paper.md, "Iterative fine-tuning"), on top of the rejection-sampling checkpoint.

Each iteration: the generator pool samples `samples_per_prompt` answers (1 by default) per prompt of a batch with
the current policy (vLLM); the scorer pool adds R_h, R_s and R_c; the trainer group takes one PPO update (policy and
value, one gradient step per mini-batch) and publishes the policy's tensors to Ray's object store, which the
generators reload in place (one object, one call per actor: the tensors travel together, never one call per tensor,
and no file is written). The policy is written to disk only when it is the best so far on held-out prompts.

Reward: R = whiten(logit(R_c)) - beta * KL(pi || pi_0), KL per token against the frozen starting policy (k1 by
default, `kl_estimator`), the sequence score added at the last answer token. Whitening uses running statistics
over all iterations (RunningMoments): per-batch statistics would zero the mean reward of every batch, hiding
whether the policy improves; the statistics are summed over the trainer ranks, so every rank scales alike.
Advantages (`advantage`, model.ppo.ADVANTAGE_ESTIMATORS): GAE (the default, the paper's PPO) with a critic that
starts from the helpfulness RM (its head read at every token), `gamma` and `lam` (not in the paper); or the
critic-free RLOO / GRPO, which compare the `samples_per_prompt` answers to each prompt: no value model is loaded,
trained or synchronised. Old log-probabilities for the ratio are recomputed by the trainer (from logits / the
sampling temperature, the distribution vLLM sampled from), not taken from vLLM; `logprob_mismatch` (mean |vLLM -
trainer| over answer tokens, both untempered: vLLM reports the raw model's log-probabilities) measures how far the
two differ. Ranks take the same number of gradient steps (the largest share's), a rank out of rows stepping on a
placeholder that weighs nothing, so DDP's collectives line up; each step's loss is weighted by the rank's share of
the step's answer tokens, so the update is the token mean over all ranks.
Early stopping: every `eval_every` iterations the policy answers held-out prompts and the best held-out mean R_c
(the starting policy included) is the stage's checkpoint.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from actors.metrics import record_ppo
from actors.trainer import RankContext
from actors.vllm_engine import Sampling
from model.checkpoint import load_checkpoint
from model.lm_training import optimizer_step
from model.optim import OptimConfig, adamw
from model.packing import pad_right
from model.ppo import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, Reduce, RunningMoments, advantage_estimator,
                       entropy_from_logits, kl_penalty, logit, policy_loss, token_rewards, value_loss, whiten)
from model.tokenizer import load_tokenizer
from pipeline import stage_names as names
from pipeline.cluster import Pools
from pipeline.data.store import RunStore
from pipeline.stages.cached import checkpoint_stage, training_recipe
from pipeline.stages.oracle_eval import eval_prompts, stop_ids
from pipeline.stages.rejection_sampling.stage import choose_prompts
from pipeline.stages.sft import check_positive, check_ratio
from pipeline.state import PolicyState


@dataclass
class PPOConfig:
    """Sized for the tiny models on 2 CPU cores; the paper's values are in conf/experiment/llama2-*.yaml."""

    iterations: int = 12  # paper: 200-400 with early stopping
    batch_size: int = 64  # prompts per iteration; paper 512
    samples_per_prompt: int = 1  # answers sampled per prompt; rloo and grpo compare them, so need >= 2
    mini_batch: int = 16  # answers per gradient step; paper 64
    advantage: str = "gae"  # gae (critic; the paper) | rloo | grpo (no critic): model.ppo.ADVANTAGE_ESTIMATORS
    lr: float = 3e-5  # constant; paper 1e-6 (measured: 5e-6 left the tiny policy's KL at ~0 after 12 iterations)
    value_lr: float = 5e-5
    beta: float = 0.05  # KL penalty; paper 0.01 (7B, 13B), 0.005 (34B, 70B)
    kl_estimator: str = "k1"
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    optim: OptimConfig = field(default_factory=OptimConfig)  # the policy's and the critic's
    temperature: float = 1.0
    max_tokens: int = 48
    kl_bound: float = 8.0  # mean KL per answer (nats) above which PPO stops
    eval_every: int = 4
    patience: int = 2  # held-out evaluations without improvement before stopping
    heldout_prompts: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        errors = check_positive(self, "ppo", ("iterations", "batch_size", "samples_per_prompt", "mini_batch", "lr",
                                              "value_lr", "clip", "value_clip", "temperature",
                                              "max_tokens", "kl_bound", "eval_every", "patience", "heldout_prompts"))
        errors += check_ratio(self, "ppo", ("gamma", "lam"))
        if self.beta < 0:
            errors.append(f"ppo.beta = {self.beta}: must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            errors.append(f"ppo.kl_estimator = {self.kl_estimator!r}: allowed: {', '.join(KL_ESTIMATORS)}")
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            errors.append(f"ppo.advantage = {self.advantage!r}: allowed: {', '.join(ADVANTAGE_ESTIMATORS)}")
        elif not self.needs_critic and self.samples_per_prompt < 2:
            errors.append(f"ppo.samples_per_prompt = {self.samples_per_prompt}: must be >= 2 with ppo.advantage = "
                          f"{self.advantage!r} (its baseline is the other answers to the same prompt)")
        answers = self.batch_size * self.samples_per_prompt
        if self.mini_batch > answers:
            errors.append(f"ppo.mini_batch = {self.mini_batch}: larger than the {answers} answers of an iteration "
                          f"(ppo.batch_size = {self.batch_size} x ppo.samples_per_prompt = {self.samples_per_prompt})")
        if errors:
            raise ValueError("\n".join(errors))  # pipeline.config_build turns it into a ConfigError with the path

    @property
    def needs_critic(self) -> bool:
        return advantage_estimator(self.advantage).needs_critic


# --- on the trainer ranks -----------------------------------------------------------------------------------

class Critic(torch.nn.Module):
    """The value function as a module whose forward gives per-token values, so DDP can wrap it."""

    def __init__(self, reward_model: torch.nn.Module):
        super().__init__()
        self.reward_model = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward_model.token_values(input_ids, attention_mask)


STATS = ("policy_loss", "clip_fraction", "approx_kl", "value_loss", "entropy")  # per gradient step, token means


def ppo_setup(ctx: RankContext, payload: tuple[str, str | None, PPOConfig]) -> int:
    """Load the policy, a frozen reference copy and (for GAE) the critic on this rank; returns the policy's
    parameters. `payload` is (policy folder, critic's starting RM folder or None without a critic, config)."""
    policy_dir, value_dir, config = payload
    torch.manual_seed(config.seed + ctx.rank)
    policy, reference = load_checkpoint(policy_dir), load_checkpoint(policy_dir)
    reference.requires_grad_(False)

    def optimizer(model: torch.nn.Module, lr: float) -> tuple:
        opt = adamw(model, lr, config.optim)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # constant, as in the paper

    ctx.state.clear()  # this rank's PPO models and optimizers, kept between iterations
    ctx.state.update(policy=policy, trained_policy=ctx.wrap(policy), reference=reference.to(ctx.device).eval(),
                  policy_opt=optimizer(policy, config.lr), moments=RunningMoments(),
                  estimator=advantage_estimator(config.advantage), tokenizer=load_tokenizer(policy_dir),
                  config=config, device=ctx.device)
    if config.needs_critic:  # RLOO and GRPO have none: no value model to load, train or keep in memory
        value = Critic(load_checkpoint(value_dir, head="reward"))
        ctx.state.update(value=value, trained_value=ctx.wrap(value), value_opt=optimizer(value, config.value_lr))
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


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T: the distribution the generators sampled from, which the ratio and the KL must be taken on."""
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(tempered(logits, temperature).float(), dim=-1).gather(-1, targets[..., None])[..., 0]


@dataclass
class Rollout:
    """This rank's answers as padded tensors, on its device.

    A rank with no answer holds one placeholder row whose mask is all 0: it still runs every forward, backward and
    collective the other ranks run (DDP would hang otherwise), and weighs nothing.
    """

    input_ids: torch.Tensor  # (rows, prompt + answer)
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (rows, longest answer): where each answer token is predicted from
    mask: torch.Tensor  # 1 on real answer tokens
    targets: torch.Tensor  # the answer tokens
    rows: int  # real rows (0: only the placeholder)


def rollout(prompts: Sequence[list[int]], answers: Sequence[list[int]], device: torch.device) -> Rollout:
    rows = len(answers)
    if not rows:
        prompts, answers = [[0]], [[0]]
    input_ids, attention_mask = pad_right([p + a for p, a in zip(prompts, answers)], 0)
    positions, mask = answer_positions([len(p) for p in prompts], [len(a) for a in answers])
    targets, _ = pad_right(answers, 0)
    tensors = (input_ids, attention_mask, positions, mask * float(rows > 0), targets)
    return Rollout(*(t.to(device) for t in tensors), rows)


def sum_over_ranks(ctx: RankContext) -> Reduce | None:
    """A function summing a tensor over the trainer group (all-reduce), or None in a group of one."""
    if ctx.world_size == 1:
        return None

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.detach().to(ctx.device, copy=True)
        dist.all_reduce(summed)
        return summed.to(tensor.device)
    return reduce


def max_over_ranks(ctx: RankContext, value: int) -> int:
    if ctx.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def step_rows(order: torch.Tensor, steps: int, per_rank: int) -> list[tuple[torch.Tensor, float]]:
    """(rows, weight) of each gradient step: this rank's shuffled rows, `per_rank` at a time, then, once they run
    out, row 0 with weight 0 (the step every rank must take together, with nothing to learn here)."""
    out = []
    for step in range(steps):
        rows = order[step * per_rank:(step + 1) * per_rank]
        out.append((rows, 1.0) if len(rows) else (torch.zeros(1, dtype=torch.long), 0.0))
    return out


def token_shares(ctx: RankContext, tokens: torch.Tensor) -> torch.Tensor:
    """Per step, world * (this rank's answer tokens) / (all ranks' answer tokens): DDP averages the ranks'
    gradients, so losses scaled by this make each step's gradient the token mean over every rank's answers (a rank
    with fewer rows, or only the placeholder, weighs in proportion). One all-reduce for all steps."""
    reduce = sum_over_ranks(ctx)
    total = tokens if reduce is None else reduce(tokens)
    return ctx.world_size * tokens / total.clamp(min=1.0)


@dataclass
class Targets:
    """What one iteration trains towards, per answer token of a Rollout (computed once, before any step)."""

    old_logprobs: torch.Tensor  # the policy's, from logits / temperature: the ratio's denominator
    raw_logprobs: torch.Tensor  # untempered, as vLLM reports them (logprob_mismatch only)
    vllm_logprobs: torch.Tensor
    kl: torch.Tensor  # per token, against the reference
    rewards: torch.Tensor  # whitened score at the last token, -beta * kl on every token
    old_values: torch.Tensor | None  # the critic's (GAE only)
    advantages: torch.Tensor
    returns: torch.Tensor | None  # the critic's targets (GAE only)


def prepare_batch(ctx: RankContext, batch: dict[str, list]) -> tuple[list[int], Rollout, Targets]:
    """This rank's kept rows (non-empty answers), their tensors and targets; merges the batch's scores into the
    running moments (over every rank)."""
    s, config = ctx.state, ctx.state["config"]
    device, estimator, reduce = s["device"], s["estimator"], sum_over_ranks(ctx)
    if "group" not in batch and not estimator.needs_critic:
        raise ValueError(f"ppo.advantage = {config.advantage!r} needs each answer's prompt (`group`; split_rows)")
    keep = [i for i, t in enumerate(batch["token_ids"]) if t]  # an empty answer has no action to learn from
    r = rollout([batch["prompt_token_ids"][i] for i in keep], [batch["token_ids"][i] for i in keep], device)
    real = torch.full((max(r.rows, 1),), float(r.rows > 0), device=device)  # rows that are answers
    rc = torch.tensor([batch["r_combined"][i] for i in keep] or [0.5], device=device)
    groups = [batch["group"][i] for i in keep] if "group" in batch else keep  # without groups: each answer alone
    groups = torch.tensor(groups or [-1], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = answer_logits(s["policy"], r.input_ids, r.attention_mask, r.positions)
        old_logprobs = token_logprobs(logits, r.targets, config.temperature)
        ref_logprobs = token_logprobs(answer_logits(s["reference"], r.input_ids, r.attention_mask, r.positions),
                                      r.targets, config.temperature)
        old_values = None
        if estimator.needs_critic:
            old_values = s["value"](r.input_ids, r.attention_mask).gather(1, r.positions)
        vllm_logprobs = pad_sequence([torch.tensor(batch["logprobs"][i], dtype=torch.float32) for i in keep]
                                     or [torch.zeros(1)], batch_first=True).to(device)
        kl = kl_penalty(old_logprobs, ref_logprobs, config.kl_estimator)
        score = logit(rc)
        s["moments"].update(score, real, reduce)  # every rank's scores: all ranks whiten alike
        rewards = token_rewards(whiten(score, moments=s["moments"]), kl, r.mask, config.beta)
        advantages, returns = estimator(rewards, r.mask, values=old_values, groups=groups, gamma=config.gamma,
                                        lam=config.lam)
        if estimator.whiten:
            advantages = whiten(advantages, r.mask, reduce=reduce)
    return keep, r, Targets(old_logprobs, token_logprobs(logits, r.targets), vllm_logprobs, kl, rewards, old_values,
                            advantages, returns)


def ppo_iteration(ctx: RankContext, batch: dict[str, list]) -> dict[str, float]:
    """One PPO update on this rank's share of the batch; the metrics are those of the whole batch (every rank's)."""
    config, device = ctx.state["config"], ctx.state["device"]
    keep, r, t = prepare_batch(ctx, batch)
    per_rank = max(1, config.mini_batch // ctx.world_size)
    steps = max_over_ranks(ctx, math.ceil(r.rows / per_rank))  # every rank the same count, or DDP hangs
    # A new mini-batch order every iteration (the moments count grows with each batch), the same on re-runs.
    order = torch.randperm(r.rows, generator=torch.Generator().manual_seed(config.seed + ctx.state["moments"].count))
    plan = step_rows(order, steps, per_rank)
    masks = [r.mask[rows.to(device)] * weight for rows, weight in plan]
    shares = token_shares(ctx, torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64, device=device))
    sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)  # token-weighted, over the steps
    for (rows, _), mask, share in zip(plan, masks, shares.tolist()):
        step = training_step(ctx.state, r, t, rows.to(device), mask, share)
        sums += float(mask.sum()) * torch.tensor(step, dtype=torch.float64, device=device)
    return batch_metrics(ctx, batch, r, t, len(keep), sums, steps)


def training_step(s: dict[str, Any], r: Rollout, t: Targets, rows: torch.Tensor, mask: torch.Tensor,
                  share: float) -> list[float]:
    """One policy (and critic) gradient step on `rows` with the rank's PPO state `s`, losses scaled by this rank's
    token share; the STATS."""
    config = s["config"]
    logits = answer_logits(s["trained_policy"], r.input_ids[rows], r.attention_mask[rows], r.positions[rows])
    logits = tempered(logits, config.temperature)
    loss, clip_fraction, approx_kl = policy_loss(token_logprobs(logits, r.targets[rows]), t.old_logprobs[rows],
                                                 t.advantages[rows], mask, config.clip)
    optimizer_step(s["policy"], loss * share, *s["policy_opt"], config.optim.grad_clip, "ppo policy step")
    v_loss = torch.zeros(())
    if t.old_values is not None:
        values = s["trained_value"](r.input_ids[rows], r.attention_mask[rows]).gather(1, r.positions[rows])
        v_loss = value_loss(values, t.old_values[rows], t.returns[rows], mask, config.value_clip)
        optimizer_step(s["value"], v_loss * share, *s["value_opt"], config.optim.grad_clip, "ppo value step")
    with torch.no_grad():
        entropy = entropy_from_logits(logits, mask)
    return [float(x.detach()) for x in (loss, clip_fraction, approx_kl, v_loss, entropy)]


def batch_metrics(ctx: RankContext, batch: dict[str, list], r: Rollout, t: Targets, answers: int,
                  stat_sums: torch.Tensor, steps: int) -> dict[str, float]:
    """The iteration's numbers over every rank's share (one all-reduce of sums): the driver reads rank 0's."""
    rewards = [sum(batch[f"r_{k}"]) for k in ("help", "safe", "combined")]
    mismatch = ((t.vllm_logprobs - t.raw_logprobs).abs() * r.mask).sum().item()
    local = torch.cat([stat_sums, torch.tensor(
        [r.mask.sum().item(), answers, len(batch["token_ids"]), (t.kl * r.mask).sum().item(), mismatch, *rewards],
        dtype=torch.float64, device=stat_sums.device)])
    reduce = sum_over_ranks(ctx)
    total = (local if reduce is None else reduce(local)).tolist()
    stats, (tokens, answers, rows, kl_sum, mismatch, *reward_sums) = total[:len(STATS)], total[len(STATS):]

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0  # an iteration without a single answer token reports zeros

    return {**{name: ratio(value, tokens) for name, value in zip(STATS, stats)},
            "kl": ratio(kl_sum, answers),  # per answer, summed over its tokens
            "answer_length": ratio(tokens, answers), "empty_answers": int(rows - answers),
            "logprob_mismatch": ratio(mismatch, tokens), "steps": steps,
            **{f"r_{k}": ratio(v, rows) for k, v in zip(("help", "safe", "combined"), reward_sums)}}


def publish_policy(ctx: RankContext, _: Any = None) -> Any:
    """The policy's tensors in Ray's object store for the generators (rank 0's reference; None on other ranks)."""
    return ctx.publish(ctx.state["policy"])


def export_policy(ctx: RankContext, directory: str) -> str:
    """The policy as a checkpoint folder (untied: the form vLLM reloads in place), written atomically."""
    return str(ctx.export(ctx.state["policy"], directory, tokenizer=ctx.state["tokenizer"], untie=True))


# --- in the driver ------------------------------------------------------------------------------------------

def split_rows(table: pa.Table, parts: int, samples_per_prompt: int = 1) -> list[dict[str, list]]:
    """The batch's columns as lists, one share per rank, plus `group`, each answer's prompt (its index in the
    batch). Prompts are dealt round-robin and a prompt's answers stay together on one rank: RLOO and GRPO compare
    them. The rows must be in prompt order, `samples_per_prompt` consecutive rows a prompt (the generators' order)."""
    columns = ("prompt_token_ids", "token_ids", "logprobs", "r_help", "r_safe", "r_combined")
    groups = [row // samples_per_prompt for row in range(table.num_rows)]
    if "sample_index" in table.column_names and \
            table.column("sample_index").to_pylist() != [row % samples_per_prompt for row in range(table.num_rows)]:
        raise ValueError(f"the batch's rows are not {samples_per_prompt} answers per prompt in prompt order")
    shares = []
    for rank in range(parts):
        rows = [row for row, group in enumerate(groups) if group % parts == rank]
        share = table.take(pa.array(rows, pa.int64())).select(list(columns)).to_pydict()
        shares.append({**share, "group": [groups[row] for row in rows]})
    return shares


def run_ppo_loop(out: Path, policy_dir: Path, value_dir: Path, train_prompts: pa.Table, heldout: pa.Table,
                 config: PPOConfig, stop: tuple[int, ...], generator, scorer, trainers, sync,
                 round: int | None = None) -> dict[str, Any]:  # noqa: A002
    """The iterations; the best policy by held-out reward is written to `out`. `generator` and `scorer` are
    pools, `trainers` the trainer group, `sync(weights)` reloads the generators from published weights (a
    reference `RankContext.publish` returned) and returns seconds."""
    world = trainers.world_size
    critic = str(value_dir) if config.needs_critic else None  # RLOO and GRPO: no value model on the ranks
    trainers.run(ppo_setup, [(str(policy_dir), critic, config)] * world)

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
        sampling = Sampling(n=config.samples_per_prompt, temperature=config.temperature,
                            max_tokens=config.max_tokens, seed=config.seed + it, stop_token_ids=stop)
        t0 = time.perf_counter()
        [samples] = generator.map_shards("generate", [batch], sampling, it, "ppo")
        t1 = time.perf_counter()
        [scored] = scorer.map_shards("score", [samples])
        t2 = time.perf_counter()
        metrics = trainers.run(ppo_iteration, split_rows(scored, world, config.samples_per_prompt))[0]
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


def run_ppo_stage(store: RunStore, round: int, policy: PolicyState, rm_dirs: tuple[Path, Path],  # noqa: A002
                  rm_digest: str, prompts_train: pa.Table, train_digest: str, config: PPOConfig,
                  pools: Pools) -> tuple[dict, PolicyState]:
    """The `ppo` stage of a round: PPO on `policy` (the result and its metrics returned) against the reward models in
    `rm_dirs` (helpfulness, safety), on prompts drawn from `prompts_train`; its metrics. The critic starts from
    the helpfulness RM."""
    help_dir, safe_dir = rm_dirs
    tokenizer = load_tokenizer(policy.checkpoint)
    chosen = choose_prompts(prompts_train, config.batch_size * config.iterations + config.heldout_prompts,
                            config.seed + 1)
    _, table = eval_prompts(tokenizer, chosen, "llama2")
    # Shuffled: the prompts table is grouped by category, and batches taken in order would swap the reward's
    # meaning (helpfulness, then safety) mid-run (seen: R_c "rose" from 0.6 to 1.0 with KL at 0).
    table = table.take(torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(config.seed)).numpy())
    heldout, train = table.slice(0, config.heldout_prompts), table.slice(config.heldout_prompts)
    start_checkpoint = policy.checkpoint

    def train_ppo(out: Path) -> dict:
        return run_ppo_loop(out, start_checkpoint, help_dir, train, heldout, config, stop_ids(tokenizer),
                            pools.generator(policy.name, start_checkpoint, policy.context),
                            pools.scorer(help_dir, safe_dir), pools.trainers(),
                            lambda weights: pools.push_weights(policy.name, weights), round)

    _, metrics, _ = checkpoint_stage(
        store, round, names.PPO, {"policy": policy.digest, "reward_models": rm_digest, "prompts": train_digest},
        training_recipe(config, ("betas", "eps", "weight_decay", "grad_clip")), train_ppo)
    return metrics, policy.moved_to(store.stage(round, names.PPO))
