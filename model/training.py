"""One way to train, used by every training loop (pretraining, SFT and its fine-tunes, reward models, PPO's policy
and critic): the model is wrapped for its ranks (DDP or FSDP2's `fully_shard`) and only then its optimizer built,
with mixed precision, activation checkpointing, gradient accumulation and optimizer offload as switches, and a
check that the first step moved every trainable parameter.

    trainer = Trainer(model, TrainSetup(world=2, strategy="fsdp", train=TrainConfig(precision="bf16")),
                      lr=1e-5, schedule=lambda opt: cosine_with_warmup(opt, steps, warmup))
    trainer.step([(micro_1, 0.5), (micro_2, 0.5)], lambda module, micro: loss_of(module, micro), "sft step 0")

Mixed precision as production trainers run it: the parameters the optimizer steps stay fp32 (the master copy,
whatever dtype the checkpoint was saved in; export writes the checkpoint's dtype back), the forward and backward
run in bf16 (FSDP's MixedPrecisionPolicy with fp32 gradient reduction, or autocast without FSDP).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from model.llama import PretrainedLlama
from model.optim import OptimConfig, adamw

PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """How a training stage runs on its ranks, nested as `train` in every training stage's config. The defaults
    are the CPU run's (fp32, everything in memory); the GPU recipes switch on what their memory plan needs."""

    precision: str = "fp32"  # fp32 | bf16 (compute in bf16 over fp32 master weights and optimizer state)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    # Rows (pairs for reward models, answers for PPO) per forward on one rank; the step accumulates the gradients
    # of batch / (micro_batch x ranks) of them. 0: the rank's whole share in one forward.
    micro_batch: int = 0
    offload_optimizer: bool = False  # FSDP only: the master weights and optimizer state on the host (CPU step)
    # Save the model, optimizer and progress every this many optimizer steps so a killed stage resumes there
    # (torch.distributed.checkpoint; model/sharded.py). 0: never. Not part of a stage's digest.
    save_every: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.precision not in PRECISIONS:
            errors.append(f"train.precision = {self.precision!r}: allowed: {', '.join(PRECISIONS)}")
        if self.micro_batch < 0:
            errors.append(f"train.micro_batch = {self.micro_batch}: must be >= 0 (0: no accumulation)")
        if self.save_every < 0:
            errors.append(f"train.save_every = {self.save_every}: must be >= 0 (0: never save a resumable state)")
        if errors:
            raise ValueError("\n".join(errors))

    def check_strategy(self, strategy: str, prefix: str) -> list[str]:
        """One line per switch this data-parallel strategy cannot serve (for a stage's own validation)."""
        if strategy not in STRATEGIES:
            return [f"{prefix}.parallel = {strategy!r}: allowed: {', '.join(STRATEGIES)}"]
        if self.offload_optimizer and strategy != "fsdp":
            return [f"{prefix}.train.offload_optimizer = true needs {prefix}.parallel = 'fsdp' (FSDP offloads the "
                    "sharded optimizer state; DDP keeps a replica on every device)"]
        return []


def split_batch(batch_size: int, micro_batch: int, world: int, what: str) -> tuple[int, int]:
    """(rows per forward on one rank, forwards per optimizer step): global batch = micro x accumulation x ranks.
    micro_batch 0 takes the rank's whole share in one forward."""
    if micro_batch == 0:
        if batch_size % world:
            raise ValueError(f"{what} = {batch_size} is not divisible by the world size {world}; set a micro "
                             "batch (train.micro_batch) that divides it per rank, or change the batch")
        return batch_size // world, 1
    if batch_size % (micro_batch * world):
        raise ValueError(f"{what} = {batch_size} is not micro_batch {micro_batch} x ranks {world} x a whole "
                         f"number of accumulation steps; choose a batch divisible by {micro_batch * world}")
    return micro_batch, batch_size // (micro_batch * world)


@dataclass
class TrainSetup:
    """Where a model trains: its ranks, how they share it, and the stage's switches."""

    world: int = 1
    strategy: str = "ddp"
    train: TrainConfig = field(default_factory=TrainConfig)
    device: torch.device | None = None  # None: this rank's GPU when there is one, else the CPU


def rank_device() -> torch.device:
    """This process's device: its current GPU (a trainer rank set it; Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def offloads(setup: TrainSetup, trainable: bool = True, offload: bool | None = None) -> bool:
    """Whether FSDP keeps a model's shards on the host: `offload`, by default the setup's offload_optimizer for a
    trainable model."""
    return setup.train.offload_optimizer and trainable if offload is None else offload


def wrap(model: PretrainedLlama, setup: TrainSetup, trainable: bool = True, offload: bool | None = None) -> nn.Module:
    """The module the forward runs on: bare in one process, DDP-wrapped, or sharded in place by FSDP2 (each decoder
    layer a unit, so only one layer's full weights exist at a time), with the setup's precision and offload.
    `trainable=False` (PPO's reference) is never DDP-wrapped (no gradients to average); `offload` (default: the
    setup's offload_optimizer on a trainable model) keeps FSDP's shards on the host between uses.
    A model already sharded (model/sharded.py `load_for_training`) is returned as it is; one on the meta device
    is sharded there, for its caller to materialise each rank's shards."""
    if is_sharded(model):
        return model
    config = setup.train
    if not is_meta(model):
        model.to(setup.device or rank_device())
    if config.activation_checkpointing and trainable:
        model.set_gradient_checkpointing(True)
    if setup.strategy == "fsdp" and setup.world > 1:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if config.precision == "bf16" else MixedPrecisionPolicy()
        offload = offloads(setup, trainable, offload)
        if offload and not torch.cuda.is_available():
            raise RuntimeError("FSDP offload (train.offload_optimizer, ppo.offload_reference) needs a GPU: it moves "
                               "shards between the host and an accelerator, and on CPU they are on the host already")
        policy = CPUOffloadPolicy() if offload else OffloadPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp, offload_policy=policy)
        fully_shard(model, mp_policy=mp, offload_policy=policy)
        return model
    if setup.world > 1 and trainable:
        return nn.parallel.DistributedDataParallel(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def compute_precision(module: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The forward's precision context: autocast to bf16 where FSDP does not already cast the parameters."""
    if precision == "bf16" and not is_sharded(module):
        device = next(module.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reduced(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`tensor` reduced over the torch.distributed group (on the device the backend needs, returned on the tensor's
    own); as it is in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    out = tensor.to(rank_device() if dist.get_backend() == "nccl" else tensor.device, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(tensor.device)


def ranks_agree(ok: bool) -> bool:
    """True when `ok` holds on every rank of the group (one all-reduce; in one process, `ok`)."""
    return bool(reduced(torch.tensor([float(ok)]), dist.ReduceOp.MIN).item())


Micro = TypeVar("Micro")


class Trainer:
    """A model wrapped for its ranks with its optimizer and schedule, built in that order (an optimizer built before
    `fully_shard` would step tensors the model no longer uses). `module` is what the forward runs on, `model` the
    inner PretrainedLlama (export, evaluation). A model model/sharded.py `load_for_training` already sharded (in
    fp32) is used as it is: only its optimizer is built here."""

    def __init__(self, model: PretrainedLlama, setup: TrainSetup, lr: float, optim: OptimConfig | None = None,
                 schedule: Callable[[torch.optim.Optimizer], Any] | None = None):
        self.model, self.setup = model, setup
        self.optim = optim or OptimConfig()
        # The optimizer's copy is fp32 whatever the checkpoint's dtype: bf16 weights round away most small updates.
        if not is_sharded(model):
            model.float()
        self.module = wrap(model, setup)
        self.optimizer = adamw(model, lr, self.optim)
        self.schedule = (schedule or constant)(self.optimizer)
        self.steps = 0
        self._before: dict[str, torch.Tensor] | None = None  # fingerprints until the first step is checked

    def precision(self) -> contextlib.AbstractContextManager:
        return compute_precision(self.module, self.setup.train.precision)

    def step(self, micro_batches: Sequence[tuple[Micro, float]], loss_of: Callable[[nn.Module, Micro], torch.Tensor],
             where: str) -> float:
        """One optimizer step over `(micro-batch, weight)` pairs: the gradient of sum(weight x loss_of(module,
        micro)), accumulated micro-batch by micro-batch (DDP reduces on the last only); returns that weighted loss.

        A non-finite loss or gradient norm stops training before it corrupts the weights (FloatingPointError naming
        `where`); the ranks agree first, so all of them stop at the same step instead of one waiting in the next
        collective until the group's timeout. The first step with a gradient is checked to have moved every
        trainable parameter (RuntimeError naming the first that did not).
        """
        total = 0.0
        for i, (micro, weight) in enumerate(micro_batches):
            with self.accumulating(last=i == len(micro_batches) - 1):
                with self.precision():
                    loss = loss_of(self.module, micro)
                self.backward(loss, weight, where)
            total += float(loss.detach()) * weight
        self.apply(where, total)
        return total

    def backward(self, loss: torch.Tensor, weight: float, where: str) -> None:
        """Backward of weight x loss, once every rank has a finite loss (FloatingPointError naming `where`)."""
        if self._before is None and self.steps == 0:
            self._before = fingerprints(self.model)
        if not ranks_agree(bool(torch.isfinite(loss.detach()).all())):
            here = loss.item()
            what = f"loss is {here}" if not math.isfinite(here) else \
                f"loss is not finite on another rank (here {here:.4g})"
            raise FloatingPointError(f"{where}: {what}; stopping before the weights are corrupted")
        (loss * weight).backward()

    def apply(self, where: str, loss: float = float("nan")) -> None:
        """Clip, step, schedule, zero the gradients backward accumulated; a non-finite gradient norm stops first."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        if not math.isfinite(norm):
            raise FloatingPointError(f"{where}: gradient norm is {norm} (loss {loss:.4g}); stopping before the "
                                     "weights are corrupted")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (the schedule moves it next)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self._before is not None and norm > 0:
            check_moved(self.model, self._before, where, lr)
            self._before = None

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP all-reduces gradients on the last micro-batch only;
        FSDP reduce-scatters each (its shards are summed in place, so skipping would keep unsharded gradients
        alive)."""
        if isinstance(self.module, nn.parallel.DistributedDataParallel) and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()


def constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def fingerprints(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per trainable parameter (this rank's shard), its sum and sum of squares in float64: any AdamW step changes
    them, and they cost two numbers per tensor instead of a copy of the model."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                local = _local(p).detach().double()
                out[name] = torch.stack([local.sum(), (local * local).sum()]).cpu()
    return out


def check_moved(model: nn.Module, before: dict[str, torch.Tensor], where: str, lr: float) -> None:
    """RuntimeError naming the first trainable parameter that no rank's shard of moved in the step just taken."""
    after = fingerprints(model)
    still = [name for name, value in before.items() if torch.equal(value, after[name])]
    # FSDP: a rank's shard may be all padding, so a parameter moved if any rank's shard did
    moved = reduced(torch.tensor([float(name not in still) for name in before]), dist.ReduceOp.MAX)
    stuck = [name for name, m in zip(before, moved.tolist()) if not m]
    if stuck:
        raise RuntimeError(f"{where}: the optimizer step left {len(stuck)} of {len(before)} trainable parameters "
                           f"unchanged, first '{stuck[0]}' (an optimizer built before the model was wrapped or "
                           "sharded steps tensors the model no longer uses; or a learning rate at this step, "
                           f"{lr:.3g}, too small to change fp32 weights)")


def micro_split(rows: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, bool]]:
    """A rank's rows of one step in `parts` micro-batches (`split_batch`'s accumulation), the same count on every
    rank whatever its share (FSDP gathers the weights in every forward, so the ranks' forwards must pair up); a
    micro-batch left empty holds the first row as a placeholder that must weigh nothing (False)."""
    return [(part, True) if len(part) else (rows[:1], False) for part in rows.tensor_split(parts)]
