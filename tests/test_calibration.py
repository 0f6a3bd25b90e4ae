"""Reward-model calibration: the offset file round-trips and the scorer's sigmoid subtracts it."""

from __future__ import annotations

import pytest
import torch

from actors.scorer import sigmoid_rewards
from conftest import tiny_model
from model.calibration import CALIBRATION_FILE, read_calibration, write_calibration
from model.checkpoint import load_checkpoint, save_checkpoint


def test_offset_round_trips_and_defaults_to_zero(tmp_path):
    assert read_calibration(tmp_path) == 0.0
    write_calibration(tmp_path, -1.25, "test")
    assert read_calibration(tmp_path) == -1.25
    (tmp_path / CALIBRATION_FILE).write_text('{"offset": "x"}')
    with pytest.raises(ValueError, match="'offset' must be a number"):
        read_calibration(tmp_path)


def test_scores_are_sigmoids_of_the_centered_reward(tmp_path):
    folder = save_checkpoint(tiny_model(seed=1), tmp_path / "policy")
    rm = load_checkpoint(folder, head="reward", seed=2)
    sequences = [[1, 5, 9, 4], [1, 7]]
    raw = [rm(torch.tensor([s])).item() for s in sequences]
    scores = sigmoid_rewards(rm, sequences, 64, offset=0.5)
    assert scores == pytest.approx([torch.sigmoid(torch.tensor(r - 0.5)).item() for r in raw], abs=1e-6)


def test_scoring_batches_hold_sequences_of_similar_length(tmp_path):
    folder = save_checkpoint(tiny_model(seed=1), tmp_path / "policy")
    rm = load_checkpoint(folder, head="reward", seed=2)
    sequences = [list(range(1, n + 1)) for n in (30, 2, 11, 3, 10, 4)]
    widths = []
    rm.model.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))
    scores = sigmoid_rewards(rm, sequences, 1000)
    assert widths == [2, 3, 4, 11, 30]  # [10, 11] together; 3 is more than 1.25x 2, 30 more than 1.25x 10
    widths.clear()
    alone = [sigmoid_rewards(rm, [s], 1000)[0] for s in sequences]
    assert scores == pytest.approx(alone, abs=1e-6)


def test_safety_gate_sits_at_the_best_split_of_safe_and_unsafe_answers():
    import math

    from pipeline.stages.reward_model.stage import gate_offset

    scores = [-3.0, -2.0, -1.0, 0.5, 1.0, 2.0, 0.0]
    labels = [False, False, False, True, True, True, True]  # safe from 0.0 up: the best split is at 0.0
    offset = gate_offset(scores, labels, threshold=0.15)
    assert offset + math.log(0.15 / 0.85) == pytest.approx(0.0)
    gated = [1 / (1 + math.exp(-(s - offset))) < 0.15 for s in scores[:6]]
    assert gated == [True, True, True, False, False, False]
    assert gate_offset([1.0, 2.0], [True, None]) is None  # no unsafe answer: nothing to split
