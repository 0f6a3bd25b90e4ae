"""A plain torch training loop for causal LMs on packed rows (pretraining, SFT-style fine-tuning).

Single process; the trainer actors run the same step inside a torch.distributed group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from model.llama import LlamaForCausalLM
from model.losses import masked_lm_loss
from model.optim import OptimConfig, adamw, cosine_with_warmup
from model.packing import PackedRows


@dataclass
class LMTrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0


@dataclass
class LMTrainResult:
    steps: int
    tokens: int  # trained (loss-bearing) tokens seen
    seconds: float
    first_loss: float
    last_loss: float  # mean of the last 10% of steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def forward_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device  # rows are built on the CPU; a trainer rank may hold a GPU
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], document_ids=batch["document_ids"])
    return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"], batch["document_ids"])


def shuffled_batches(packed: PackedRows, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless epochs over the rows, reshuffled each epoch; a final partial batch is kept, not dropped."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(packed), generator=generator)
        for start in range(0, len(order), batch_size):
            yield packed.batch(order[start:start + batch_size])


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, grad_clip: float, where: str) -> None:
    """Backward, clip, step, schedule; a non-finite loss or gradient norm stops training before it corrupts the
    weights (FloatingPointError naming `where`).

    In a torch.distributed group the ranks agree first (one all-reduce of a flag), so all of them stop at the same
    step: a rank that went on alone would wait in the next collective until the group's timeout. The gradient
    norm is the same on every rank (DDP averages the gradients; FSDP's norm is global).
    """
    finite = torch.isfinite(loss.detach()).reshape(1).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        here = loss.item()
        what = f"loss is {here}" if not math.isfinite(here) else f"loss is not finite on another rank (here {here:.4g})"
        raise FloatingPointError(f"{where}: {what}; stopping before the weights are corrupted")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if not math.isfinite(norm):
        raise FloatingPointError(f"{where}: gradient norm is {norm} (loss {loss.item():.4g}); stopping before the "
                                 "weights are corrupted")
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def default_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, mininterval=2.0)


def train_lm(model: LlamaForCausalLM, packed: PackedRows, config: LMTrainConfig, desc: str = "train",
             on_step: Callable[[int, float], None] | None = None,
             progress: Callable[[int, str], Any] = default_bar) -> LMTrainResult:
    """`config.steps` optimizer steps; `progress(total, desc)` makes the progress bar (update,
    set_description, close), so callers in Ray actors can pass one the driver draws."""
    optimizer = adamw(model, config.lr, config.optim)
    schedule = cosine_with_warmup(optimizer, config.steps, config.warmup_steps, config.min_lr_ratio)
    batches = shuffled_batches(packed, config.batch_size, config.seed)
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = progress(config.steps, desc)
    for step in range(config.steps):
        batch = next(batches)
        loss = forward_loss(model, batch)
        optimizer_step(model, loss, optimizer, schedule, config.optim.grad_clip, f"{desc} step {step}")
        losses.append(loss.item())
        tokens += int(batch["loss_mask"].sum())
        bar.update(1)
        if step % 10 == 0:
            bar.set_description(f"{desc} loss {losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return LMTrainResult(config.steps, tokens, time.perf_counter() - start, losses[0], sum(tail) / len(tail))


@torch.no_grad()
def evaluate_lm(model: LlamaForCausalLM, packed: PackedRows, batch_size: int = 16) -> tuple[float, float]:
    """(mean loss per trained token, perplexity) over all rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(packed), batch_size):
        batch = packed.batch(slice(start, start + batch_size))
        weights = batch["loss_mask"][:, 1:] * (batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])
        n = float(weights.sum())
        if n:
            total += forward_loss(model, batch).item() * n
            count += n
    model.train(was_training)
    mean = total / count if count else float("nan")
    return mean, math.exp(mean)
