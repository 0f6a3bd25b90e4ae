"""Preference pairs from the policy's own samples, rated by the world's annotator."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.data.schemas import PREFERENCES, SAMPLES
from pipeline.stages.policy_preferences import policy_pairs
from pipeline.world import World, WorldConfig, judge
from pipeline.world.config import AnnotatorConfig
from pipeline.world.tables import prompts_table


def test_pairs_of_own_samples_prefer_the_oracles_better_answer():
    world = World(WorldConfig(train_helpful=6, train_borderline=2, train_safety_per_cell=1, train_dialogues=1))
    prompts = prompts_table(world, "train")
    helpful = [row for row in prompts.to_pylist() if row["category"] == "helpful"][:3]
    rows = []
    for p in helpful:
        meta = json.loads(p["meta"])
        right, wrong = meta["reference"], "I am not sure."  # the reference answer is right by construction
        for i, response in enumerate([right, right, wrong, ""]):
            rows.append({"prompt_id": p["id"], "round": 1, "sampler": "large-r0", "temperature": 0.7,
                         "sample_index": i, "is_safety": False, "prompt_token_ids": [1], "response": response,
                         "token_ids": [2], "logprobs": [-1.0], "finish_reason": "stop", "r_help": 0.5,
                         "r_safe": 0.5, "r_combined": 0.5, "chosen": None})
    pairs = policy_pairs(pa.Table.from_pylist(rows, schema=SAMPLES), prompts, 102, 2, AnnotatorConfig(noise=0.0), 0)
    assert pairs.schema.equals(PREFERENCES, check_metadata=False) and pairs.num_rows == 2  # capped at count
    for row in pairs.to_pylist():
        assert row["batch"] == 102 and row["source"] == "policy" and row["kind"] == "helpfulness"
        category_meta = next(json.loads(p["meta"]) for p in helpful if p["messages"] == row["prompt"])
        assert judge("helpful", category_meta, row["chosen"]).helpfulness > judge("helpful", category_meta,
                                                                                  row["rejected"]).helpfulness
