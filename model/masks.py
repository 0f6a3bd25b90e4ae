"""Attention masks and position ids for padded batches and packed sequences.

Inputs, each (batch, seq) and optional:
- `attention_mask`: 1 for real tokens, 0 for padding (left or right);
- `document_ids`: packed rows hold several documents; tokens attend only within their own document and
  positions restart at 0 at each document's first token;
- `branches`: a shared prefix (0) followed by branches (1, 2, ...) that each continue it, as one row: a token
  attends the prefix and its own branch, never another branch (a reward-model pair's two answers to one prompt).
"""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                 batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Position of each token within its document, counting real tokens only (so left padding is harmless)."""
    if attention_mask is None and document_ids is None:
        return torch.arange(seq, device=device).expand(batch, seq)
    real = (attention_mask if attention_mask is not None
            else torch.ones(batch, seq, dtype=torch.long, device=device)).long()
    count = real.cumsum(-1)  # real tokens up to and including t
    if document_ids is None:
        return (count - 1).clamp(min=0)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # real tokens before each document's start, carried forward over the document (count is non-decreasing).
    before = torch.where(starts, count - real, torch.zeros_like(count)).cummax(-1).values
    return (count - before - 1).clamp(min=0)


def attention_bias(attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                   seq: int, device: torch.device, branches: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask (batch, 1, seq, seq), True where query i may attend key j; None means plain causal.

    Every query may attend itself, so a padding row is never fully masked (that would give NaN in softmax);
    padding outputs are meaningless and the caller ignores them.
    """
    if document_ids is None and branches is None and (attention_mask is None or bool(attention_mask.all())):
        return None
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    if branches is not None:
        allowed = allowed & ((branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :]))
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


def last_token_index(attention_mask: torch.Tensor | None, batch: int, seq: int,
                     device: torch.device) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values.clamp(min=0)
