"""Our LLaMA-2 implementation against transformers' (the reference), in fp32."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import tiny_config, tiny_model
from model.llama import LlamaForReward

TOL = 1e-4

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied-theta5e5": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                              rope_theta=500000.0),
    "mqa-untied-theta1e6": dict(num_attention_heads=8, num_key_value_heads=1, rope_theta=1e6),
    "gqa3-headdim": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def hf_reference(model, cls=transformers.LlamaForCausalLM, **extra):
    config = transformers.LlamaConfig(**model.config.to_hf_dict(cls.__name__), **extra)
    reference = cls(config).eval()
    reference.load_state_dict(model.state_dict(), strict=not model.config.tie_word_embeddings)
    if model.config.tie_word_embeddings:
        reference.tie_weights()
    return reference


def padded_batch(seed: int, vocab: int, lengths: list[int], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(seq - n, seq) if left else slice(0, n)
        ids[row, span] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, span] = 1
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    model = tiny_model(seed=1, **CONFIGS[name])
    reference = hf_reference(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied-theta5e5"])
def test_padded_batch_equals_transformers_and_unpadded(name, left):
    model = tiny_model(seed=3, **CONFIGS[name])
    reference = hf_reference(model)
    ids, mask = padded_batch(4, model.config.vocab_size, [19, 7, 12], left)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert (ours - theirs)[real].abs().max().item() <= TOL
        for row in range(ids.shape[0]):  # padding changes nothing for the real tokens
            alone = model(ids[row][real[row]][None])[0]
            assert (ours[row][real[row]] - alone).abs().max().item() <= TOL


def test_reward_head_reads_last_real_token_like_transformers():
    config = tiny_config(pad_token_id=0)
    reward = LlamaForReward(config)
    reward.init_weights(5)
    reward.eval()
    reference = hf_reference(reward, transformers.LlamaForSequenceClassification)
    ids, mask = padded_batch(6, config.vocab_size, [9, 4, 13], left=False)  # pad id 0, right padding
    with torch.no_grad():
        ours = reward(ids, attention_mask=mask)
        theirs = reference(ids, attention_mask=mask).logits.squeeze(-1)
        alone = torch.stack([reward(ids[r][mask[r].bool()][None])[0] for r in range(3)])
    assert ours.shape == (3,)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - alone).abs().max().item() <= TOL


def test_packed_forward_equals_each_document_alone():
    model = tiny_model(seed=7)
    g = torch.Generator().manual_seed(8)
    docs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (5, 11, 3, 9)]
    # two packed rows: [d0 d1 pad pad] and [d2 d3 pad...], padding marked by the attention mask
    rows = [[0, 1], [2, 3]]
    seq = 20
    ids = torch.zeros(2, seq, dtype=torch.long)
    doc_ids = torch.full((2, seq), -1, dtype=torch.long)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for d in members:
            n = len(docs[d])
            ids[r, at:at + n], doc_ids[r, at:at + n], mask[r, at:at + n] = docs[d], d, 1
            at += n
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, document_ids=doc_ids)
        for r, members in enumerate(rows):
            at = 0
            for d in members:
                n = len(docs[d])
                alone = model(docs[d][None])[0]
                assert (packed[r, at:at + n] - alone).abs().max().item() <= TOL
                at += n


def test_packed_positions_restart_per_document():
    from model.masks import position_ids
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert position_ids(mask, doc_ids, 1, 9, torch.device("cpu")).tolist() == [[0, 1, 2, 0, 1, 0, 1, 1, 1]]
    left = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids(left, None, 1, 5, torch.device("cpu")).tolist() == [[0, 0, 0, 1, 2]]


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(9))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=10).train()
        model.set_gradient_checkpointing(checkpointing)
        model(ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_train_top_layers_freezes_the_rest_and_keeps_their_weights():
    model = LlamaForReward(tiny_config(num_hidden_layers=3))
    model.train_top_layers(1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.layers.2.", "model.norm", "score")) for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    model(ids).sum().backward()
    assert all((p.grad is not None) == (name in trainable) for name, p in model.named_parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="must be in"):
        model.train_top_layers(4)
