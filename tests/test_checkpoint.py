"""HF-format checkpoint IO: exact round trips, transformers interop, sharding, and strict loading errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import tiny_config, tiny_model
from model.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from model.config import ConfigError
from model.llama import LlamaForReward


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(seed=1, tie_word_embeddings=tied)
    save_checkpoint(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / SINGLE_FILE).is_file()
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"


def test_sharded_round_trip_with_index(tmp_path):
    model = tiny_model(seed=2)
    save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "ckpt" / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert_same_state(model, load_checkpoint(tmp_path / "ckpt"))
    # transformers reads our sharded folder too
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (reference(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_overwrite_is_atomic_replace(tmp_path):
    save_checkpoint(tiny_model(seed=1), tmp_path / "ckpt", max_shard_bytes=60_000)
    save_checkpoint(tiny_model(seed=2), tmp_path / "ckpt")  # single file replaces the shards entirely
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", SINGLE_FILE]
    assert_same_state(tiny_model(seed=2), load_checkpoint(tmp_path / "ckpt"))


@pytest.mark.parametrize("tied", [False, True])
def test_folder_saved_by_transformers_loads(tmp_path, tied):
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, rope_theta=50000.0,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf")
    assert ours.config.rope_theta == 50000.0 and ours.config.tie_word_embeddings == tied
    ids = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-4


def test_our_folder_loads_in_transformers_both_heads(tmp_path):
    # transformers' sequence classifier finds the last token through pad_token_id, so give it one
    model = tiny_model(seed=4, tie_word_embeddings=True, pad_token_id=0)
    save_checkpoint(model, tmp_path / "lm")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "lm")
    assert config.rope_parameters["rope_theta"] == model.config.rope_theta
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        assert (reference(ids).logits - model(ids)).abs().max().item() <= 1e-4

    reward = load_checkpoint(tmp_path / "lm", head="reward", seed=3)  # RM initialised from the LM
    assert isinstance(reward, LlamaForReward)
    assert torch.equal(reward.model.embed_tokens.weight, model.model.embed_tokens.weight)
    save_checkpoint(reward, tmp_path / "rm")
    assert_same_state(reward, load_checkpoint(tmp_path / "rm", head="reward"))
    hf_reward = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert (hf_reward(ids).logits.squeeze(-1) - reward(ids)).abs().max().item() <= 1e-4


def test_bfloat16_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=5, dtype="bfloat16").to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / SINGLE_FILE).values())
    loaded = load_checkpoint(tmp_path / "bf16")
    assert loaded.config.dtype == "bfloat16"
    assert_same_state(model, loaded)
    assert load_checkpoint(tmp_path / "bf16", dtype=torch.float32).model.norm.weight.dtype == torch.float32


# --- bad input: one clear error naming the tensor or field and the file --------------------------------------

def corrupt(tmp_path, edit):
    model = tiny_model(seed=6)
    folder = save_checkpoint(model, tmp_path / "bad")
    tensors = load_file(folder / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    return folder


def test_missing_tensor_is_named(tmp_path):
    folder = corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        load_checkpoint(folder)
    assert str(folder / SINGLE_FILE) in str(err.value)


def test_extra_tensor_is_named(tmp_path):
    folder = corrupt(tmp_path, lambda t: t.__setitem__("model.layers.9.bonus.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.bonus\.weight'") as err:
        load_checkpoint(folder)
    assert SINGLE_FILE in str(err.value)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    folder = corrupt(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \(64, 64\).*\(32, 64\)"):
        load_checkpoint(folder)


def test_non_finite_tensor_is_refused(tmp_path):
    def poison(t):
        t["model.norm.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight' is not finite"):
        load_checkpoint(corrupt(tmp_path, poison))


def test_missing_shard_is_named(tmp_path):
    folder = save_checkpoint(tiny_model(seed=1), tmp_path / "ckpt", max_shard_bytes=60_000)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    tiny_config().save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("field,value,pattern", [
    ("attention_bias", True, r"'attention_bias' = True is not supported"),
    ("hidden_act", "gelu", r"'hidden_act' = 'gelu'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, r"rope_parameters\.rope_type"),
    ("sliding_window", 128, r"unsupported config field\(s\) \['sliding_window'\]"),
    ("num_key_value_heads", 3, r"'num_key_value_heads' = 3: must divide num_attention_heads"),
    ("model_type", "mistral", r"'model_type' = 'mistral'"),
])
def test_unsupported_config_field_is_named_with_file(tmp_path, field, value, pattern):
    save_checkpoint(tiny_model(seed=1), tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=pattern) as err:
        load_checkpoint(tmp_path)
    assert str(path) in str(err.value)


def test_reward_model_needs_its_head_in_a_reward_checkpoint(tmp_path):
    reward = LlamaForReward(tiny_config())
    reward.init_weights(1)
    folder = save_checkpoint(reward, tmp_path / "rm")
    tensors = load_file(folder / SINGLE_FILE)
    del tensors["score.weight"]
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['score\.weight'\]"):
        load_checkpoint(folder, head="reward")


def test_reward_checkpoint_is_not_a_causal_lm(tmp_path):
    reward = LlamaForReward(tiny_config())
    reward.init_weights(1)
    save_checkpoint(reward, tmp_path / "rm")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'score\.weight'"):
        load_checkpoint(tmp_path / "rm", head="causal_lm")


def test_untied_copy_computes_the_same_function(tmp_path):
    from model.checkpoint import untie_checkpoint

    model = tiny_model(seed=8, tie_word_embeddings=True)
    untied = load_checkpoint(untie_checkpoint(save_checkpoint(model, tmp_path / "tied"), tmp_path / "untied"))
    assert not untied.config.tie_word_embeddings and untied.lm_head is not None
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(untied(ids), model(ids))
