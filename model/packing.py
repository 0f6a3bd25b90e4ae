"""Token ids -> training tensors: packed rows for (S)FT and pretraining, padded pairs for reward models.

Packing puts many short examples into fixed-length rows without splitting any of them (best-fit decreasing),
and records document ids so attention never crosses an example boundary and positions restart per example.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Example = tuple[Sequence[int], Sequence[int]]  # (token ids, loss mask)


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (rows, seq_len) long
    loss_mask: torch.Tensor  # (rows, seq_len) float: 1 where the token is trained on
    document_ids: torch.Tensor  # (rows, seq_len) long: index of the example within its row, -1 on padding
    attention_mask: torch.Tensor  # (rows, seq_len) long: 0 on padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def fill(self) -> float:
        """Share of positions holding real tokens."""
        return float(self.attention_mask.float().mean())

    def batch(self, rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[rows], "loss_mask": self.loss_mask[rows],
                "document_ids": self.document_ids[rows], "attention_mask": self.attention_mask[rows]}


def assign_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: example indices per row, deterministic, no example split."""
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) longer than seq_len={seq_len} (first: index {too_long[0]}, "
                         f"{lengths[too_long[0]]} tokens); validation should have rejected them, or use "
                         "split_long() for pretraining text")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))  # the tightest row that still fits
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> PackedRows:
    rows = assign_rows([len(ids) for ids, _ in examples], seq_len)
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for doc, i in enumerate(members):
            ids, mask = examples[i]
            n = len(ids)
            if len(mask) != n:
                raise ValueError(f"example {i}: {n} token ids but {len(mask)} loss-mask entries")
            input_ids[r, at:at + n] = torch.as_tensor(ids, dtype=torch.long)
            loss_mask[r, at:at + n] = torch.as_tensor(mask, dtype=torch.float)
            document_ids[r, at:at + n] = doc
            at += n
    return PackedRows(input_ids, loss_mask, document_ids, (document_ids >= 0).long())


def split_long(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Cut a long pretraining document into pieces of at most seq_len tokens (each trained on in full)."""
    return [list(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]


def pad_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (2B, L) ids and attention mask: rows 0..B-1 chosen, B..2B-1 the rejected of the same pairs.

    One forward pass scores both sides; the reward head reads each row's last real token.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    return pad_right([*chosen, *rejected], pad_id)


@dataclass
class SharedPrefixRows:
    """One row per group of sequences that share a prefix (a prompt and its answers): the prefix once, then each
    sequence's rest as a branch (model.masks, `branches`), so the prefix's forward pass is paid once."""

    input_ids: torch.Tensor  # (rows, width) long, right-padded
    attention_mask: torch.Tensor  # (rows, width) long: 0 on padding
    branches: torch.Tensor  # (rows, width) long: 0 on the prefix, k on sequence k's rest (k >= 1), -1 on padding
    positions: torch.Tensor  # (rows, width) long: each branch continues the prefix's positions
    last: torch.Tensor  # (rows, sequences) long: index of each sequence's last token in its row

    def to(self, device: torch.device) -> SharedPrefixRows:
        return SharedPrefixRows(*(t.to(device) for t in dataclasses.astuple(self)))


def shared_prefix_rows(groups: Sequence[Sequence[Sequence[int]]], pad_id: int) -> SharedPrefixRows:
    """Pack each group's sequences (e.g. a pair's chosen and rejected ids) into one row around their longest common
    prefix. Every branch keeps at least its last token, so each sequence has a position of its own to be read at."""
    rows, branch_rows, position_rows, lasts = [], [], [], []
    for sequences in groups:
        prefix = min(len(s) for s in sequences) - 1
        for i, tokens in enumerate(zip(*sequences)):
            if i >= prefix or len(set(tokens)) > 1:
                prefix = i
                break
        ids, branch, positions, last = list(sequences[0][:prefix]), [0] * prefix, list(range(prefix)), []
        for k, s in enumerate(sequences, start=1):
            ids += s[prefix:]
            branch += [k] * (len(s) - prefix)
            positions += range(prefix, len(s))
            last.append(len(ids) - 1)
        rows.append(ids), branch_rows.append(branch), position_rows.append(positions), lasts.append(last)
    input_ids, attention_mask = pad_right(rows, pad_id)
    branches, _ = pad_right(branch_rows, -1)
    positions, _ = pad_right(position_rows, 0)
    return SharedPrefixRows(input_ids, attention_mask, branches, positions, torch.tensor(lasts, dtype=torch.long))


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, longest) ids right-padded with pad_id, and the attention mask (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[row, :len(s)] = 1
    return input_ids, attention_mask
