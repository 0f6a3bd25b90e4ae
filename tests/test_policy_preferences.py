"""On-policy weekly batches: two of the policies' own answers to one prompt, rated by the world's annotator."""

from __future__ import annotations

import pytest

from pipeline.data.schemas import PREFERENCES
from pipeline.stages.policy_preferences import OnPolicyConfig, batch_makers, pair_answers, prebuilt_part
from pipeline.world import World, WorldConfig, judge
from pipeline.world.config import AnnotatorConfig
from pipeline.world.preferences import on_policy_prompts
from pipeline.world.tables import preferences_table


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(annotator=AnnotatorConfig(noise=0.0, unsure_prob=0.0)))


def test_pairs_of_own_answers_prefer_the_oracles_better_one_with_the_gap_as_rating(world):
    prompts = [p for p in on_policy_prompts(world, 2, 40) if p.category == "helpful"][:6]
    ids = [f"p{i}" for i in range(len(prompts))]
    answers = {}
    for pid, p in zip(ids, prompts):
        wrong = p.meta["sentences"][next(v for v in p.meta["domain"] if v != p.meta["answer"])] \
            if "sentences" in p.meta else "I am not sure."
        answers[pid] = [p.meta["reference"], " " + p.meta["reference"] + " ", wrong, ""]  # a repeat and a blank
    answers[ids[-1]] = [prompts[-1].meta["reference"]] * 3  # one distinct answer: no pair
    pairs, skipped = pair_answers(prompts, answers, ids, 2, world)
    assert pairs.schema.equals(PREFERENCES, check_metadata=False)
    assert pairs.num_rows == len(prompts) - 1 and skipped == 1
    for row, p in zip(pairs.to_pylist(), prompts):
        assert row["batch"] == 2 and row["source"] == "policy" and row["kind"] == "helpfulness"
        assert row["prompt"] == p.messages
        assert judge(p.category, p.meta, row["chosen"]).helpfulness == 1.0
        assert judge(p.category, p.meta, row["rejected"]).helpfulness < 0.5
        assert row["rating"] == "significantly_better"  # noiseless gap >= 0.5


def test_adversarial_prompts_are_rated_by_a_safety_annotator(world):
    prompts = [p for p in on_policy_prompts(world, 2, 30) if p.is_safety][:2]
    answers = {"a": [prompts[0].meta["reference"], "I cannot help with this request."],
               "b": [prompts[1].meta["reference"], "The weather is lovely today."]}
    pairs, _ = pair_answers(prompts, answers, ["a", "b"], 2, world)
    assert pairs.column("kind").to_pylist() == ["safety", "safety"]


def test_the_prebuilt_part_keeps_count_and_comes_from_the_batch(world):
    prebuilt = preferences_table(world, 2)
    part = prebuilt_part(prebuilt, 100, 2)
    assert part.num_rows == 100 and set(part.column("id").to_pylist()) <= set(prebuilt.column("id").to_pylist())
    assert prebuilt_part(prebuilt, 100, 2).equals(part)


def test_batch_one_seeds_and_each_later_batch_is_made_by_the_round_that_first_ingests_it():
    assert batch_makers(1, [2], on_policy=True) == [(1, None), (2, 1)]
    assert batch_makers(2, [2, 3], on_policy=True) == [(1, None), (2, 1), (3, 2)]
    assert batch_makers(3, [3, 3, 4], on_policy=True) == [(1, None), (2, 1), (3, 1), (4, 3)]
    assert batch_makers(2, [2, 3], on_policy=False) == [(1, None), (2, None), (3, None)]


def test_config_is_validated():
    with pytest.raises(ValueError, match="share"):
        OnPolicyConfig(share=1.5)
    with pytest.raises(ValueError, match="two answers"):
        OnPolicyConfig(sources=[{"policy": -1, "temperature": 0.7, "n": 1}])
