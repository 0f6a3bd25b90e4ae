"""The pretraining stage trains the tokenizer and each size, held-out perplexity beats chance, and a shipped base
stands in for pretraining only when it was made from the same corpus with the same recipe."""

from __future__ import annotations

import dataclasses
import random

import pyarrow as pa
import pytest

from model.checkpoint import load_checkpoint
from model.tokenizer import load_tokenizer
from pipeline.config.run import compose_run
from pipeline.data.schemas import CORPUS
from pipeline.data.store import RunStore
from pipeline.stages.pretrain import ModelSize, PretrainConfig, is_heldout, pretrain, pretrain_digest, run_pretrain
from pipeline.stages.pretrain_shipped import SHIPPED_BASES, find_shipped, ship
from pipeline.stages.world import world_stage_name
from pipeline.world import World, build_tables


def toy_corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    names, towns = ["Alva", "Borin", "Cyra", "Dax"], ["Pellmar", "Quist", "Rontu"]
    return [f"{rng.choice(names)} lives in {rng.choice(towns)} and is {rng.randint(20, 60)} years old. "
            f"{rng.choice(names)} likes {rng.choice(['tea', 'maps', 'boats'])}." for _ in range(n)]


def test_pretrain_two_sizes_beats_chance(tmp_path):
    sizes = [ModelSize("a", 32, 64, 1, 1, 1, steps=40), ModelSize("b", 64, 128, 2, 2, 1, steps=40)]
    config = PretrainConfig(sizes=sizes, vocab_size=320, seq_len=64, batch_size=8, lr=5e-3, warmup_steps=5)
    results = pretrain(toy_corpus(), tmp_path, config)
    assert [r.size for r in results] == ["a", "b"]
    for r in results:
        assert r.heldout_perplexity < 320 / 4  # far below the uniform distribution's perplexity
        model = load_checkpoint(r.checkpoint)
        assert model.num_parameters == r.parameters
        assert load_tokenizer(r.checkpoint).vocab_size == model.config.vocab_size == 320
    assert results[0].parameters < results[1].parameters


def test_heldout_split_is_by_content_not_position():
    texts = toy_corpus(200)
    flags = {t: is_heldout(t, 0.1) for t in texts}
    assert 0 < sum(flags.values()) < len(texts)
    assert all(is_heldout(t, 0.1) == flags[t] for t in reversed(texts))


def corpus_store(root, texts):
    """A run store holding `texts` as its world corpus, as the world stage writes it."""
    store = RunStore(root)
    table = pa.table({"text": texts, "kind": ["qa"] * len(texts), "category": [None] * len(texts),
                      "quality": [None] * len(texts)}, schema=CORPUS)
    stage = store.stage(0, world_stage_name("corpus"))
    stage.begin({}, "world")
    stage.write_shard(0, table)
    stage.finish("corpus", {}, "world")
    return store, table


def no_training(*args, **kwargs):
    raise AssertionError("pretrained although a shipped base matches")


def test_a_shipped_base_stands_in_for_pretraining_only_for_its_corpus_and_recipe(tmp_path):
    config = PretrainConfig(sizes=[ModelSize("a", 32, 64, 1, 1, 1, steps=4)], vocab_size=320, seq_len=64,
                            batch_size=4, warmup_steps=1)
    made, corpus = corpus_store(tmp_path / "made", toy_corpus())
    trained, source = run_pretrain(made, corpus, "c", config)
    assert source == "trained" and run_pretrain(made, corpus, "c", config)[1] == "cached"
    bases = tmp_path / "bases"
    ship(made.root, bases / "toy")

    models, source = run_pretrain(RunStore(tmp_path / "run"), corpus, "c", config, no_training, bases)
    assert source == "shipped" and models == [dataclasses.replace(trained[0], checkpoint=models[0].checkpoint)]
    weights = "model.safetensors"
    assert (models[0].checkpoint / weights).read_bytes() == (trained[0].checkpoint / weights).read_bytes()
    assert RunStore(tmp_path / "run").stage(0, "pretrain").manifest()["extra"]["source"] == "shipped"

    # Another corpus, another recipe, or shipped bases turned off: pretrain from scratch.
    other = corpus_store(tmp_path / "other", toy_corpus(300))[1]
    assert run_pretrain(RunStore(tmp_path / "r2"), other, "d", config, shipped=bases)[1] == "trained"
    steps = dataclasses.replace(config, sizes=[dataclasses.replace(config.sizes[0], steps=5)])
    assert run_pretrain(RunStore(tmp_path / "r3"), corpus, "c", steps, shipped=bases)[1] == "trained"
    off = dataclasses.replace(config, shipped=False)
    assert pretrain_digest(off) == pretrain_digest(config)
    assert run_pretrain(RunStore(tmp_path / "r4"), corpus, "c", off, shipped=bases)[1] == "trained"

    (bases / "toy" / "a" / weights).write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="a/model.safetensors is missing or not the file it shipped with"):
        run_pretrain(RunStore(tmp_path / "r5"), corpus, "c", config, no_training, bases)


@pytest.mark.parametrize("seed", [0, 1])
def test_make_demo_takes_the_shipped_bases_for_world_seeds_0_and_1(seed):
    """The shipped bases are `tiny`'s: a change to the world's corpus or the pretraining recipe must ship them
    again (pipeline/world/bases/README.md), or `make demo` pretrains them first."""
    config = compose_run(f"world.seed={seed}")
    texts = build_tables(World(config.world))["corpus"].column("text").to_pylist()
    assert find_shipped(SHIPPED_BASES, texts, pretrain_digest(config.pretrain)) == SHIPPED_BASES / f"tiny-seed{seed}"
