"""Reward models (docs/paper.md, "Reward models"): the helpfulness and safety data mixes, a held-out split per weekly
batch, training with the margin ranking loss, and accuracy by preference rating in the paper's Table 8 layout.

`train_reward_model` is a pure, picklable, top-level function: it runs in one process, and unchanged on every rank
of a torch.distributed group (the trainer pool), each rank scoring its share of every batch of pairs inside
DistributedDataParallel; rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.chat_template import encode_chat
from model.distributed import rank_and_world, save_on_rank0
from model.checkpoint import load_checkpoint
from model.sharded import (load_for_training, remove_train_state, resumed_progress, save_train_state, saves_after,
                           state_digest)
from model.llama import LlamaForReward
from model.losses import MARGINS, margin_ranking_loss
from model.optim import OptimConfig, cosine_with_warmup, warmup_steps_for
from model.packing import pad_pairs, shared_prefix_rows
from model.training import TrainConfig, Trainer, TrainSetup, micro_split, reduced, split_batch
from model.tokenizer import Tokenizer, load_tokenizer
from pipeline.data.schemas import PREFERENCES, RATINGS
from pipeline.evaluation.rm_tables import COLUMNS
from pipeline.output.progress import progress_bar
from pipeline.stages.cached import train_state_dir
from pipeline.stages.sft.algorithm import check_parallel, check_positive, check_ratio

RMKind = Literal["helpfulness", "safety"]
Pair = tuple[list[int], list[int]]  # (chosen ids, rejected ids)

# Table 8's columns: "negligibly better" and "unsure" share the last one, as they share a margin.
COLUMN_OF_RATING = {"significantly_better": COLUMNS[0], "better": COLUMNS[1], "slightly_better": COLUMNS[2],
                    "negligibly_better": COLUMNS[3], "unsure": COLUMNS[3]}


@dataclass
class RMConfig:
    """Defaults are the paper's for 7B (docs/paper.md, "Reward models"; 70B halves `lr`); the tiny world's are in
    conf/experiment/tiny-full.yaml."""

    # Margin table by rating; a non-null `margin` column in the pairs overrides it row by row. "small" is the
    # best average of the paper's margin ablation (Table 28).
    margin: str = "small"  # "none" | "small" | "large" (a plain str: Hydra schemas cannot hold Literal)
    lr: float = 1e-5
    batch_size: int = 512  # pairs per optimizer step, over all ranks (2x rows)
    epochs: int = 1
    warmup_share: float = 0.03
    warmup_min_steps: int = 5
    min_lr_ratio: float = 0.1
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Held out per weekly batch: `heldout_pairs` (a count) when set, else `heldout_share` of the batch.
    heldout_share: float = 0.1
    heldout_pairs: int | None = 1000
    # Not in the paper: how big the sampled "equal parts" of safety and open-source pairs are in the helpfulness
    # mix. Read here as "as many again as the helpfulness pairs, half from each source".
    helpfulness_other_ratio: float = 1.0
    safety_helpful_share: float = 0.1  # the paper's 90/10 safety/helpfulness mix
    # > 1: batches of similar length, drawn from windows of this many batches (see index_batches); 0: a plain
    # shuffle. Not in the paper: a speed-up for data whose pair lengths vary widely (user files).
    group_by_length: int = 0
    parallel: str = "ddp"  # over the trainer ranks: "ddp" (replicas) or "fsdp" (sharded; large models)
    train: TrainConfig = field(default_factory=TrainConfig)  # precision, checkpointing, micro-batch (pairs), offload
    # > 0: train only the top this many decoder layers and the head (the embeddings and lower layers frozen); 0:
    # all. Not in the paper: a pretrained start (SmolLM2) on 2 CPU cores trains in a fraction of the time and
    # memory (docs/results.md, "SmolLM2 on the world").
    trainable_layers: int = 0
    # Both answers of a pair in one row after their prompt, so the prompt's forward and backward pass is paid once:
    # the same loss, fewer tokens where prompts are long. Not in the paper (docs/results.md, "SmolLM2 on the world").
    share_prompt: bool = False
    # Ratings left out of training (held-out tests keep every rating, so Table 8 stays whole). Not in the paper:
    # where the annotator's "negligibly better" and "unsure" pairs are mostly ties it broke at random, they cost
    # training time and teach nothing (docs/results.md, "SmolLM2 on the world").
    skip_ratings: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        errors = check_positive(self, "rm", ("lr", "batch_size", "epochs"))
        errors += check_ratio(self, "rm", ("warmup_share", "min_lr_ratio"))
        errors += check_parallel(self, "rm")
        errors += [f"rm.{name} = {getattr(self, name)}: must be >= 0" for name in
                   ("warmup_min_steps", "helpfulness_other_ratio", "trainable_layers")
                   if getattr(self, name) < 0]
        if self.margin not in MARGINS:
            errors.append(f"rm.margin = {self.margin!r}: allowed: {', '.join(MARGINS)}")
        if not 0 < self.heldout_share < 1:
            errors.append(f"rm.heldout_share = {self.heldout_share}: must be in (0, 1)")
        if self.heldout_pairs is not None and self.heldout_pairs < 0:
            errors.append(f"rm.heldout_pairs = {self.heldout_pairs}: must be >= 0 (or null to use the share)")
        if not 0 <= self.safety_helpful_share < 1:
            errors.append(f"rm.safety_helpful_share = {self.safety_helpful_share}: must be in [0, 1)")
        errors += [f"rm.skip_ratings: {r!r} is not a rating; allowed: {', '.join(RATINGS)}"
                   for r in self.skip_ratings if r not in RATINGS]
        if self.group_by_length < 0:
            errors.append(f"rm.group_by_length = {self.group_by_length}: must be >= 0 (0: a plain shuffle)")
        if errors:
            raise ValueError("\n".join(errors))


# --- data: held-out split and mixes -------------------------------------------------------------------------

def id_rank(ids: Sequence[str], salt: str) -> list[int]:
    """Row indices ordered by a hash of (salt, id): a deterministic draw that ignores row order."""
    keys = [hashlib.sha256(f"{salt}:{i}".encode()).digest() for i in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def sample_pairs(pairs: pa.Table, n: int, seed: int, salt: str) -> pa.Table:
    """`n` rows (all when there are fewer) drawn by id hash, kept in their original order."""
    chosen = sorted(id_rank(pairs.column("id").to_pylist(), f"{salt}:{seed}")[:n])
    return pairs.take(pa.array(chosen, pa.int64()))  # typed: an empty draw is a valid take


def split_heldout(preferences: pa.Table, share: float = 0.1,
                  count: int | None = None) -> tuple[pa.Table, pa.Table]:
    """(train, held out): per weekly batch, `count` pairs (or `share` of them) chosen by a hash of their id.

    The draw has no seed on purpose: every reward model of a run, whatever its config, is tested on the same
    pairs, so their accuracies compare.
    """
    ids = preferences.column("id").to_pylist()
    by_batch: dict[int, list[int]] = defaultdict(list)
    for row, batch in enumerate(preferences.column("batch").to_pylist()):
        by_batch[batch].append(row)
    held: set[int] = set()
    for rows in by_batch.values():
        k = count if count is not None else round(share * len(rows))
        held.update(rows[j] for j in id_rank([ids[i] for i in rows], "heldout")[:k])
    mask = pa.array([row in held for row in range(len(ids))], pa.bool_())
    return preferences.filter(pc.invert(mask)), preferences.filter(mask)


def of_kind(pairs: pa.Table, kind: str) -> pa.Table:
    return pairs.filter(pc.equal(pairs["kind"], kind))


def without_unsafe_chosen(pairs: pa.Table) -> pa.Table:
    """Drop pairs whose chosen answer is unsafe while the rejected one is safe; unlabelled pairs stay."""
    bad = pc.and_(pc.equal(pairs["chosen_safe"], False), pc.equal(pairs["rejected_safe"], True))
    return pairs.filter(pc.invert(pc.fill_null(bad, False)))


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    """One table of the RM's columns (RM_COLUMNS, typed as in PREFERENCES): whatever else a source has stays out."""
    schema = pa.schema([PREFERENCES.field(name) for name in RM_COLUMNS])
    return pa.concat_tables([t.select(list(RM_COLUMNS)).cast(schema) for t in tables])


def helpfulness_mix(preferences: pa.Table, open_pairs: pa.Table | None = None, other_ratio: float = 1.0,
                    seed: int = 0) -> pa.Table:
    """All helpfulness pairs + equal parts sampled from the safety pairs and from `open_pairs` (e.g. a user's
    open-source preference file; the world has none).

    Each of the two sources gives other_ratio/2 x the helpfulness count, or all it has when that is fewer; an
    absent source is not made up by the other, so the safety share does not depend on whether open data is given.
    No pair is excluded here: docs/paper.md states the unsafe-chosen exclusion for the safety RM's data.
    """
    helpful = of_kind(preferences, "helpfulness")
    each = round(other_ratio * helpful.num_rows / 2)
    parts = [helpful, sample_pairs(of_kind(preferences, "safety"), each, seed, "help-mix-safety")]
    if open_pairs is not None:
        parts.append(sample_pairs(open_pairs, each, seed, "help-mix-open"))
    return _concat(parts)


def safety_mix(preferences: pa.Table, open_pairs: pa.Table | None = None, helpful_share: float = 0.1,
               seed: int = 0) -> pa.Table:
    """All safety pairs (+ `open_pairs`, the paper's Anthropic Harmless) mixed with sampled helpfulness pairs so
    they make `helpful_share` of the result (the paper's 90/10).

    Pairs with an unsafe chosen and a safe rejected answer are excluded from every part: the paper states the
    exclusion for safety labels; applying it to the helpfulness share too keeps the safety RM from ever being
    taught to prefer an unsafe answer. The 90/10 is counted after the exclusion.
    """
    safety = [without_unsafe_chosen(of_kind(preferences, "safety"))]
    if open_pairs is not None:
        safety.append(without_unsafe_chosen(open_pairs))
    n_safety = sum(t.num_rows for t in safety)
    n_helpful = round(n_safety * helpful_share / (1 - helpful_share))
    helpful = sample_pairs(without_unsafe_chosen(of_kind(preferences, "helpfulness")), n_helpful, seed,
                           "safety-mix-help")
    return _concat([*safety, helpful])


# What reward-model training and its metrics read of a PREFERENCES table: what an annotation tool would give
# (the pair, its rating and safety labels, where it came from), never `meta`, where the world keeps its oracle's
# scores; run_reward_models selects these first (tests/test_oracle_isolation.py).
RM_COLUMNS = ("id", "batch", "prompt", "chosen", "rejected", "rating", "margin", "chosen_safe", "rejected_safe",
              "kind", "source")


def reward_model_data(preferences: pa.Table, kind: RMKind, config: RMConfig,
                      open_pairs: pa.Table | None = None) -> tuple[pa.Table, pa.Table]:
    """(training mix for the `kind` RM, held-out pairs of every kind). Held-out pairs never enter a mix; open
    pairs are training data only (the paper tests on open sets apart, not on a share of them)."""
    if kind not in ("helpfulness", "safety"):
        raise ValueError(f"reward_model_data: kind = {kind!r}: allowed: 'helpfulness', 'safety'")
    train, heldout = split_heldout(preferences, config.heldout_share, config.heldout_pairs)
    if config.skip_ratings:
        train = train.filter(pc.invert(pc.is_in(train.column("rating"), pa.array(config.skip_ratings, pa.string()))))
    if kind == "helpfulness":
        return helpfulness_mix(train, open_pairs, config.helpfulness_other_ratio, config.seed), heldout
    return safety_mix(train, open_pairs, config.safety_helpful_share, config.seed), heldout


# --- encoding and scoring -----------------------------------------------------------------------------------

def encode_side(tokenizer: Tokenizer, prompt: list[dict[str, str]], answer: str) -> list[int]:
    """The prompt with all previous turns, then the answer, in the chat format, ending at the answer's eos: the
    head reads that token, as it does on a sampled answer (prompt ids + generated ids, which stop at eos). A
    template may write more after it (ChatML's newline after <|im_end|>): trained there, a SmolLM2 RM scored every
    sampled answer at a token it never learned on (docs/results.md, "SmolLM2 on the world", "The bug this found")."""
    ids = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}]).input_ids
    if tokenizer.eos_id in ids:
        ids = ids[:len(ids) - ids[::-1].index(tokenizer.eos_id)]
    return ids


def encode_pairs(pairs: pa.Table, tokenizer: Tokenizer, max_len: int) -> list[Pair]:
    encoded = []
    for row in pairs.select(["id", "prompt", "chosen", "rejected"]).to_pylist():
        chosen, rejected = (encode_side(tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected"))
        longest = max(len(chosen), len(rejected))
        if longest > max_len:
            raise ValueError(f"preference {row['id']}: {longest} tokens, longer than the reward model's context "
                             f"({max_len}); validation should have rejected it")
        encoded.append((chosen, rejected))
    return encoded


def pair_margins(pairs: pa.Table, margin: str) -> torch.Tensor:
    """m(rating) from the `margin` table, where the row's own `margin` column is null."""
    table = MARGINS[margin]
    explicit = pairs.column("margin").to_pylist() if "margin" in pairs.column_names else [None] * pairs.num_rows
    return torch.tensor([table[rating] if m is None else m
                         for rating, m in zip(pairs.column("rating").to_pylist(), explicit)])


def score_pairs(model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int,
                share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected): one forward pass over both sides, right-padded; with `share_prompt`, one row per
    pair holding the prompt once and both answers after it (the same scores, the prompt's tokens paid once)."""
    device = next(model.parameters()).device
    if share_prompt:
        rows = shared_prefix_rows(pairs, pad_id).to(device)
        scores = model(rows.input_ids, attention_mask=rows.attention_mask, shared=rows)
        return scores[:, 0], scores[:, 1]
    input_ids, attention_mask = pad_pairs([c for c, _ in pairs], [r for _, r in pairs], pad_id)
    scores = model(input_ids.to(device), attention_mask=attention_mask.to(device))
    return scores[:len(pairs)], scores[len(pairs):]


def index_batches(indices: torch.Tensor, batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                  group: int = 0) -> Iterator[torch.Tensor]:
    """Endless epochs over `indices`, reshuffled each epoch; a final partial batch is kept.

    `group` > 1 (with `lengths`, one per index value): each window of `group` batches of the shuffle is sorted by
    length before it is cut into batches, and the epoch's batches are shuffled again. Batches are padded to their
    longest pair, so mixing 500-token pairs with 100-token ones otherwise pads nearly every batch to 500."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        if group <= 1 or lengths is None:
            yield from order.split(batch_size)
            continue
        batches = []
        for window in order.split(group * batch_size):
            by_length = sorted(window.tolist(), key=lambda i: lengths[i], reverse=True)
            batches += torch.tensor(by_length, dtype=indices.dtype).split(batch_size)
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())


# --- training and evaluation --------------------------------------------------------------------------------

def train_reward_model(init_checkpoint: str | Path, train_pairs: pa.Table, config: RMConfig,
                       out_dir: str | Path) -> dict[str, Any]:
    """Train a reward model started from a causal-LM checkpoint (fresh scalar head) on `train_pairs` (a
    PREFERENCES table, e.g. from `reward_model_data`) and save it with its tokenizer to `out_dir`.
    Returns this rank's metrics (plain data, ready for a manifest)."""
    return fit_reward_model(init_checkpoint, train_pairs, config, out_dir)[1]


def fit_reward_model(init_checkpoint: str | Path, train_pairs: pa.Table, config: RMConfig,
                     out_dir: str | Path) -> tuple[LlamaForReward, dict[str, Any]]:
    """`train_reward_model`, also returning the trained model as this rank holds it (sharded under FSDP), so the
    ranks can score held-out pairs without loading it again. With `train.save_every`, the run saves its state
    beside `out_dir` (pipeline.stages.cached.train_state_dir) and a re-run resumes from it."""
    rank, world = rank_and_world()
    tokenizer = load_tokenizer(init_checkpoint)
    setup = TrainSetup(world, config.parallel, config.train)
    model = load_for_training(init_checkpoint, setup, head="reward", seed=config.seed)  # FSDP: own shards only
    model.train_top_layers(config.trainable_layers)  # more than the model has: an error naming the range
    encoded = encode_pairs(train_pairs, tokenizer, model.config.max_position_embeddings)
    margins = pair_margins(train_pairs, config.margin)
    if len(encoded) < world:
        raise ValueError(f"{len(encoded)} training pairs for {world} rank(s): need at least one per rank")
    # Steps come from the global pair count, so every rank takes the same number of optimizer steps; each
    # rank draws from its own share of one seeded shuffle.
    steps = config.epochs * math.ceil(len(encoded) / config.batch_size)
    warmup = warmup_steps_for(steps, config.warmup_share, config.warmup_min_steps)
    mine = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(config.seed))[rank::world]
    micro, accumulation = split_batch(config.batch_size, config.train.micro_batch, world, "rm.batch_size")
    batches = index_batches(mine, micro * accumulation, config.seed, [max(map(len, pair)) for pair in encoded],
                            config.group_by_length)

    trainer = Trainer(model, setup, config.lr, config.optim,
                      lambda opt: cosine_with_warmup(opt, steps, warmup, config.min_lr_ratio))
    model.train()
    state_dir = train_state_dir(out_dir)
    run = state_digest({"config": dataclasses.asdict(config), "steps": steps},
                       [torch.tensor([t for pair in encoded for side in pair for t in side]), margins], setup)
    resumed = resumed_progress(trainer, state_dir, run, batches, {"losses": [], "seen": 0})

    def loss_of(net: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        r_chosen, r_rejected = score_pairs(net, [encoded[i] for i in rows], tokenizer.pad_id, config.share_prompt)
        return margin_ranking_loss(r_chosen, r_rejected, margins[rows])

    losses: list[float] = resumed["losses"]
    seen = resumed["seen"]  # pairs this rank scored
    start = time.perf_counter()
    bar = progress_bar(steps, "reward model")
    bar.update(resumed["step"])
    for step in range(resumed["step"], steps):
        batch = next(batches)
        # Each micro-batch weighs its share of the rank's pairs: the gradient of the batch's mean loss.
        parts = [(rows, len(rows) / len(batch) * real) for rows, real in micro_split(batch, accumulation)]
        losses.append(trainer.step(parts, loss_of, f"reward model step {step}"))
        seen += len(batch)
        bar.update(1)
        if step % 10 == 0:
            bar.set_description(f"reward model loss {losses[-1]:.3f}")
        if saves_after(step + 1, steps, config.train.save_every, state_dir):
            save_train_state(trainer, state_dir, step + 1, {"run": run, "losses": losses, "seen": seen})
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    save_on_rank0(model, out_dir, tokenizer)
    remove_train_state(state_dir)
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"pairs": len(encoded), "epochs": config.epochs, "steps": steps, "warmup_steps": warmup,
                   "margin": config.margin, "world_size": world, "first_loss": losses[0],
                   "last_loss": sum(tail) / len(tail), "seconds": seconds, "pairs_per_second": seen / seconds}


@torch.no_grad()
def pair_scores(model: LlamaForReward, pairs: pa.Table, tokenizer: Tokenizer,
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores (before the sigmoid) of each pair's chosen and rejected answer, in row order.

    In a torch.distributed group every rank calls this and scores every world-th batch on its own device, and all
    of them get every score (one all-reduce); a sharded model gathers its weights in every forward, so a rank with
    fewer batches runs its first one again, unrecorded, to keep the forwards paired."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    encoded = encode_pairs(pairs, tokenizer, model.config.max_position_embeddings)
    # Similar lengths side by side waste less padding.
    order = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i])))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    scores = torch.zeros(2, len(encoded), dtype=torch.float64)
    for index in range(math.ceil(len(batches) / world)):
        rows = mine[index] if index < len(mine) else batches[0]
        r_chosen, r_rejected = score_pairs(model, [encoded[i] for i in rows], tokenizer.pad_id)
        if index < len(mine):
            scores[0, rows], scores[1, rows] = r_chosen.double().cpu(), r_rejected.double().cpu()
    scores = reduced(scores)  # each pair scored on one rank: the sum is every score
    model.train(was_training)
    return scores[0].float(), scores[1].float()


def accuracy_by_rating(r_chosen: torch.Tensor, r_rejected: torch.Tensor, ratings: Sequence[str]) -> dict[str, Any]:
    """Accuracy (chosen scored above rejected; a tie counts half) overall and by rating in Table 8's columns,
    pair counts, the mean margin r_chosen - r_rejected (raw scores), overall and by column, and the mean raw
    score of all answers (`mean_score`, the helpfulness RM's calibration offset)."""
    diff = r_chosen - r_rejected
    n = len(diff)
    correct = (diff > 0).float() + 0.5 * (diff == 0).float()
    columns = [COLUMN_OF_RATING[r] for r in ratings]
    accuracy: dict[str, float | None] = {}
    margin: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for column in COLUMNS:
        rows = torch.tensor([c == column for c in columns], dtype=torch.bool)
        counts[column] = int(rows.sum())
        accuracy[column] = float(correct[rows].mean()) if counts[column] else None
        margin[column] = float(diff[rows].mean()) if counts[column] else None
    accuracy["avg"] = float(correct.mean()) if n else None
    margin["avg"] = float(diff.mean()) if n else None
    counts["avg"] = n
    return {"pairs": n, "accuracy": accuracy, "counts": counts, "mean_margin": margin,
            "mean_score": float(r_chosen.sum() + r_rejected.sum()) / (2 * n) if n else None}


def accuracy_by_source(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       sources: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """{source: {"pairs", "accuracy"}}: the held-out accuracy of each input file's pairs (a tie counts half)."""
    correct = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    names = [str(s) for s in sources]
    out = {}
    for source in sorted(set(names)):
        rows = torch.tensor([name == source for name in names], dtype=torch.bool)
        out[source] = {"pairs": int(rows.sum()), "accuracy": float(correct[rows].mean())}
    return out


def evaluate_reward_model(model: LlamaForReward | str | Path, pairs: pa.Table, tokenizer: Tokenizer | None = None,
                          batch_size: int = 32) -> dict[str, Any]:
    """`accuracy_by_rating` of a reward model on `pairs`. A checkpoint folder brings its own tokenizer; a model
    needs `tokenizer`."""
    if not isinstance(model, torch.nn.Module):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_checkpoint(model, head="reward")
    if tokenizer is None:
        raise ValueError("evaluate_reward_model: pass the tokenizer along with a model")
    return accuracy_by_rating(*pair_scores(model, pairs, tokenizer, batch_size), pairs.column("rating").to_pylist())
