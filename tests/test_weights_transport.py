"""actors.weights: tensors survive the trip through numpy arrays, bfloat16 included, without a copy on unpacking."""

from __future__ import annotations

import torch

from actors.weights import pack, unpack


def test_pack_and_unpack_keep_every_tensor_bit_for_bit():
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)[:, 1]}
    packed = pack(tensors)
    assert packed["b"][0] == "bfloat16" and sum(a.nbytes for _, a in packed.values()) == 3 * 4 * 4 + 5 * 2 + 2 * 8
    back = unpack(packed)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert back["a"].data_ptr() == packed["a"][1].ctypes.data  # a view of the array, not a copy
