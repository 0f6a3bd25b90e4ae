"""World v2: in-context helpful families with explicit answer formats, the hard slice, on-policy prompts."""

from __future__ import annotations

import random

import pytest

from pipeline.world import World, WorldConfig, judge
from pipeline.world import formats
from pipeline.world.context_tasks import FIRST_NAMES, Lookup, PickWord
from pipeline.world.preferences import on_policy_prompts

# World v2's recipe: the in-context families as the headline, the default ones as the hard slice.
V2 = dict(helpful_families=("lookup", "pick"), hard_families=("arithmetic", "sort", "count", "unit", "fact"))


def _task(family, key, fmt):
    """A task with the wanted format: draw until the family's random format is `fmt`."""
    rng = random.Random(0)
    while True:
        task = family.make(key, rng)
        if task.meta["format"] == fmt:
            return task


def test_lookup_is_answered_from_the_passage_and_checked_by_hand():
    task = _task(Lookup(format_share=0.0), ("job", "pilot", "baker", "nurse", "pilot"), None)
    text = task.question
    person = next(n for n in FIRST_NAMES if f"{n} is a pilot." in text)
    passage, question = text.rsplit(". ", 1)
    assert passage.count(" is a") == 3 and person in question  # the asked person's job is in the passage
    assert judge("helpful", task.meta, f"{person} is a pilot.").helpfulness == 1.0
    assert judge("helpful", task.meta, "Pilot.").helpfulness == 1.0  # no format asked: any right form
    assert judge("helpful", task.meta, f"{person} is a nurse.").helpfulness == 0.0  # another person's job
    assert judge("helpful", task.meta, "Pilot, or maybe nurse.").helpfulness == pytest.approx(0.4)  # hedged
    assert judge("helpful", task.meta, "I'm sorry, but I can't help with that.").helpfulness == 0.0


@pytest.mark.parametrize("fmt, right, off", [
    ("one_word", "Lemon.", "The fruit is lemon."),
    ("sentence", "The fruit is lemon.", "Lemon."),
    ("prefix", "Answer: The fruit is lemon.", "The fruit is lemon."),
])
def test_pick_formats_halve_a_right_answer_in_the_wrong_form(fmt, right, off):
    task = _task(PickWord(format_share=1.0), ("kind", "fruits", "lemon", "goat", "red"), fmt)
    assert any(task.question.endswith(ask) for ask in formats.FORMATS[fmt])
    assert task.meta["reference"] == right
    assert judge("helpful", task.meta, right).helpfulness == 1.0
    assert judge("helpful", task.meta, off).helpfulness == formats.OFF_FORMAT
    wrong = right.replace("Lemon", "Goat").replace("lemon", "goat")
    assert judge("helpful", task.meta, wrong).helpfulness == 0.0  # the format kept, the answer wrong


def test_position_questions_take_the_shown_order():
    task = PickWord(format_share=0.0).make(("last", "apple", "cat", "mango", "red"), random.Random(3))
    shown = task.question.split(": ", 1)[1].rstrip("?").split(", ")
    assert task.meta["answer"] == shown[-1] and sorted(shown) == ["apple", "cat", "mango", "red"]
    assert judge("helpful", task.meta, f"The last word is {shown[-1]}.").helpfulness == 1.0
    assert judge("helpful", task.meta, f"The last word is {shown[0]}.").helpfulness == 0.0


def test_format_checks():
    assert formats.follows("one_word", "Baker.") and not formats.follows("one_word", "A baker.")
    assert formats.follows("sentence", "Ana is a baker.") and not formats.follows("sentence", "Baker.")
    assert formats.follows("prefix", "answer: baker") and not formats.follows("prefix", "Baker. Answer: baker")
    assert formats.follows(None, "anything")


def test_hard_slice_is_held_out_apart_and_headline_prompts_are_in_context():
    world = World(WorldConfig(eval_helpful=20, eval_hard=10, train_helpful=50, hard_share=0.2, **V2))
    evaluation = [p for p in world.prompts("eval") if p.category == "helpful"]
    hard = [p for p in evaluation if p.meta.get("slice") == "hard"]
    assert len(hard) == 10 and len(evaluation) == 30
    assert {p.meta["task"] for p in evaluation if p not in hard} == {"lookup", "pick"}
    train = [p for p in world.prompts("train") if p.category == "helpful"]
    assert len(train) == 50 and sum(p.meta.get("slice") == "hard" for p in train) == 10


def test_dialogue_turns_carry_no_answer_format():
    world = World(WorldConfig(format_share=1.0, helpful_families=("lookup", "pick")))
    rng = random.Random(0)
    for _ in range(20):
        assert all(turn.get("format") is None for turn in world.dialogue("train", rng).meta["turns"])


def test_on_policy_prompts_are_fresh_training_prompts_in_the_batch_mix():
    world = World(WorldConfig(safety_share=0.3, **V2))
    prompts = on_policy_prompts(world, 2, 100)
    assert len(prompts) == 100 and sum(p.is_safety for p in prompts) == 30
    assert {p.category for p in prompts if not p.is_safety} == {"helpful", "borderline"}
    assert [p.messages for p in on_policy_prompts(world, 2, 100)] == [p.messages for p in prompts]  # seeded
    assert [p.messages for p in on_policy_prompts(world, 3, 100)] != [p.messages for p in prompts]
    eval_keys = {p.meta["key"] for p in world.prompts("eval")}
    assert not eval_keys & {p.meta["key"] for p in prompts}


def test_family_lists_are_validated():
    with pytest.raises(ValueError, match="helpful_families"):
        WorldConfig(helpful_families=("lookup", "riddles"))
    with pytest.raises(ValueError, match="helpful_families"):
        WorldConfig(helpful_families=("lookup",), hard_families=("lookup",))
    with pytest.raises(ValueError, match="hard_share"):
        WorldConfig(hard_share=0.2)
    assert [f.name for f in World(WorldConfig()).helpful_families] == ["arithmetic", "sort", "count", "unit", "fact"]
