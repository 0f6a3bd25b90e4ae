"""The reward-model stage: margins, data mixes, the held-out split, and a real short training on world pairs."""

from __future__ import annotations

import math
import random
from collections import Counter

import pyarrow as pa
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.llama import LlamaForCausalLM
from model.losses import margin_ranking_loss
from model.optim import OptimConfig
from model.tokenizer import SentencePieceTokenizer, Tokenizer
from pipeline.data.schemas import PREFERENCES
from pipeline.evaluation.rm_tables import table8_markdown
from pipeline.stages.reward_model.algorithm import (RMConfig, encode_pairs, evaluate_reward_model, helpfulness_mix,
                                                    index_batches, of_kind, pair_margins, reward_model_data, safety_mix,
                                                    score_pairs, split_heldout, train_reward_model)
from pipeline.world import World, WorldConfig, preferences_table, table26_sizes
from tiny_configs import tiny_rm


def pair(i: str, kind: str = "helpfulness", rating: str = "better", batch: int = 1, margin: float | None = None,
         chosen_safe: bool | None = True, rejected_safe: bool | None = True) -> dict:
    return {"id": i, "batch": batch, "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": f"Good answer {i}.", "rejected": "Bad.", "rating": rating, "margin": margin,
            "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "kind": kind, "source": "test", "meta": None}


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PREFERENCES)


def ids(t: pa.Table) -> set[str]:
    return set(t.column("id").to_pylist())


@pytest.fixture(scope="module")
def world_pairs() -> pa.Table:
    # Single-turn dialogues and half the default batch sizes keep every pair short and the run a few seconds.
    world = World(WorldConfig(seed=0, max_dialogue_turns=1, batch_sizes=table26_sizes(5, 30)))
    return pa.concat_tables([preferences_table(world, b) for b in range(1, 6)])


@pytest.fixture(scope="module")
def tokenizer(world_pairs) -> Tokenizer:
    rows = world_pairs.to_pylist()
    texts = [m["content"] for r in rows for m in r["prompt"]] + [r[s] for r in rows for s in ("chosen", "rejected")]
    return SentencePieceTokenizer.train(texts, vocab_size=1024)


def test_config_names_each_bad_value():
    with pytest.raises(ValueError, match=r"^rm.lr = -1: must be > 0$"):
        RMConfig(lr=-1)
    with pytest.raises(ValueError) as err:
        RMConfig(batch_size=0, margin="huge", heldout_share=1.5)
    assert str(err.value).splitlines() == ["rm.batch_size = 0: must be > 0", "rm.margin = 'huge': allowed: none, "
                                           "small, large", "rm.heldout_share = 1.5: must be in (0, 1)"]
    defaults = RMConfig()  # the paper's optimizer settings (docs/paper.md, "Reward models") are the defaults
    assert defaults.optim == OptimConfig(betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, grad_clip=1.0)
    assert (defaults.min_lr_ratio, defaults.warmup_share, defaults.warmup_min_steps) == (0.1, 0.03, 5)


def test_margin_loss_on_a_hand_made_batch():
    batch = table([pair("a", rating="significantly_better"), pair("b", rating="better"),
                   pair("c", rating="slightly_better"), pair("d", rating="unsure"),
                   pair("e", rating="significantly_better", margin=0.25)])  # the column overrides the rating
    r_chosen = torch.tensor([2.0, 1.0, 0.5, 0.0, 1.0])
    r_rejected = torch.tensor([-1.0, 0.0, 0.5, 0.25, 0.0])
    expected = {"none": [0, 0, 0, 0, 0.25], "small": [1, 2 / 3, 1 / 3, 0, 0.25], "large": [3, 2, 1, 0, 0.25]}
    for name, margins in expected.items():
        assert pair_margins(batch, name).tolist() == pytest.approx(margins)
        by_hand = sum(math.log1p(math.exp(-(c - r - m)))
                      for c, r, m in zip(r_chosen.tolist(), r_rejected.tolist(), margins)) / 5
        loss = margin_ranking_loss(r_chosen, r_rejected, pair_margins(batch, name))
        assert loss.item() == pytest.approx(by_hand, rel=1e-6), name


def test_one_forward_pass_scores_each_side_as_alone(tmp_path, tokenizer):
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128))
    model.init_weights(0)
    reward = load_checkpoint(save_checkpoint(model, tmp_path / "lm"), head="reward")
    pairs = encode_pairs(table([pair("a"), pair("bb" * 10)]), tokenizer, 128)
    r_chosen, r_rejected = score_pairs(reward, pairs, tokenizer.pad_id)
    alone = [reward(torch.tensor([ids])).item() for c, r in pairs for ids in (c, r)]
    assert [r_chosen[0].item(), r_rejected[0].item(), r_chosen[1].item(), r_rejected[1].item()] == \
        pytest.approx(alone, abs=1e-5)
    shared = score_pairs(reward, pairs, tokenizer.pad_id, share_prompt=True)  # the prompt once per pair
    assert torch.stack(shared, 1).flatten().tolist() == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="preference bb+: .* longer than the reward model's context"):
        encode_pairs(table([pair("bb" * 10)]), tokenizer, 8)


def test_length_grouped_batches_cover_every_pair_once_per_epoch_with_less_padding():
    lengths = [random.Random(i).choice([40, 60, 400, 500]) for i in range(64)]
    indices = torch.arange(64)

    def epoch(group: int) -> list[list[int]]:
        batches = index_batches(indices, 8, seed=3, lengths=lengths, group=group)
        return [next(batches).tolist() for _ in range(8)]

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain, grouped = epoch(0), epoch(4)
    assert sorted(sum(grouped, [])) == list(range(64)) == sorted(sum(plain, []))
    assert padded(grouped) < 0.8 * padded(plain)
    assert epoch(4) == grouped  # seeded


def test_data_mixes_have_the_paper_composition():
    helpful = [pair(f"h{i}") for i in range(197)] + [pair(f"hu{i}", chosen_safe=False) for i in range(3)]
    safety = [pair(f"s{i}", "safety") for i in range(88)] + [pair("sn0", "safety", chosen_safe=None),
                                                               pair("sn1", "safety", rejected_safe=None)]
    unsafe_chosen = [pair(f"su{i}", "safety", chosen_safe=False) for i in range(5)]
    both_unsafe = [pair("sb0", "safety", chosen_safe=False, rejected_safe=False)]
    prefs = table(helpful + safety + unsafe_chosen + both_unsafe)
    open_pairs = table([pair(f"o{i}") for i in range(30)])

    mix = helpfulness_mix(prefs, open_pairs, other_ratio=1.0, seed=0)
    # All 200 helpfulness pairs; 100 each from safety (96 there: all) and open (30 there: all).
    assert (mix.num_rows, len(ids(of_kind(mix, "helpfulness")) - ids(open_pairs))) == (200 + 96 + 30, 200)
    half = helpfulness_mix(prefs, open_pairs, other_ratio=0.2, seed=0)  # 20 each
    assert half.num_rows == 200 + 20 + 20
    assert len(ids(half) & ids(open_pairs)) == 20 and len(ids(of_kind(half, "safety"))) == 20
    assert ids(helpfulness_mix(prefs.take(list(reversed(range(prefs.num_rows)))), open_pairs, 0.2)) == ids(half)
    assert ids(helpfulness_mix(prefs, open_pairs, 0.2, seed=1)) != ids(half)

    mix = safety_mix(prefs, helpful_share=0.1, seed=0)
    # 96 safety pairs less the 5 unsafe-chosen = 91 (unlabelled and both-unsafe pairs stay); 91 / 9 -> 10 helpful.
    assert len(ids(of_kind(mix, "safety"))) == 91 and len(ids(of_kind(mix, "helpfulness"))) == 10
    assert not ids(mix) & {p["id"] for p in unsafe_chosen} and {"sn0", "sn1", "sb0"} <= ids(mix)
    assert of_kind(safety_mix(table(safety + helpful[-3:])), "helpfulness").num_rows == 0  # only unsafe-chosen
    with_open = safety_mix(prefs, table([pair(f"a{i}", "safety") for i in range(19)]), 0.1, seed=0)
    assert with_open.num_rows == 91 + 19 + 12  # 110 / 9 = 12.2


def test_skipped_ratings_leave_training_but_not_the_heldout_tests():
    ratings = ["significantly_better", "negligibly_better", "unsure", "better"] * 25
    prefs = table([pair(f"p{i}", rating=r) for i, r in enumerate(ratings)])
    config = tiny_rm(skip_ratings=["negligibly_better", "unsure"], helpfulness_other_ratio=0.0)
    train, heldout = reward_model_data(prefs, "helpfulness", config)
    assert set(train.column("rating").to_pylist()) == {"significantly_better", "better"}
    assert train.num_rows == 50 - sum(r in ("significantly_better", "better") for r in heldout.column("rating").to_pylist())
    assert heldout == reward_model_data(prefs, "helpfulness", tiny_rm(helpfulness_other_ratio=0.0))[1]
    assert {"negligibly_better", "unsure"} & set(heldout.column("rating").to_pylist())
    with pytest.raises(ValueError, match="rm.skip_ratings: 'meh' is not a rating; allowed: significantly_better"):
        RMConfig(skip_ratings=["meh"])


def test_heldout_pairs_never_reach_training(world_pairs):
    train, heldout = split_heldout(world_pairs, share=0.2)
    per_batch, held_per_batch = (Counter(t.column("batch").to_pylist()) for t in (world_pairs, heldout))
    assert held_per_batch == {b: round(0.2 * n) for b, n in per_batch.items()}
    assert ids(train) | ids(heldout) == ids(world_pairs) and not ids(train) & ids(heldout)
    shuffled = world_pairs.take(random.Random(0).sample(range(world_pairs.num_rows), world_pairs.num_rows))
    assert ids(split_heldout(shuffled, share=0.2)[1]) == ids(heldout)  # by id hash, not by position
    assert set(Counter(split_heldout(world_pairs, count=7)[1].column("batch").to_pylist()).values()) == {7}
    for kind in ("helpfulness", "safety"):
        mix, test = reward_model_data(world_pairs, kind, tiny_rm(heldout_share=0.2))
        assert ids(test) == ids(heldout) and not ids(mix) & ids(test)


def test_short_rm_training_ranks_heldout_pairs(tmp_path, world_pairs, tokenizer):
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True,
                                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id))
    model.init_weights(0)
    init = save_checkpoint(model, tmp_path / "init", tokenizer=tokenizer)
    config = tiny_rm(heldout_share=0.2, margin="small", seed=0)
    train, heldout = reward_model_data(world_pairs, "helpfulness", config)

    metrics = train_reward_model(init, train, config, tmp_path / "rm")
    results = {("helpfulness", kind): evaluate_reward_model(tmp_path / "rm", of_kind(heldout, kind))
               for kind in ("helpfulness", "safety")}
    print(f"\n{metrics}\n{table8_markdown(results)}")

    assert metrics["steps"] == -(-train.num_rows // 32) and metrics["last_loss"] < metrics["first_loss"] - 0.3
    helpful = results["helpfulness", "helpfulness"]
    accuracy = helpful["accuracy"]
    assert helpful["pairs"] > 300 and helpful["counts"]["negligibly_better_or_unsure"] > 30
    assert accuracy["avg"] > 0.65 and results["helpfulness", "safety"]["accuracy"]["avg"] > 0.8
    # The paper's pattern: clear preferences are ranked far better than near-ties (at chance).
    assert accuracy["significantly_better"] > accuracy["negligibly_better_or_unsure"] + 0.15
    assert helpful["mean_margin"]["significantly_better"] > helpful["mean_margin"]["negligibly_better_or_unsure"]
    assert "| | | paper | 80.7 | 67.5 | 60.9 | 54.7 | 63.2 |" in table8_markdown(results)
