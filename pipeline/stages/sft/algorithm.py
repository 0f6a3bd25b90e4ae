"""Supervised fine-tuning (docs/paper.md, "SFT"): demonstrations in the chat format (LLaMA-2's or the checkpoint's own),
packed into fixed-length rows, loss on answer tokens only, cosine schedule with warm-up, AdamW.

`train_sft` is a pure, picklable, top-level function: it runs in one process, and unchanged on every rank of a
torch.distributed group (the trainer pool), where each rank trains on its share of the packed rows inside
DistributedDataParallel and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from model.chat_template import encode_chat
from model.distributed import rank_and_world, save_on_rank0
from model.lm_training import LMTrainConfig, train_lm
from model.optim import OptimConfig
from model.packing import Example, PackedRows, pack
from model.sharded import load_for_training, remove_train_state
from model.training import TrainConfig, TrainSetup, split_batch
from model.tokenizer import Tokenizer, load_tokenizer
from pipeline.output.progress import progress_bar
from pipeline.stages.cached import train_state_dir


@dataclass
class SFTConfig:
    """Defaults are the paper's (docs/paper.md, "SFT"); the tiny world's are in conf/experiment/tiny-full.yaml."""

    lr: float = 2e-5
    epochs: int = 2
    batch_size: int = 64  # packed rows per optimizer step, over all ranks
    seq_len: int = 4096
    # Not in the paper (it says "cosine" only): a short linear warm-up and a floor at 10% of the peak, as the
    # paper's reward models use.
    warmup_share: float = 0.03
    min_lr_ratio: float = 0.1
    optim: OptimConfig = field(default_factory=OptimConfig)  # grad_clip is not in the paper for SFT: pretraining's
    parallel: str = "ddp"  # over the trainer ranks: "ddp" (replicas) or "fsdp" (sharded; large policies)
    train: TrainConfig = field(default_factory=TrainConfig)  # precision, checkpointing, micro-batch, offload
    seed: int = 0

    def __post_init__(self) -> None:
        errors = check_positive(self, "sft", ("lr", "epochs", "batch_size", "seq_len"))
        errors += check_ratio(self, "sft", ("warmup_share", "min_lr_ratio"))
        errors += check_parallel(self, "sft")
        if errors:
            raise ValueError("\n".join(errors))


def check_positive(config: Any, prefix: str, names: tuple[str, ...]) -> list[str]:
    """One line per field that is not > 0."""
    return [f"{prefix}.{n} = {getattr(config, n)}: must be > 0" for n in names if not getattr(config, n) > 0]


def check_parallel(config: Any, prefix: str) -> list[str]:
    """The data-parallel strategy and what its `train` switches need of it."""
    return config.train.check_strategy(config.parallel, prefix)


def check_ratio(config: Any, prefix: str, names: tuple[str, ...]) -> list[str]:
    """One line per field outside [0, 1]."""
    return [f"{prefix}.{n} = {getattr(config, n)}: must be in [0, 1]" for n in names
            if not 0 <= getattr(config, n) <= 1]


# --- data ---------------------------------------------------------------------------------------------------

def with_mix(demonstrations: pa.Table, mix: tuple[pa.Table, str] | None) -> pa.Table:
    """`demonstrations` with the table of `mix` (DEMONSTRATIONS, its digest) appended: the stages that fine-tune
    on a narrow set (GAtt, context distillation) mix in the round's kept rejection-sampling answers, as the paper
    mixes GAtt data into its fine-tuning data, so the policy keeps its other behaviour."""
    return pa.concat_tables([demonstrations, mix[0].cast(demonstrations.schema)]) if mix else demonstrations


# What fine-tuning reads of a DEMONSTRATIONS table (tests/test_oracle_isolation.py).
SFT_COLUMNS = ("id", "messages")


def sft_examples(demonstrations: pa.Table, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    """(token ids, loss mask) per demonstration in the chat format; the mask is 1 on answer tokens only.

    Every assistant turn of a multi-turn demonstration is trained on (mode "all"); user turns and the system
    prompt never are.
    """
    examples: list[Example] = []
    for row_id, messages in zip(demonstrations.column("id").to_pylist(),
                                demonstrations.column("messages").to_pylist()):
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"demonstration {row_id}: must end with an assistant turn (nothing to train on)")
        chat = encode_chat(tokenizer, messages, mode="all")
        if len(chat.input_ids) > seq_len:
            raise ValueError(f"demonstration {row_id}: {len(chat.input_ids)} tokens, longer than seq_len="
                             f"{seq_len}; validation should have rejected it")
        examples.append((chat.input_ids, chat.loss_mask))
    return examples


def shard_rows(packed: PackedRows, rank: int, world: int) -> PackedRows:
    """Every world-th row from `rank`: the ranks' shares differ by one row at most."""
    if len(packed) < world:
        raise ValueError(f"{len(packed)} packed rows for {world} rank(s): need at least one per rank")
    rows = torch.arange(rank, len(packed), world)
    return PackedRows(**packed.batch(rows))


# --- training -----------------------------------------------------------------------------------------------

def train_sft(base_checkpoint: str | Path, demonstrations: pa.Table, out_dir: str | Path,
              config: SFTConfig, examples: Callable[[pa.Table, Tokenizer, int], list[Example]] = sft_examples
              ) -> dict[str, Any]:
    """Fine-tune the causal LM in `base_checkpoint` on `demonstrations` (a DEMONSTRATIONS table) and save it
    with its tokenizer to `out_dir`. Returns this rank's metrics (plain data, ready for a manifest).

    On N ranks each rank averages the loss over its own answer tokens and the ranks' gradients are averaged (DDP,
    or FSDP's reduce-scatter).
    `examples` encodes the demonstrations: every answer trained (default), or e.g. GAtt's last answer only.
    With `train.save_every`, the run saves its state beside `out_dir` (pipeline.stages.cached.train_state_dir)
    and a re-run resumes from it; the state goes once the checkpoint is written.
    """
    rank, world = rank_and_world()
    demonstrations = demonstrations.select(list(SFT_COLUMNS))  # the oracle's fields (`meta`) stay behind
    tokenizer = load_tokenizer(base_checkpoint)
    setup = TrainSetup(world, config.parallel, config.train)
    model = load_for_training(base_checkpoint, setup)  # FSDP: each rank reads its own shards only
    if config.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"sft.seq_len = {config.seq_len}: longer than the model's context "
                         f"({model.config.max_position_embeddings} positions)")
    packed = pack(examples(demonstrations, tokenizer, config.seq_len), config.seq_len, tokenizer.pad_id)
    # Steps come from the global row count, so every rank takes the same number of optimizer steps.
    steps = config.epochs * math.ceil(len(packed) / config.batch_size)
    micro, accumulation = split_batch(config.batch_size, config.train.micro_batch, world, "sft.batch_size")
    train = LMTrainConfig(steps=steps, batch_size=micro * accumulation, lr=config.lr,
                          warmup_steps=round(config.warmup_share * steps), min_lr_ratio=config.min_lr_ratio,
                          optim=config.optim, seed=config.seed, accumulation=accumulation)
    state_dir = train_state_dir(out_dir)
    result = train_lm(model, shard_rows(packed, rank, world), train, setup, desc="sft", progress=progress_bar,
                      state_dir=state_dir)
    save_on_rank0(model, out_dir, tokenizer)
    remove_train_state(state_dir)
    return {"examples": demonstrations.num_rows, "packed_rows": len(packed), "fill": packed.fill,
            "epochs": config.epochs, "steps": result.steps, "warmup_steps": train.warmup_steps,
            "world_size": world, "first_loss": result.first_loss, "last_loss": result.last_loss,
            "answer_tokens": result.tokens, "seconds": result.seconds,
            "answer_tokens_per_second": result.tokens_per_second}
