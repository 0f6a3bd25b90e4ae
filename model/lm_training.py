"""A plain torch training loop for causal LMs on packed rows (pretraining, SFT-style fine-tuning).

One process, or every rank of a torch.distributed group (the trainer actors) through model.training's Trainer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from model.llama import LlamaForCausalLM
from model.losses import masked_lm_loss
from model.optim import OptimConfig, cosine_with_warmup
from model.packing import PackedRows
from model.sharded import resumed_progress, save_train_state, saves_after, state_digest
from model.training import Trainer, TrainSetup, micro_split


@dataclass
class LMTrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    accumulation: int = 1  # micro-batches per step (model.training.split_batch)


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


def default_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, mininterval=2.0)


def micro_batches(batch: dict[str, torch.Tensor], parts: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """A step's rows as `parts` (micro-batch, weight) with weights their share of the step's trained tokens, so the
    accumulated gradient is the gradient of the whole batch's mean loss."""
    split = micro_split(torch.arange(len(batch["input_ids"])), parts)
    parts = [{k: v[rows] for k, v in batch.items()} for rows, _ in split]
    counts = [float(trained_tokens(part)) * real for part, (_, real) in zip(parts, split)]
    total = sum(counts) or 1.0
    return [(part, count / total) for part, count in zip(parts, counts)]


def trained_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens masked_lm_loss averages over: loss-bearing, and not the first of a packed document."""
    weights = batch["loss_mask"][:, 1:] * (batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])
    return weights.sum()


def train_lm(model: LlamaForCausalLM, packed: PackedRows, config: LMTrainConfig, setup: TrainSetup | None = None,
             desc: str = "train", on_step: Callable[[int, float], None] | None = None,
             progress: Callable[[int, str], Any] = default_bar, state_dir: str | Path | None = None) -> LMTrainResult:
    """`config.steps` optimizer steps of `config.batch_size` rows on this rank, in `config.accumulation` forwards
    (`setup`: its ranks and switches; one process in fp32 by default); `progress(total, desc)` makes the progress
    bar (update, set_description, close), so callers in Ray actors can pass one the driver draws.

    `state_dir`: where the run saves its state every `setup.train.save_every` steps (model/sharded.py) and, when a
    save of this same run is there (same config, ranks and rows), resumes from it, skipping the batches it
    trained: the result and the weights are those of a run never interrupted. Every rank passes the same folder.
    """
    setup = setup or TrainSetup()
    trainer = Trainer(model, setup, config.lr, config.optim,
                      lambda opt: cosine_with_warmup(opt, config.steps, config.warmup_steps, config.min_lr_ratio))
    run = run_digest(packed, config, setup) if state_dir is not None else ""
    batches = shuffled_batches(packed, config.batch_size, config.seed)
    resumed = resumed_progress(trainer, state_dir, run, batches, {"losses": [], "tokens": 0})
    done = resumed["step"]
    model.train()
    losses: list[float] = resumed["losses"]
    tokens = resumed["tokens"]
    start = time.perf_counter()
    bar = progress(config.steps, desc)
    bar.update(done)
    for step in range(done, config.steps):
        batch = next(batches)
        losses.append(trainer.step(micro_batches(batch, config.accumulation), forward_loss, f"{desc} step {step}"))
        tokens += int(batch["loss_mask"].sum())
        bar.update(1)
        if step % 10 == 0:
            bar.set_description(f"{desc} loss {losses[-1]:.3f}")
        if saves_after(step + 1, config.steps, setup.train.save_every, state_dir):
            save_train_state(trainer, state_dir, step + 1, {"run": run, "losses": losses, "tokens": tokens})
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return LMTrainResult(config.steps, tokens, time.perf_counter() - start, losses[0], sum(tail) / len(tail))


def run_digest(packed: PackedRows, config: LMTrainConfig, setup: TrainSetup) -> str:
    """What a saved state must have been trained with to be resumed (model.sharded.state_digest): the loop's config
    and this rank's rows."""
    return state_digest({"config": dataclasses.asdict(config)},
                        (packed.input_ids, packed.loss_mask, packed.document_ids, packed.attention_mask), setup)


@torch.no_grad()
def evaluate_lm(model: LlamaForCausalLM, packed: PackedRows, batch_size: int = 16) -> tuple[float, float]:
    """(mean loss per trained token, perplexity) over all rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(packed), batch_size):
        batch = packed.batch(slice(start, start + batch_size))
        n = float(trained_tokens(batch))
        if n:
            total += forward_loss(model, batch).item() * n
            count += n
    model.train(was_training)
    mean = total / count if count else float("nan")
    return mean, math.exp(mean)
