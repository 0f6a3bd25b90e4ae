"""Packing and pair padding: nothing lost, nothing crosses a document, losses equal the unpacked ones."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from model.losses import masked_lm_loss
from model.packing import assign_rows, pack, pad_pairs, shared_prefix_rows, split_long


def random_examples(n: int, seed: int, max_len: int = 30):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, max_len)
        ids = [1] + [rng.randint(3, 96) for _ in range(length - 1)]
        prompt = rng.randint(1, length - 1)
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return out


def test_every_example_packed_exactly_once_and_rows_fit():
    lengths = [random.Random(i).randint(1, 64) for i in range(500)]
    rows = assign_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # best fit wastes little
    assert assign_rows(lengths, 64) == rows  # deterministic


def test_packed_tensors_hold_each_example_with_its_mask():
    examples = random_examples(40, 1)
    packed = pack(examples, seq_len=48, pad_id=0)
    found = []
    for r in range(len(packed)):
        docs = packed.document_ids[r]
        for d in docs.unique().tolist():
            if d < 0:
                continue
            span = docs == d
            found.append((packed.input_ids[r][span].tolist(), packed.loss_mask[r][span].long().tolist()))
    assert sorted(found) == sorted((list(i), list(m)) for i, m in examples)
    assert ((packed.attention_mask == 0) == (packed.document_ids < 0)).all()
    assert packed.fill > 0.8


def test_packed_loss_equals_loss_of_each_example_alone():
    model = tiny_model(seed=2)
    examples = random_examples(12, 3)
    packed = pack(examples, seq_len=64, pad_id=0)
    with torch.no_grad():
        logits = model(packed.input_ids, attention_mask=packed.attention_mask, document_ids=packed.document_ids)
        # sum of per-token losses, packed vs one example at a time
        targets = (packed.loss_mask[:, 1:] * (packed.document_ids[:, 1:] == packed.document_ids[:, :-1])).sum()
        packed_sum = masked_lm_loss(logits, packed.input_ids, packed.loss_mask, packed.document_ids) * targets
        alone_sum = torch.tensor(0.0)
        for ids, mask in examples:
            ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
            alone_sum += masked_lm_loss(model(ids_t), ids_t, mask_t) * mask_t[:, 1:].sum()
    assert packed_sum.item() == pytest.approx(alone_sum.item(), rel=1e-5)


def test_too_long_example_is_a_clear_error_and_split_long_cuts():
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        pack([(list(range(9)), [1] * 9)], seq_len=8, pad_id=0)
    assert split_long(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_pad_pairs_scores_equal_unpadded():
    from conftest import tiny_config
    from model.llama import LlamaForReward

    reward = LlamaForReward(tiny_config())
    reward.init_weights(4)
    reward.eval()
    chosen, rejected = [[1, 5, 6, 7], [1, 9]], [[1, 5, 6], [1, 9, 10, 11, 12]]
    ids, mask = pad_pairs(chosen, rejected, pad_id=0)
    assert ids.shape == (4, 5) and mask.sum().item() == 4 + 2 + 3 + 5
    with torch.no_grad():
        scores = reward(ids, attention_mask=mask)
        alone = torch.stack([reward(torch.tensor([s]))[0] for s in chosen + rejected])
    assert torch.allclose(scores, alone, atol=1e-5)


def test_shared_prefix_rows_by_hand():
    # prefix [1, 5] shared; a branch keeps its last token even when one side is the other's prefix ([1, 5, 6]).
    rows = shared_prefix_rows([([1, 5, 6, 7], [1, 5, 9]), ([1, 5, 6], [1, 5, 6, 8, 8])], pad_id=0)
    assert rows.input_ids.tolist() == [[1, 5, 6, 7, 9, 0], [1, 5, 6, 6, 8, 8]]
    assert rows.branches.tolist() == [[0, 0, 1, 1, 2, -1], [0, 0, 1, 2, 2, 2]]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 2, 3, 4]]
    assert rows.last.tolist() == [[3, 4], [2, 5]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_shared_prefix_scores_and_gradients_equal_each_side_alone():
    from conftest import tiny_config
    from model.llama import LlamaForReward

    reward = LlamaForReward(tiny_config())
    reward.init_weights(4)
    pairs = [([1, 5, 6, 7, 8], [1, 5, 6, 9]), ([1, 9], [1, 9, 10, 11, 12]), ([2, 3, 4], [7, 3, 4])]
    rows = shared_prefix_rows(pairs, pad_id=0)
    shared = reward(rows.input_ids, attention_mask=rows.attention_mask, shared=rows)
    shared.sum().backward()
    grads = [p.grad.clone() for p in reward.parameters()]
    reward.zero_grad()
    alone = torch.stack([torch.cat([reward(torch.tensor([c])), reward(torch.tensor([r]))]) for c, r in pairs])
    alone.sum().backward()
    assert shared.shape == (3, 2) and torch.allclose(shared, alone, atol=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(grads, reward.parameters()))
