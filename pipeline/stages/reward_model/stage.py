"""The reward-model stage of a round: helpfulness and safety RMs from the SFT checkpoint, with held-out accuracy
by rating (the paper's Table 8 layout) in the manifest."""

from __future__ import annotations

import math
from bisect import bisect_left
from pathlib import Path
from typing import Any

import pyarrow as pa

from model.config import ModelConfig
from model.distributed import rank_and_world
from model.tokenizer import load_tokenizer
from pipeline import stage_names as names
from pipeline.data.schemas import PREFERENCE_KINDS
from pipeline.data.store import digest_config, model_digest
from pipeline.stages.cached import checkpoint_stage, training_recipe
from pipeline.stages.context import RewardModels, StageContext, Table
from pipeline.state import PolicyState
from actors.scorer import SAFETY_THRESHOLD
from model.calibration import write_calibration
from pipeline.stages.reward_model.algorithm import (RM_COLUMNS, RMConfig, accuracy_by_rating, accuracy_by_source,
                                                    encode_side, fit_reward_model, of_kind, pair_scores,
                                                    reward_model_data, split_heldout)

STAGE_VERSION = 2  # raised when the same pairs and config would give another RM (pipeline.stages.cached.stage_digest)


def fits_context(preferences: pa.Table, init_checkpoint: Path) -> pa.Table:
    """Mask of pairs whose both sides fit the model's context (long multi-turn dialogues may not)."""
    tokenizer = load_tokenizer(init_checkpoint)
    limit = ModelConfig.load(init_checkpoint).max_position_embeddings
    fits = []
    for row in preferences.select(["prompt", "chosen", "rejected"]).to_pylist():
        longest = max(len(encode_side(tokenizer, row["prompt"], answer)) for answer in (row["chosen"], row["rejected"]))
        fits.append(longest <= limit)
    return pa.array(fits, pa.bool_())


def run_reward_models(ctx: StageContext, init: PolicyState, preferences: Table, config: RMConfig) -> RewardModels:
    """Both RMs from `init`, trained on the trainer group. Their metrics hold training figures and, under
    "heldout", accuracy by rating on the held-out helpfulness and safety pairs (the same pairs for both RMs)."""
    rows = preferences.rows.select(list(RM_COLUMNS))  # the oracle's fields stay behind
    usable = rows.filter(fits_context(rows, init.checkpoint))
    over_context = rows.num_rows - usable.num_rows  # counted in the metrics: never dropped silently
    _, heldout = split_heldout(usable, config.heldout_share, config.heldout_pairs)
    recipe, folders, metrics = training_recipe(config), {}, {}
    for kind in PREFERENCE_KINDS:
        train_pairs, _ = reward_model_data(usable, kind, config)
        tests = {test: of_kind(heldout, test) for test in PREFERENCE_KINDS}
        folders[kind], metrics[kind], _ = checkpoint_stage(
            ctx.store, ctx.round, names.rm(kind), {"init": init.digest, "preferences": preferences.digest},
            recipe,
            lambda out, kind=kind, pairs=train_pairs, tests=tests: {
                **ctx.train(train_and_evaluate, init.checkpoint, kind, pairs, config, out, tests),
                "over_context": over_context},
            STAGE_VERSION)
    digest = digest_config([model_digest(ctx.store.stage(ctx.round, names.rm(kind)).manifest())
                            for kind in PREFERENCE_KINDS])
    return RewardModels(folders["helpfulness"], folders["safety"], digest, metrics)


def train_and_evaluate(init_checkpoint: Path, kind: str, train_pairs: pa.Table, config: RMConfig, out: Path,
                       tests: dict[str, pa.Table]) -> dict[str, Any]:
    """Train one RM (on every rank of the trainer group), then the ranks score the held-out sets once with the
    model they trained, each a share on its own device, and rank 0 reports: accuracy by rating under "heldout",
    and from the same scores the RM's calibration (see `write_calibration`): the helpfulness RM centred on its
    held-out answers; the safety RM with the paper's gate at the best safe/unsafe split of all held-out answers
    (centering alone is not enough: trained on safety data, it scored every answer to a helpful prompt below the
    gate, measured in round 1 of the tiny run)."""
    model, metrics = fit_reward_model(init_checkpoint, train_pairs, config, out)
    tokenizer = load_tokenizer(out)
    scores = {test: pair_scores(model, pairs, tokenizer) for test, pairs in tests.items()}
    if rank_and_world()[0] != 0:
        return metrics
    metrics["heldout"] = {test: accuracy_by_rating(*scores[test], tests[test].column("rating").to_pylist())
                          for test in tests}
    for test, pairs in tests.items():  # e.g. dpo_en_demo.json beside the chitchat pairs
        metrics["heldout"][test]["by_source"] = accuracy_by_source(*scores[test], pairs.column("source").to_pylist())
    offset, how = metrics["heldout"][kind]["mean_score"], f"mean raw score of the held-out {kind} pairs' answers"
    if kind == "safety":
        answers, labels = [], []
        for test, (r_chosen, r_rejected) in scores.items():
            answers += r_chosen.tolist() + r_rejected.tolist()
            labels += tests[test].column("chosen_safe").to_pylist() + tests[test].column("rejected_safe").to_pylist()
        found = gate_offset(answers, labels)
        if found is not None:
            offset, how = found, f"the {SAFETY_THRESHOLD} gate at the best safe/unsafe split of held-out answers"
    if offset is not None:
        write_calibration(out, offset, how)
        metrics["calibration_offset"] = offset
    return metrics


def gate_offset(scores: list[float], safe_labels: list[bool | None],
                threshold: float = SAFETY_THRESHOLD) -> float | None:
    """Offset o such that sigmoid(score - o) < threshold exactly for scores below the split that best separates
    unsafe from safe answers (balanced accuracy; answers without a label are ignored)."""
    unsafe = sorted(score for score, safe in zip(scores, safe_labels) if safe is False)
    safe = sorted(score for score, safe in zip(scores, safe_labels) if safe is True)
    if not unsafe or not safe:
        return None
    best, best_accuracy = None, -1.0
    for split in sorted({*unsafe, *safe}):  # unsafe when score < split
        accuracy = (bisect_left(unsafe, split) / len(unsafe) + 1 - bisect_left(safe, split) / len(safe)) / 2
        if accuracy > best_accuracy:
            best, best_accuracy = split, accuracy
    return best - math.log(threshold / (1 - threshold))
