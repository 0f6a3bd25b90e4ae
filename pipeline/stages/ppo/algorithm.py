"""PPO on the combined reward (docs/paper.md, "Iterative fine-tuning"), the rank side: the config and one update
on every trainer rank (the driver's loop, on the pools, is ppo/stage.py).

Reward: R = whiten(logit(R_c)) - beta * KL(pi || pi_0), KL per token against the frozen starting policy (k1 by
default, `kl_estimator`), the sequence score added at the last answer token. Whitening uses running statistics
over all iterations (RunningMoments): per-batch statistics would zero the mean reward of every batch, hiding
whether the policy improves; the statistics are summed over the trainer ranks, so every rank scales alike.
Advantages (`advantage`, model.ppo.ADVANTAGE_ESTIMATORS): GAE (the default, the paper's PPO) with a critic that
starts from the helpfulness RM (its head read at every token), `gamma` and `lam` (not in the paper); or the
critic-free RLOO / GRPO, which compare the `samples_per_prompt` answers to each prompt: no value model is loaded,
trained or synchronised. Old log-probabilities for the ratio (`old_logprobs`) are the sampler's (vLLM returns
them: no policy pass) or recomputed by the trainer (from logits / the sampling temperature, the distribution vLLM
sampled from); `logprob_mismatch` (mean |vLLM - trainer| over answer tokens, both untempered: vLLM reports the raw
model's log-probabilities) measures how far the two differ: over the whole batch with the trainer's, over the first
mini-batch (its gradient step's forward, before any update) with the sampler's, which an iteration whose mismatch
exceeds `logprob_tolerance` replaces by the trainer's before its first step. The no-gradient passes run in chunks
of similar length, each padded to its own longest row; `group_by_length` makes the mini-batches so too.
Ranks take the same number of gradient steps (the largest share's), a rank out of rows stepping on a
placeholder that weighs nothing, so DDP's collectives line up; each step's loss is weighted by the rank's share of
the step's answer tokens, so the update is the token mean over all ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from actors.trainer import RankContext
from model.optim import OptimConfig
from model.packing import pad_right
from model.ppo import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, Reduce, RunningMoments, advantage_estimator,
                       entropy_from_logits, kl_penalty, logit, policy_loss, token_rewards, value_loss, whiten)
from model.sharded import load_for_training, load_train_state, save_train_state
from model.tokenizer import load_tokenizer
from model.training import TrainConfig, Trainer, is_sharded, micro_split, wrap
from pipeline.stages.generation import ANSWER_TOKENS
from pipeline.stages.sft.algorithm import check_positive, check_ratio


OLD_LOGPROBS = ("sampler", "trainer")  # where the ratio's old log-probabilities come from (`ppo.old_logprobs`)


@dataclass
class PPOConfig:
    """Defaults are the paper's for 7B (docs/paper.md, "PPO"; 70B halves `beta`) where it gives one; the tiny
    world's are in conf/experiment/tiny-full.yaml."""

    iterations: int = 400  # at most: the paper's 200-400, stopped early on held-out prompts
    batch_size: int = 512  # prompts per iteration
    samples_per_prompt: int = 1  # answers sampled per prompt; rloo and grpo compare them, so need >= 2
    mini_batch: int = 64  # answers per gradient step
    advantage: str = "gae"  # gae (critic; the paper) | rloo | grpo (no critic): model.ppo.ADVANTAGE_ESTIMATORS
    lr: float = 1e-6  # constant
    value_lr: float = 5e-5  # not in the paper
    beta: float = 0.01  # KL penalty
    kl_estimator: str = "k1"
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    optim: OptimConfig = field(default_factory=OptimConfig)  # the policy's and the critic's
    # Policy, critic and reference over the trainer ranks: "ddp" (a replica each) or "fsdp" (sharded; 7B and up).
    parallel: str = "ddp"
    # precision, checkpointing, offload; micro_batch: answers per forward within a rank's share of a mini-batch
    train: TrainConfig = field(default_factory=TrainConfig)
    offload_reference: bool = False  # FSDP only: the frozen reference's shards on the host between forwards
    temperature: float = 1.0
    # The sampler's by default: they match the trainer's on CPU (docs/benchmarks.md) and save a policy pass per
    # iteration; an iteration that measures more than the tolerance recomputes them.
    old_logprobs: str = "sampler"  # sampler (vLLM's; needs temperature 1) | trainer (a policy pass per iteration)
    logprob_tolerance: float = 0.01  # mean |sampler - trainer| nats per answer token: ~1% on the ratio
    group_by_length: bool = True  # mini-batches of rows of similar length (random order), padded to their own
    max_tokens: int = ANSWER_TOKENS
    kl_bound: float = 8.0  # mean KL per answer (nats) above which PPO stops
    eval_every: int = 20
    patience: int = 3  # held-out evaluations without improvement before stopping
    heldout_prompts: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        errors = check_positive(self, "ppo", ("iterations", "batch_size", "samples_per_prompt", "mini_batch", "lr",
                                              "value_lr", "clip", "value_clip", "temperature",
                                              "max_tokens", "kl_bound", "eval_every", "patience", "heldout_prompts",
                                              "logprob_tolerance"))
        errors += check_ratio(self, "ppo", ("gamma", "lam"))
        if self.beta < 0:
            errors.append(f"ppo.beta = {self.beta}: must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            errors.append(f"ppo.kl_estimator = {self.kl_estimator!r}: allowed: {', '.join(KL_ESTIMATORS)}")
        if self.old_logprobs not in OLD_LOGPROBS:
            errors.append(f"ppo.old_logprobs = {self.old_logprobs!r}: allowed: {', '.join(OLD_LOGPROBS)}")
        elif self.old_logprobs == "sampler" and self.temperature != 1.0:
            errors.append(f"ppo.old_logprobs = 'sampler' needs ppo.temperature = 1, not {self.temperature} (vLLM "
                          "reports the untempered model's log-probabilities); use ppo.old_logprobs = 'trainer'")
        errors += self.train.check_strategy(self.parallel, "ppo")
        if self.offload_reference and self.parallel != "fsdp":
            errors.append("ppo.offload_reference = true needs ppo.parallel = 'fsdp' (offload moves FSDP's shards)")
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
            raise ValueError("\n".join(errors))  # pipeline.config.build turns it into a ConfigError with the path

    @property
    def needs_critic(self) -> bool:
        return advantage_estimator(self.advantage).needs_critic


# --- on the trainer ranks -----------------------------------------------------------------------------------

STATS = ("policy_loss", "clip_fraction", "approx_kl", "value_loss", "entropy")  # per gradient step, token means
# The ranks' saves belong to the stage's own folder, which the stage's inputs and config already key.
STATE_RUN = "ppo"


def ppo_setup(ctx: RankContext, payload: tuple[str, str | None, PPOConfig]) -> int:
    """Load the policy, a frozen reference copy and (for GAE) the critic on this rank, each wrapped (or sharded) for
    the group before its optimizer is built; returns the policy's parameters. `payload` is (policy folder, critic's
    starting RM folder or None without a critic, config)."""
    policy_dir, value_dir, config = payload
    torch.manual_seed(config.seed + ctx.rank)
    setup = ctx.setup(config.parallel, config.train)
    # FSDP: each rank reads only its own shards of the three models; the lr is constant, as in the paper
    policy = Trainer(load_for_training(policy_dir, setup), setup, config.lr, config.optim)
    reference = load_for_training(policy_dir, setup, trainable=False, offload=config.offload_reference)
    ctx.state.clear()  # this rank's PPO models and optimizers, kept between iterations
    ctx.state.update(policy=policy.model, trained_policy=policy.module, policy_trainer=policy,
                     reference=wrap(reference, setup, trainable=False).requires_grad_(False).eval(),
                     moments=RunningMoments(), estimator=advantage_estimator(config.advantage),
                     tokenizer=load_tokenizer(policy_dir), config=config, device=ctx.device,
                     sharded=is_sharded(policy.model))
    if config.needs_critic:  # RLOO and GRPO have none: no value model to load, train or keep in memory
        value = Trainer(load_for_training(value_dir, setup, head="reward"), setup, config.value_lr, config.optim)
        ctx.state.update(value=value.model, trained_value=value.module, value_trainer=value)
    return policy.model.num_parameters


def answer_positions(prompt_lengths: Sequence[int], answer_lengths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """(positions, mask), both (batch, longest answer): answer token j of row b sits at prompt_len + j and is
    predicted from position prompt_len + j - 1, which is what `positions` holds (clamped inside the row on padding)."""
    width = max(answer_lengths)
    j = torch.arange(width)
    mask = (j[None, :] < torch.tensor(answer_lengths)[:, None]).float()
    positions = torch.tensor(prompt_lengths)[:, None] - 1 + j[None, :]
    return torch.where(mask.bool(), positions, torch.tensor(prompt_lengths)[:, None] - 1), mask


def answer_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
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
    """Answers as right-padded tensors, on the rank's device.

    A rank with no answer holds one placeholder row whose mask is all 0: it still runs every forward, backward and
    collective the other ranks run (DDP would hang otherwise), and weighs nothing.
    """

    input_ids: torch.Tensor  # (rows, prompt + answer)
    positions: torch.Tensor  # (rows, longest answer): where each answer token is predicted from
    mask: torch.Tensor  # 1 on real answer tokens
    targets: torch.Tensor  # the answer tokens
    rows: int  # real rows (0: only the placeholder)
    lengths: list[int]  # per row: prompt + answer tokens
    answer_lengths: list[int]

    def take(self, rows: torch.Tensor) -> Rollout:
        """These rows, padded only to their own longest sequence and answer (the same numbers for less work)."""
        picked = rows.tolist()
        width = max(self.lengths[i] for i in picked)
        answers = max(self.answer_lengths[i] for i in picked)
        at = rows.to(self.input_ids.device)
        return Rollout(self.input_ids[at, :width], self.positions[at, :answers], self.mask[at, :answers],
                       self.targets[at, :answers], len(picked), [self.lengths[i] for i in picked],
                       [self.answer_lengths[i] for i in picked])

    def chunks(self, size: int) -> list[torch.Tensor]:
        """All rows by length, `size` at a time: each chunk's padding is only its own."""
        return list(torch.argsort(torch.tensor(self.lengths), stable=True).split(size))

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        # Right padding needs no mask: causal attention never lets a real token see the padding after it.
        return answer_logits(model, self.input_ids, None, self.positions)

    def values(self, critic: torch.nn.Module) -> torch.Tensor:
        return critic(self.input_ids, None, per_token=True).gather(1, self.positions)


def rollout(prompts: Sequence[list[int]], answers: Sequence[list[int]], device: torch.device) -> Rollout:
    rows = len(answers)
    if not rows:
        prompts, answers = [[0]], [[0]]
    input_ids, _ = pad_right([p + a for p, a in zip(prompts, answers)], 0)
    positions, mask = answer_positions([len(p) for p in prompts], [len(a) for a in answers])
    targets, _ = pad_right(answers, 0)
    tensors = (input_ids, positions, mask * float(rows > 0), targets)
    return Rollout(*(t.to(device) for t in tensors), rows, [len(p) + len(a) for p, a in zip(prompts, answers)],
                   [len(a) for a in answers])


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


def mini_batches(lengths: Sequence[int], per_rank: int, by_length: bool, seed: int) -> list[torch.Tensor]:
    """This rank's rows, `per_rank` a mini-batch, in random order; with `by_length`, each mini-batch holds rows of
    similar length (ties broken at random), so that it pads little."""
    if not lengths:
        return []
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    if not by_length:
        return list(order.split(per_rank))
    order = order[torch.argsort(torch.tensor(lengths, dtype=torch.long)[order], stable=True)]
    batches = order.split(per_rank)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def step_rows(batches: list[torch.Tensor], steps: int) -> list[tuple[torch.Tensor, float]]:
    """(rows, weight) of each gradient step: this rank's mini-batches, then, once they run out, row 0 with weight 0
    (the step every rank must take together, with nothing to learn here)."""
    return [(rows, 1.0) for rows in batches] + [(torch.zeros(1, dtype=torch.long), 0.0)] * (steps - len(batches))


def token_shares(ctx: RankContext, tokens: torch.Tensor) -> torch.Tensor:
    """Per step, world * (this rank's answer tokens) / (all ranks' answer tokens): DDP averages the ranks'
    gradients, so losses scaled by this make each step's gradient the token mean over every rank's answers (a rank
    with fewer rows, or only the placeholder, weighs in proportion). One all-reduce for all steps."""
    reduce = sum_over_ranks(ctx)
    total = tokens if reduce is None else reduce(tokens)
    return ctx.world_size * tokens / total.clamp(min=1.0)


@dataclass
class Targets:
    """What one iteration trains towards, per answer token of a Rollout (computed before any step; `shaped` fills
    the fields from `kl` on)."""

    old_logprobs: torch.Tensor  # the ratio's denominator: the sampler's, or the policy's from logits / temperature
    ref_logprobs: torch.Tensor
    vllm_logprobs: torch.Tensor  # untempered, as vLLM reports them
    score: torch.Tensor  # per row: the whitened logit(R_c)
    groups: torch.Tensor  # per row: its prompt
    old_values: torch.Tensor | None  # the critic's (GAE only)
    mismatch: tuple[float, float]  # (sum of |vLLM - trainer| over the answer tokens compared, their count)
    sampler: bool  # old_logprobs are the sampler's
    kl: torch.Tensor | None = None  # per token, against the reference
    rewards: torch.Tensor | None = None  # whitened score at the last token, -beta * kl on every token
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None  # the critic's targets (GAE only)


def no_grad_pass(ctx: RankContext, r: Rollout, forward) -> tuple[torch.Tensor, ...]:
    """`forward(a Rollout of some rows)` -> tensors (those rows, their answer width), over every row without
    gradients in length-sorted chunks of a step's rows, back in row order at the batch's answer width.

    Sharded models gather their weights in every forward, so every rank runs as many forwards as the rank with the
    most chunks (the extra ones on its first chunk, their output dropped)."""
    chunks = r.chunks(rows_per_step(ctx))
    extra = max_over_ranks(ctx, len(chunks)) - len(chunks) if ctx.state["sharded"] else 0
    outs: list[torch.Tensor] = []
    with torch.no_grad(), ctx.state["policy_trainer"].precision():
        for rows in chunks:
            parts = forward(r.take(rows))
            outs = outs or [torch.zeros(r.mask.shape, device=r.mask.device) for _ in parts]
            at = rows.to(r.mask.device)
            for out, part in zip(outs, parts):
                out[at, :part.shape[1]] = part.float()
        for _ in range(extra):
            forward(r.take(chunks[0]))
    return tuple(outs)


def rows_per_step(ctx: RankContext) -> int:
    return max(1, ctx.state["config"].mini_batch // ctx.world_size)


def shaped(ctx: RankContext, r: Rollout, t: Targets, old_logprobs: torch.Tensor) -> Targets:
    """`t` with these old log-probabilities and what follows from them: KL, token rewards, advantages, returns."""
    config, estimator = ctx.state["config"], ctx.state["estimator"]
    kl = kl_penalty(old_logprobs, t.ref_logprobs, config.kl_estimator)
    rewards = token_rewards(t.score, kl, r.mask, config.beta)
    advantages, returns = estimator(rewards, r.mask, values=t.old_values, groups=t.groups, gamma=config.gamma,
                                    lam=config.lam)
    if estimator.whiten:
        advantages = whiten(advantages, r.mask, reduce=sum_over_ranks(ctx))
    return dataclasses.replace(t, old_logprobs=old_logprobs, kl=kl, rewards=rewards, advantages=advantages,
                               returns=returns)


def with_trainer_logprobs(ctx: RankContext, r: Rollout, t: Targets) -> Targets:
    """`t` shaped on the policy's own old log-probabilities (a pass without gradients, from logits / temperature),
    the mismatch measured over every answer token."""
    policy, temperature = ctx.state["policy"], ctx.state["config"].temperature

    def forward(part: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        logits = part.logits(policy)
        return token_logprobs(logits, part.targets, temperature), token_logprobs(logits, part.targets)

    old, raw = no_grad_pass(ctx, r, forward)
    mismatch = (float(((t.vllm_logprobs - raw).abs() * r.mask).sum()), float(r.mask.sum()))
    return shaped(ctx, r, dataclasses.replace(t, mismatch=mismatch, sampler=False), old)


def prepare_batch(ctx: RankContext, batch: dict[str, list]) -> tuple[list[int], Rollout, Targets]:
    """This rank's kept rows (non-empty answers), their tensors and targets; merges the batch's scores into the
    running moments (over every rank)."""
    s, config = ctx.state, ctx.state["config"]
    device, estimator, reduce = s["device"], s["estimator"], sum_over_ranks(ctx)
    if "group" not in batch and not estimator.needs_critic:
        raise ValueError(f"ppo.advantage = {config.advantage!r} needs each answer's prompt (`group`; split_rows)")
    keep = [i for i, t in enumerate(batch["token_ids"]) if t]  # an empty answer has no action to learn from
    short = next((i for i in keep if len(batch["logprobs"][i]) != len(batch["token_ids"][i])), None)
    if short is not None:
        raise ValueError(f"row {short}: {len(batch['logprobs'][short])} sampler log-probabilities for "
                         f"{len(batch['token_ids'][short])} answer tokens")
    r = rollout([batch["prompt_token_ids"][i] for i in keep], [batch["token_ids"][i] for i in keep], device)
    real = torch.full((max(r.rows, 1),), float(r.rows > 0), device=device)  # rows that are answers
    rc = torch.tensor([batch["r_combined"][i] for i in keep] or [0.5], device=device)
    groups = [batch["group"][i] for i in keep] if "group" in batch else keep  # without groups: each answer alone
    groups = torch.tensor(groups or [-1], dtype=torch.long, device=device)
    vllm_logprobs = pad_sequence([torch.tensor(batch["logprobs"][i], dtype=torch.float32) for i in keep]
                                 or [torch.zeros(1)], batch_first=True).to(device)

    def forward(part: Rollout) -> tuple[torch.Tensor, ...]:
        ref = token_logprobs(part.logits(s["reference"]), part.targets, config.temperature)
        return (ref, part.values(s["value"])) if estimator.needs_critic else (ref,)

    ref_logprobs, *values = no_grad_pass(ctx, r, forward)
    score = logit(rc)
    s["moments"].update(score, real, reduce)  # every rank's scores: all ranks whiten alike
    t = Targets(vllm_logprobs, ref_logprobs, vllm_logprobs, whiten(score, moments=s["moments"]), groups,
                values[0] if values else None, (0.0, 0.0), sampler=True)
    if config.old_logprobs == "trainer":
        return keep, r, with_trainer_logprobs(ctx, r, t)
    return keep, r, shaped(ctx, r, t, vllm_logprobs)  # checked against the policy at the first step


def checked(ctx: RankContext, r: Rollout, t: Targets, part: Rollout, rows: torch.Tensor, mask: torch.Tensor,
            logits: torch.Tensor) -> Targets:
    """The sampler's log-probabilities against the policy's own on the first step's rows (its forward, before any
    update): kept when the mean difference over every rank's rows is within ppo.logprob_tolerance, else replaced by
    the trainer's (the policy has not moved yet, so they are the old policy's)."""
    mine = token_logprobs(logits.detach(), part.targets)  # temperature 1: the config allows no other
    at = rows.to(mask.device)
    local = torch.stack([((t.vllm_logprobs[at, :mask.shape[1]] - mine).abs() * mask).sum(), mask.sum()]).double()
    reduce = sum_over_ranks(ctx)
    difference, tokens = (local if reduce is None else reduce(local)).tolist()
    if difference > ctx.state["config"].logprob_tolerance * tokens:
        return with_trainer_logprobs(ctx, r, t)
    return dataclasses.replace(t, mismatch=tuple(local.tolist()))


def ppo_iteration(ctx: RankContext, batch: dict[str, list]) -> dict[str, float]:
    """One PPO update on this rank's share of the batch; the metrics are those of the whole batch (every rank's)."""
    start, s = time.perf_counter(), ctx.state
    config, device = s["config"], s["device"]
    keep, r, t = prepare_batch(ctx, batch)
    per_rank = rows_per_step(ctx)
    steps = max_over_ranks(ctx, math.ceil(r.rows / per_rank))  # every rank the same count, or DDP hangs
    # A new mini-batch order every iteration (the moments count grows with each batch), the same on re-runs.
    plan = step_rows(mini_batches(r.lengths[:r.rows], per_rank, config.group_by_length,
                                  config.seed + s["moments"].count), steps)
    micro = config.train.micro_batch
    forwards = math.ceil(per_rank / micro) if micro else 1  # per step, the same on every rank
    micros = [micro_steps(r, rows, weight, forwards) for rows, weight in plan]
    tokens = [sum(float(mask.sum()) for _, _, mask in step) for step in micros]
    shares = token_shares(ctx, torch.tensor(tokens, dtype=torch.float64, device=device))
    sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)  # token-weighted, over the steps
    for i, (step, count, share) in enumerate(zip(micros, tokens, shares.tolist())):
        t, step_sums = training_step(ctx, r, t, step, count, share, check_sampler=i == 0 and t.sampler)
        sums += step_sums
    return batch_metrics(ctx, batch, r, t, len(keep), sums, steps, time.perf_counter() - start)


def micro_steps(r: Rollout, rows: torch.Tensor, weight: float,
                forwards: int) -> list[tuple[torch.Tensor, Rollout, torch.Tensor]]:
    """A step's rows in `forwards` micro-batches (model.training.micro_split: as many on every rank), each as (rows,
    their Rollout, their mask), the mask 0 where the step or the micro-batch is a placeholder."""
    out = []
    for micro_rows, real in micro_split(rows, forwards):
        part = r.take(micro_rows)
        out.append((micro_rows, part, part.mask * (weight * real)))
    return out


def training_step(ctx: RankContext, r: Rollout, t: Targets, micros: list[tuple[torch.Tensor, Rollout, torch.Tensor]],
                  tokens: float, share: float, check_sampler: bool) -> tuple[Targets, torch.Tensor]:
    """One policy (and critic) gradient step over a step's micro-batches (`micro_steps`), the gradients accumulated,
    losses scaled by this rank's token share and each micro-batch's share of the step's tokens. Returns the targets
    (with `check_sampler`, the sampler's log-probabilities checked on the first micro-batch's forward: `checked`) and
    the STATS summed over the step's tokens."""
    s, config = ctx.state, ctx.state["config"]
    policy, value = s["policy_trainer"], s.get("value_trainer")
    sums = torch.zeros(len(STATS), dtype=torch.float64, device=s["device"])
    losses = [0.0, 0.0]
    for j, (rows, part, mask) in enumerate(micros):
        last, count = j == len(micros) - 1, float(mask.sum())
        weight = share if len(micros) == 1 else share * count / tokens if tokens else 0.0
        at, width = rows.to(mask.device), mask.shape[1]
        with policy.accumulating(last):
            with policy.precision():
                logits = tempered(part.logits(s["trained_policy"]), config.temperature)
            if check_sampler and j == 0:
                t = checked(ctx, r, t, part, rows, mask, logits)
            loss, clip_fraction, approx_kl = policy_loss(token_logprobs(logits, part.targets),
                                                         t.old_logprobs[at, :width], t.advantages[at, :width], mask,
                                                         config.clip)
            policy.backward(loss, weight, "ppo policy step")
        v_loss = torch.zeros(())
        if t.old_values is not None:
            with value.accumulating(last):
                with value.precision():
                    values = part.values(s["trained_value"])
                v_loss = value_loss(values, t.old_values[at, :width], t.returns[at, :width], mask, config.value_clip)
                value.backward(v_loss, weight, "ppo value step")
        with torch.no_grad():
            entropy = entropy_from_logits(logits, mask)
        losses = [losses[0] + loss.item() * weight, losses[1] + v_loss.item() * weight]
        sums += count * torch.tensor([float(x.detach()) for x in (loss, clip_fraction, approx_kl, v_loss, entropy)],
                                     dtype=torch.float64, device=sums.device)
    policy.apply("ppo policy step", losses[0])
    if t.old_values is not None:
        value.apply("ppo value step", losses[1])
    return t, sums


def batch_metrics(ctx: RankContext, batch: dict[str, list], r: Rollout, t: Targets, answers: int,
                  stat_sums: torch.Tensor, steps: int, seconds: float) -> dict[str, float]:
    """The iteration's numbers over every rank's share (one all-reduce of sums): the driver reads rank 0's.
    `update_s` is the ranks' mean of their own seconds (the driver's train_s adds the remote call)."""
    rewards = [sum(batch[f"r_{k}"]) for k in ("help", "safe", "combined")]
    local = torch.cat([stat_sums, torch.tensor(
        [r.mask.sum().item(), answers, len(batch["token_ids"]), (t.kl * r.mask).sum().item(), *t.mismatch, seconds,
         *rewards], dtype=torch.float64, device=stat_sums.device)])
    reduce = sum_over_ranks(ctx)
    total = (local if reduce is None else reduce(local)).tolist()
    stats, (tokens, answers, rows, kl_sum, mismatch, compared, seconds, *reward_sums) = (total[:len(STATS)],
                                                                                       total[len(STATS):])

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0  # an iteration without a single answer token reports zeros

    return {**{name: ratio(value, tokens) for name, value in zip(STATS, stats)},
            "kl": ratio(kl_sum, answers),  # per answer, summed over its tokens
            "answer_length": ratio(tokens, answers), "empty_answers": int(rows - answers),
            "logprob_mismatch": ratio(mismatch, compared), "sampler_logprobs": float(t.sampler), "steps": steps,
            "update_s": seconds / ctx.world_size,
            **{f"r_{k}": ratio(v, rows) for k, v in zip(("help", "safe", "combined"), reward_sums)}}


def export_policy(ctx: RankContext, directory: str) -> str:
    """The policy as a checkpoint folder (untied: the form vLLM reloads in place), written atomically."""
    return str(ctx.export(ctx.state["policy"], directory, tokenizer=ctx.state["tokenizer"], untie=True))


def save_ppo_state(ctx: RankContext, payload: tuple[str, dict[str, Any]]) -> None:
    """This rank's PPO state (policy and critic with their optimizers, sharded as they are; the running moments)
    under `directory`, with the driver's `loop` state: what a killed stage resumes from."""
    directory, loop = payload
    progress = {"run": STATE_RUN, "moments": ctx.state["moments"].state_dict(), "loop": loop}
    policy = ctx.state["policy_trainer"]
    save_train_state(policy, Path(directory) / "policy", policy.steps, progress)
    if "value_trainer" in ctx.state:
        value = ctx.state["value_trainer"]
        save_train_state(value, Path(directory) / "value", value.steps, {"run": STATE_RUN})


def load_ppo_state(ctx: RankContext, directory: str) -> dict[str, Any] | None:
    """The state `save_ppo_state` saved last, into the models `ppo_setup` just built; the driver's loop state, or
    None when nothing was saved."""
    progress = load_train_state(ctx.state["policy_trainer"], Path(directory) / "policy", STATE_RUN)
    if progress is None:
        return None
    ctx.state["moments"].load_state_dict(progress["moments"])
    if "value_trainer" in ctx.state and load_train_state(ctx.state["value_trainer"], Path(directory) / "value",
                                                         STATE_RUN) is None:
        raise RuntimeError(f"{directory}: the policy's PPO state was saved, the critic's is missing")
    return progress["loop"]
