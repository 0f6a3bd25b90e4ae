"""Pretraining of the tiny base models on the world's corpus (round 0, cached in the run store; a base shipped with the
world for the same corpus and recipe stands in for it, pipeline/stages/pretrain_shipped.py).

The corpus mixes good and bad behaviour on purpose: the base models it makes are unaligned, which is what SFT
and RLHF then fix. A SentencePiece BPE tokenizer (LLaMA-2's settings) is trained on the training documents; the
held-out documents (chosen by a hash of their text, so the split never depends on row order) give perplexity.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from actors.vllm_engine import check_head_dim
from model.config import ModelConfig
from model.lm_training import LMTrainConfig, evaluate_lm, train_lm
from model.optim import OptimConfig
from model.llama import LlamaForCausalLM
from model.distributed import rank_and_world, save_on_rank0
from model.packing import PackedRows, pack, split_long
from model.training import TrainConfig, TrainSetup, split_batch
from model.tokenizer import SentencePieceTokenizer, Tokenizer
from pipeline.cluster.pools import Runner, in_process
from pipeline.data.store import RunStore, digest_config
from pipeline.output.progress import progress_bar
from pipeline.stages.cached import training_recipe
from pipeline.stages.pretrain_shipped import SHIPPED_BASES, copy_shipped, find_shipped
from pipeline.stages.sft.algorithm import shard_rows


@dataclass
class ModelSize:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int  # pretraining steps for this size

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sizes[{self.name}].{name} = {getattr(self, name)}: must be > 0")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"sizes[{self.name}]: num_attention_heads must divide hidden_size and "
                             "num_key_value_heads must divide num_attention_heads")


# About 0.9M and 4.7M parameters with a 1k vocabulary: sized to pretrain in minutes on 2 cores (docs/results.md,
# "Measurements behind defaults").
SMALL = ModelSize("small", 128, 352, 4, 4, 2, steps=600)
LARGE = ModelSize("large", 256, 704, 6, 8, 4, steps=400)


@dataclass
class PretrainConfig:
    sizes: list[ModelSize] = field(default_factory=lambda: [SMALL, LARGE])
    vocab_size: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # precision, checkpointing, micro-batch
    heldout_share: float = 0.05
    seed: int = 0
    # Take the base shipped with the world when one was pretrained on this corpus with this recipe
    # (pipeline/stages/pretrain_shipped.py); false pretrains from scratch. Not part of the recipe's digest.
    shipped: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"lr = {self.lr}, warmup_steps = {self.warmup_steps}: "
                             "lr must be > 0 and warmup_steps >= 0")
        if not 0 < self.heldout_share < 1:
            raise ValueError(f"heldout_share = {self.heldout_share}: must be in (0, 1)")
        if self.train.offload_optimizer:
            raise ValueError("pretrain.train.offload_optimizer = true: pretraining's tiny models train with DDP, "
                             "which keeps no sharded optimizer state to offload")
        names = [s.name for s in self.sizes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sizes: need at least one size and unique names, got {names}")
        for size in self.sizes:  # fail before hours of training, not when vLLM first samples the model
            check_head_dim(size.hidden_size // size.num_attention_heads, f"sizes[{size.name}]")


@dataclass
class PretrainedModel:
    size: str
    checkpoint: Path
    parameters: int
    steps: int
    train_tokens: int
    seconds: float
    tokens_per_second: float
    train_loss: float
    heldout_loss: float
    heldout_perplexity: float


def is_heldout(text: str, share: float) -> bool:
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return digest / 2**64 < share


def encode_documents(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> PackedRows:
    """Each document as [bos] text [eos], cut to seq_len pieces, packed; every token is trained on."""
    pieces = [piece for text in texts
              for piece in split_long([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], seq_len)]
    return pack([(p, [1] * len(p)) for p in pieces], seq_len, tokenizer.pad_id)


def model_config(size: ModelSize, tokenizer: Tokenizer, seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=size.hidden_size,
                       intermediate_size=size.intermediate_size, num_hidden_layers=size.num_hidden_layers,
                       num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_key_value_heads,
                       max_position_embeddings=seq_len, tie_word_embeddings=True, bos_token_id=tokenizer.bos_id,
                       eos_token_id=tokenizer.eos_id)


def pretrain(texts: list[str], out_dir: Path, config: PretrainConfig) -> list[PretrainedModel]:
    """Train the tokenizer and every configured size; checkpoints go to out_dir/<size>/ (HF folders).

    Runs in one process or on every rank of the trainer group: each rank trains the same tokenizer (SentencePiece
    on one thread is deterministic), takes its share of the packed rows, and DDP averages the gradients.
    """
    rank, world = rank_and_world()
    train_texts = [t for t in texts if not is_heldout(t, config.heldout_share)]
    heldout_texts = [t for t in texts if is_heldout(t, config.heldout_share)]
    if not train_texts or not heldout_texts:
        raise ValueError(f"pretraining corpus of {len(texts)} documents is too small to hold out "
                         f"{config.heldout_share:.0%} of it")
    tokenizer = SentencePieceTokenizer.train(train_texts, vocab_size=config.vocab_size)
    train_rows = shard_rows(encode_documents(tokenizer, train_texts, config.seq_len), rank, world)
    heldout_rows = encode_documents(tokenizer, heldout_texts, config.seq_len)

    results = []
    for index, size in enumerate(config.sizes):
        torch.manual_seed(config.seed + index)
        model = LlamaForCausalLM(model_config(size, tokenizer, config.seq_len))
        model.init_weights(config.seed + index)
        micro, accumulation = split_batch(config.batch_size, config.train.micro_batch, world, "pretrain.batch_size")
        train = train_lm(model, train_rows,
                         LMTrainConfig(steps=size.steps, batch_size=micro * accumulation, lr=config.lr,
                                       warmup_steps=config.warmup_steps, optim=config.optim,
                                       seed=config.seed + index, accumulation=accumulation),
                         TrainSetup(world, "ddp", config.train), desc=f"pretrain {size.name}", progress=progress_bar)
        heldout_loss, perplexity = evaluate_lm(model, heldout_rows)
        folder = out_dir / size.name
        save_on_rank0(model, folder, tokenizer)
        results.append(PretrainedModel(size.name, folder, model.num_parameters, size.steps, train.tokens * world,
                                       train.seconds, train.tokens_per_second * world, train.last_loss,
                                       heldout_loss, perplexity))
    return results


def pretrain_digest(config: PretrainConfig) -> str:
    """The recipe's digest: the whole config but whether a shipped base may stand in for it."""
    recipe = training_recipe(config)
    del recipe["shipped"]
    return digest_config(recipe)


def located(stage_path: Path, models: list[dict]) -> list[PretrainedModel]:
    """The stage manifest's models, their checkpoints under `stage_path`: the manifest keeps them relative, so a run
    store can be moved or copied."""
    return [PretrainedModel(**{**m, "checkpoint": stage_path / m["checkpoint"]}) for m in models]


def run_pretrain(store: RunStore, corpus: pa.Table, corpus_digest: str, config: PretrainConfig,
                 runner: Runner = in_process, shipped: Path = SHIPPED_BASES) -> tuple[list[PretrainedModel], str]:
    """The stage: pretrained models, and where they came from: "cached" (this store), "shipped" (a base in
    `shipped` pretrained on this corpus with this recipe, copied into the store) or "trained" now.
    `runner` runs the training (the trainer group's `Pools.train` in the driver)."""
    stage = store.stage(0, "pretrain")
    inputs = {"corpus": corpus_digest}
    config_digest = pretrain_digest(config)
    if stage.is_complete(inputs, config_digest):
        cached = located(stage.path, stage.manifest()["extra"]["models"])
        if all((m.checkpoint / "config.json").is_file() for m in cached):
            return cached, "cached"
    stage.begin(inputs, config_digest)
    texts = corpus.column("text").to_pylist()
    base = find_shipped(shipped, texts, config_digest) if config.shipped else None
    if base is not None:
        models = copy_shipped(base, stage.path / "checkpoints")
    else:
        results = runner(pretrain, texts, stage.path / "checkpoints", config)
        models = [{**asdict(r), "checkpoint": str(r.checkpoint.relative_to(stage.path))} for r in results]
    source = "trained" if base is None else "shipped"
    stage.finish(None, inputs, config_digest, checkpoint="checkpoints", extra={"models": models, "source": source})
    return located(stage.path, models), source
