"""Training losses shared by the stages: masked LM (answer tokens only) and the margin ranking loss of the RMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# docs/paper.md, "Reward models": margin m(rating) per preference rating, for the "small" and "large" tables.
MARGINS: dict[str, dict[str, float]] = {
    "none": {"significantly_better": 0.0, "better": 0.0, "slightly_better": 0.0, "negligibly_better": 0.0,
             "unsure": 0.0},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0,
              "unsure": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0,
              "unsure": 0.0},
}


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose loss_mask is 1.

    The logits at t predict token t+1, so token t+1's mask decides; in packed rows the prediction across a
    document boundary (last token of one document -> first of the next) is never trained.
    """
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].to(logits.dtype)
    if document_ids is not None:
        weights = weights * (document_ids[:, 1:] == document_ids[:, :-1])
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                          reduction="none")
    return (nll * weights.reshape(-1)).sum() / weights.sum().clamp(min=1)


def margin_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                        margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - m(rating)), averaged over pairs (the paper's RM loss)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()
