"""The oracle stays outside the learners: reward models read only what an annotation tool gives (pairs, ratings,
safety labels) and policies only their training messages; the world's oracle scores live in `meta`, never read."""

from __future__ import annotations

import json

import pyarrow as pa
import torch

from pipeline.data.schemas import DEMONSTRATIONS, PREFERENCES
from pipeline.stages.reward_model.algorithm import RM_COLUMNS, pair_margins, reward_model_data
from pipeline.stages.sft.algorithm import SFT_COLUMNS
from pipeline.world import World, WorldConfig, demonstrations_table, preferences_table
from tiny_configs import tiny_rm


def test_learner_columns_carry_no_oracle_field():
    assert "meta" not in RM_COLUMNS and "meta" not in SFT_COLUMNS
    assert set(RM_COLUMNS) <= set(PREFERENCES.names) and set(SFT_COLUMNS) <= set(DEMONSTRATIONS.names)


def test_reward_model_data_needs_nothing_outside_its_columns():
    world = World(WorldConfig(batch_sizes=(60, 120)))
    full = pa.concat_tables([preferences_table(world, b) for b in (1, 2)])
    assert "scores" in full.column("meta")[0].as_py()  # the hidden field is there to leak
    config = tiny_rm()
    for kind in ("helpfulness", "safety"):
        train_full, heldout_full = reward_model_data(full, kind, config)
        train, heldout = reward_model_data(full.select(list(RM_COLUMNS)), kind, config)
        assert train.column("id").to_pylist() == train_full.column("id").to_pylist()
        assert heldout.column("id").to_pylist() == heldout_full.column("id").to_pylist()
        assert torch.equal(pair_margins(train, config.margin), pair_margins(train_full, config.margin))


def test_demonstrations_train_from_messages_alone():
    table = demonstrations_table(World(WorldConfig(sft_demonstrations=20)))
    assert table.select(list(SFT_COLUMNS)).column("messages").to_pylist() == table.column("messages").to_pylist()


def test_world_v3_keeps_writers_habits_and_scores_on_the_oracles_side():
    """What the learners read of a version-3 world (the RM's and SFT's columns) carries no writer, habit, quality
    label or oracle score; the tables' `meta` holds them for the evaluation."""
    world = World(WorldConfig(version=3, sft_demonstrations=60, batch_sizes=(80,)))
    demos, prefs = demonstrations_table(world), preferences_table(world, 1)
    hidden = ('"writer"', '"habits"', '"qualities"', '"scores"', '"oracle"')
    assert all(key in "".join(prefs.column("meta").to_pylist()) for key in ('"qualities"', '"scores"'))
    assert all(key in "".join(demos.column("meta").to_pylist()) for key in ('"writer"', '"habits"', '"oracle"'))
    seen = json.dumps(prefs.select(list(RM_COLUMNS)).to_pylist() + demos.select(list(SFT_COLUMNS)).to_pylist())
    assert not any(key in seen for key in hidden)
