"""Round bookkeeping and rejection-sampling settings: which batches a round ingests, prompt draws, bad values."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.driver.rounds import RoundsConfig
from pipeline.stages.rejection_sampling.stage import RejectionConfig, choose_prompts


def test_rounds_ingest_new_batches_and_the_last_count_repeats():
    config = RoundsConfig(count=4, new_batches=[3, 1])
    assert [config.batches_through(r) for r in range(5)] == [0, 3, 4, 5, 6]


def test_temperature_per_round_repeats_the_last_value():
    config = RejectionConfig(temperatures=[0.8, 1.0])
    assert [config.temperature(r) for r in (1, 2, 3)] == [0.8, 1.0, 1.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), r"rejection.k = 0: must be >= 1"),
    (dict(keep="best"), r"rejection.keep = 'best': allowed: all_rounds, last_round"),
    (dict(k=4, reward_ks=[1, 8]), r"rejection.reward_ks = \[1, 8\]: each must be in \[1, k=4\]"),
    (dict(temperatures=[]), r"rejection.temperatures = \[\]"),
])
def test_bad_rejection_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RejectionConfig(**kwargs)


def test_prompt_draw_is_the_same_whatever_the_row_order_and_skips_dialogues():
    ids = [f"p{i}" for i in range(30)]
    categories = ["dialogue" if i % 3 == 0 else "helpful" for i in range(30)]
    table = pa.table({"id": ids, "category": categories})
    drawn = choose_prompts(table, 10, seed=1)
    shuffled = choose_prompts(table.take(pa.array(list(reversed(range(30))))), 10, seed=1)
    assert sorted(drawn.column("id").to_pylist()) == sorted(shuffled.column("id").to_pylist())
    assert drawn.num_rows == 10 and "dialogue" not in drawn.column("category").to_pylist()
    assert choose_prompts(table, 10, seed=2).column("id").to_pylist() != drawn.column("id").to_pylist()
