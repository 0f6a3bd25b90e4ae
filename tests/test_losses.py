"""Loss math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import MARGINS, margin_ranking_loss, masked_lm_loss


def test_margin_ranking_loss_equals_hand_computed():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([0.5, 1.0, -1.0])
    margin = torch.tensor([1.0, 0.0, 2 / 3])
    by_hand = [-math.log(1 / (1 + math.exp(-d))) for d in (2.0 - 0.5 - 1.0, 0.0 - 1.0 - 0.0, 0.0 - 2 / 3)]
    assert margin_ranking_loss(chosen, rejected, margin).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert margin_ranking_loss(chosen[:1], rejected[:1]).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))


def test_margin_tables_follow_the_paper():
    assert MARGINS["small"]["significantly_better"] == 1 and MARGINS["small"]["slightly_better"] == pytest.approx(1 / 3)
    assert [MARGINS["large"][r] for r in ("significantly_better", "better", "slightly_better", "negligibly_better",
                                           "unsure")] == [3, 2, 1, 0, 0]
    assert set(MARGINS["none"].values()) == {0.0}


def test_masked_lm_loss_counts_only_masked_targets():
    # vocab 3; logits for 4 positions; targets are ids[1:]
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1]])  # tokens 2 and 3 are answer tokens
    # token 2 (id 2) predicted at position 1: p=0.1; token 3 (id 0) at position 2: p=0.3
    assert masked_lm_loss(logits, ids, mask).item() == pytest.approx((-math.log(0.1) - math.log(0.3)) / 2, rel=1e-6)
    # across a document boundary (token 3 starts a new document) nothing is trained
    docs = torch.tensor([[0, 0, 0, 1]])
    assert masked_lm_loss(logits, ids, mask, docs).item() == pytest.approx(-math.log(0.1), rel=1e-6)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from model.optim import adamw, cosine_with_warmup, warmup_steps_for

    model = torch.nn.Linear(4, 4)
    optimizer = adamw(model, lr=1.0)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # matrix decays, bias does not
    schedule = cosine_with_warmup(optimizer, total_steps=100, warmup_steps=5, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert warmup_steps_for(1000) == 30 and warmup_steps_for(20) == 5 and warmup_steps_for(3) == 3
