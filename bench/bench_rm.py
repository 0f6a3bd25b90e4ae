"""Reward-model training, ours vs TRL's RewardTrainer: `python -m bench.bench_rm [--quick] [--reps N] [--json FILE]`.

The same random-init tiny LM, the same training pairs (the world's helpfulness mix, docs/paper.md's margin ranking loss,
the "small" margin table), the same hyper-parameters (lr, batch, one epoch, warm-up, cosine to 10%, AdamW betas,
eps, weight decay, clip). Ours: `pipeline.stages.reward_model.algorithm.train_reward_model` in this process. TRL:
the same pairs pre-tokenized (`chosen_ids`, `rejected_ids`) with the per-pair margin in TRL's `margin` column, whose loss is
-log sigmoid(r_c - r_r - margin): the same loss. Both trained models are scored on the same held-out pairs by the
same function (`accuracy_by_rating`, Table 8's columns). Ours runs twice: with a plain shuffle
(TRL's batches) and with the RM stage's length grouping. Sides alternate, each repetition trains from scratch.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bench.common import (TRL_MISSING, Context, Section, alternate, hf_tokenizer, main_for, markdown_table, median,
                          quiet_transformers, spread, summary, timed, trl_version)
from model.optim import warmup_steps_for
from pipeline.evaluation.rm_tables import COLUMNS
from pipeline.stages.reward_model.algorithm import (COLUMN_OF_RATING, RMConfig, accuracy_by_rating, encode_pairs,
                                                    evaluate_reward_model, pair_margins, reward_model_data,
                                                    train_reward_model)


GROUP_BY_LENGTH = 8  # the SmolLM2 experiment's setting


def world_pairs(quick: bool) -> pa.Table:
    from pipeline.world import World, WorldConfig, preferences_table, table26_sizes

    batches = 2 if quick else 5
    world = World(WorldConfig(seed=0, max_dialogue_turns=1, batch_sizes=table26_sizes(batches, 10 if quick else 30)))
    return pa.concat_tables([preferences_table(world, b) for b in range(1, batches + 1)])


@torch.no_grad()
def hf_pair_scores(model: torch.nn.Module, encoded: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers sequence-classification model's raw scores of chosen and rejected, right-padded."""
    from model.packing import pad_pairs

    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        ids, mask = pad_pairs([c for c, _ in rows], [r for _, r in rows], pad_id)
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        chosen.append(scores[:len(rows)])
        rejected.append(scores[len(rows):])
    return torch.cat(chosen), torch.cat(rejected)


def trl_args(config: RMConfig, steps: int, out: str):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out, per_device_train_batch_size=config.batch_size, num_train_epochs=config.epochs,
        learning_rate=config.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        warmup_steps=warmup_steps_for(steps, config.warmup_share, config.warmup_min_steps),
        weight_decay=config.optim.weight_decay, adam_beta1=config.optim.betas[0], adam_beta2=config.optim.betas[1],
        adam_epsilon=config.optim.eps, max_grad_norm=config.optim.grad_clip, seed=config.seed,
        # Like ours: fp32 (TRL's default is bf16 autocast), no activation checkpointing (TRL's default is on), no
        # truncation, no reward centring.
        bf16=False, fp16=False, gradient_checkpointing=False, max_length=None, center_rewards_coefficient=None,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0)


def run(ctx: Context) -> Section:
    size = "small" if ctx.quick else "large"
    init = ctx.model(size)
    tokenizer = ctx.tokenizer
    config = RMConfig(lr=2e-3, batch_size=32, epochs=1, heldout_share=0.2, heldout_pairs=None, margin="small",
                      seed=0)
    train, heldout = reward_model_data(world_pairs(ctx.quick), "helpfulness", config)
    heldout = heldout.filter(pa.compute.equal(heldout["kind"], "helpfulness"))
    if ctx.quick:  # CI-sized: a few steps, enough to run every part
        train, heldout = train.slice(0, 96), heldout.slice(0, 64)
    ratings = heldout.column("rating").to_pylist()
    max_len = 256
    encoded_heldout = encode_pairs(heldout, tokenizer, max_len)
    steps = config.epochs * math.ceil(train.num_rows / config.batch_size)
    out = Path(tempfile.mkdtemp(prefix="rm-", dir=ctx.root))

    def ours(side_config: RMConfig) -> Callable[[], dict[str, Any]]:
        def side() -> dict[str, Any]:
            wall, metrics = timed(lambda: train_reward_model(init, train, side_config, out / "ours"))
            result = evaluate_reward_model(out / "ours", heldout)
            return {"epoch_s": metrics["seconds"], "wall_s": wall, "accuracy": result["accuracy"],
                    "last_loss": metrics["last_loss"]}
        return side

    # Ours twice: with the same batches as TRL (a plain shuffle), and with the RM stage's length grouping
    # (`rm.group_by_length`: the same pairs, batch size and steps, batches cut from length-sorted windows).
    grouped = f"ours, rm.group_by_length={GROUP_BY_LENGTH}"
    sides = {"ours": ours(config), grouped: ours(dataclasses.replace(config, group_by_length=GROUP_BY_LENGTH))}
    version = trl_version()
    if version:
        quiet_transformers()
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, PrinterCallback
        from trl import RewardTrainer

        encoded = encode_pairs(train, tokenizer, max_len)
        dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in encoded], "rejected_ids": [r for _, r in encoded],
                                     "margin": pair_margins(train, config.margin).tolist()})
        hf_tok = hf_tokenizer(init)

        def trl() -> dict[str, Any]:
            def setup_and_train():
                torch.manual_seed(config.seed)
                model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1, dtype=torch.float32)
                trainer = RewardTrainer(model=model, args=trl_args(config, steps, str(out / "trl")),
                                        train_dataset=dataset, processing_class=hf_tok)
                trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
                epoch_s, output = timed(trainer.train)
                return epoch_s, model

            wall, (epoch_s, model) = timed(setup_and_train)
            scores = hf_pair_scores(model, encoded_heldout, hf_tok.pad_token_id)
            return {"epoch_s": epoch_s, "wall_s": wall, "accuracy": accuracy_by_rating(*scores, ratings)["accuracy"]}

        sides[f"TRL {version} RewardTrainer"] = trl
    # Each repetition is a whole training from a fresh head: no separate warm-up.
    results = alternate(sides, ctx.reps, warmup=False)

    columns = [COLUMN_OF_RATING[r] for r in ratings]
    counts = {c: columns.count(c) for c in COLUMNS}
    header = ["side", "epoch s, median (min-max)", "wall s (load+train+save)",
              *[f"acc {c.replace('_', ' ')} (n={counts[c]})" for c in COLUMNS], f"acc avg (n={len(ratings)})",
              "ours' speed-up (side's epoch s / ours': plain / grouped)"]
    rows, table = [], []
    ours_epochs = [median([r["epoch_s"] for r in results[name]]) for name in ("ours", grouped)]
    for name, reps in results.items():
        epochs = [r["epoch_s"] for r in reps]
        accuracy = {c: median([r["accuracy"][c] for r in reps if r["accuracy"][c] is not None] or [float("nan")])
                    for c in (*COLUMNS, "avg")}
        rows.append({"side": name, "epoch_s": summary(epochs), "wall_s": summary([r["wall_s"] for r in reps]),
                     "accuracy": accuracy, "reps": reps})
        table.append([name, spread(epochs, ".2f"), spread([r["wall_s"] for r in reps], ".2f"),
                      *[f"{100 * accuracy[c]:.1f}" for c in (*COLUMNS, "avg")],
                      " / ".join(f"{median(epochs) / base:.2f}x" for base in ours_epochs)])
    if not version:
        table.append(["TRL RewardTrainer", TRL_MISSING, "", *[""] * (len(COLUMNS) + 1), ""])
    notes = [f"model: the tiny `{size}` LM (random init, fresh scalar head), {train.num_rows} training pairs "
             f"(helpfulness mix of the world's batches), {len(ratings)} held-out helpfulness pairs; batch "
             f"{config.batch_size} pairs, lr {config.lr:g}, {steps} steps = one epoch; {ctx.reps} repetitions per side",
             "epoch s: the training loop alone (ours: `train_reward_model`'s own clock; TRL: `trainer.train()`); "
             "wall s adds loading the model, encoding and (ours) saving the checkpoint",
             f"grouped: ours with `rm.group_by_length={GROUP_BY_LENGTH}` (each window of {GROUP_BY_LENGTH} batches of "
             "the shuffle sorted by length, then cut: less padding); TRL and plain ours pad a shuffled batch to its "
             "longest pair",
             "accuracy: chosen scored above rejected, by the paper's rating columns (Table 8), median over repetitions"]
    return Section("rm", "Reward-model training: ours vs TRL RewardTrainer", markdown_table(header, table), rows,
                   notes)


def main() -> None:
    main_for(run, __doc__)


if __name__ == "__main__":
    main()
