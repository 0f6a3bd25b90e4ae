"""World v3: writers with habits, prebuilt pairs whose content and habits vary apart, and the oracle's helpfulness
by component (pipeline/world/writers.py, pipeline/world/oracle.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.world import World, WorldConfig, lexicon
from pipeline.world.oracle import correctness, judge
from pipeline.world.preferences import preference_batch
from pipeline.world.sft import demonstrations
from pipeline.world.tables import demonstrations_table
from pipeline.world.writers import WRITERS, WRITTEN, shown_habits

SUM = {"check": "number", "answer": 19, "operands": [12, 7], "reference": "12 plus 7 is 19.", "oracle": 3}


@pytest.mark.parametrize("answer, helpfulness", [
    ("12 plus 7 is 19.", 1.0),  # every component
    ("12 plus 7 is 18.", 0.4),  # wrong, written well: the manner's 0.4
    # 10 words on a budget of 5 + 2: concision 1 - 3/7
    ("That is a good question. 12 plus 7 is 19.", 0.6 + 0.15 * 4 / 7 + 0.1 + 0.1 + 0.05),
    ("12 plus 7 is 19. I could be wrong here, though.", 0.6 + 0.15 * 3 / 7 + 0.1 + 0.05),  # hedged, 11 words
    ("12 plus 7 is 19. The weather is lovely today.", 0.6 + 0.15 * 4 / 7 + 0.1 + 0.1),  # off topic, 10 words
    ("The weather is lovely today.", 0.0),  # no attempt at the task: the manner does not count
    ("I cannot help with this request.", 0.0),  # a refusal of a helpful request
])
def test_version_3_helpfulness_is_the_weighted_sum_of_its_components(answer, helpfulness):
    assert judge("helpful", SUM, answer).helpfulness == pytest.approx(helpfulness)


def test_version_2_keeps_its_own_helpfulness():
    v2 = {k: v for k, v in SUM.items() if k != "oracle"}
    assert judge("helpful", v2, "That is a good question. 12 plus 7 is 19.").helpfulness == 1.0  # within the slack
    assert judge("helpful", v2, "12 plus 7 is 18.").helpfulness == 0.0


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(version=3))


def test_writers_write_right_answers_with_their_own_habits(world):
    demos = [d for d in demonstrations(world) if d.prompt.category == "helpful"]
    assert all(correctness(d.prompt.meta, d.answer) == 1.0 for d in demos)  # writers know the answer
    by_writer = Counter(d.writer for d in demos)
    assert set(by_writer) == {w.name for w in WRITERS} and by_writer["careful"] > by_writer["chatty"] / 2
    filler = {name: sum("filler" in d.habits for d in demos if d.writer == name) / n for name, n in by_writer.items()}
    assert filler["chatty"] > 0.4 > 0.15 > filler["careful"]
    scores = [judge("helpful", d.prompt.meta, d.answer).helpfulness for d in demos]
    assert 0.85 < sum(scores) / len(scores) < 0.97  # below the clean references' 1.0: RLHF has room above them
    meta = json.loads(demonstrations_table(world).column("meta")[0].as_py())
    assert "writer" in meta and "habits" in meta  # the oracle's side keeps them; the learners' columns do not


FEATURES = {
    "longer": lambda text: len(text),
    "filler": lambda text: any(f in text for f in lexicon.FILLERS),
    "hedge": lambda text: any(h in text for h in lexicon.HEDGES),
    "off topic": lambda text: any(o in text for o in lexicon.OFF_TOPIC),
    "refusal": lambda text: any(r in text for r in lexicon.REFUSALS),
}


def test_no_surface_feature_predicts_the_chosen_answer_beyond_the_oracle(world):
    pairs = [c for b in (1, 2, 3) for c in preference_batch(world, b)
             if c.kind == "helpfulness" and c.prompt.category in ("helpful", "borderline")]
    for name, feature in FEATURES.items():
        differ = [(feature(c.chosen) > feature(c.rejected), c.scores[0] > c.scores[1]) for c in pairs
                  if feature(c.chosen) != feature(c.rejected) and c.scores[0] != c.scores[1]]
        chosen_has = sum(has for has, _ in differ) / len(differ)
        oracle_better_has = sum(has == better for has, better in differ) / len(differ)
        assert len(differ) > 50 and abs(chosen_has - oracle_better_has) <= 0.05, name
        assert chosen_has <= 0.55, name  # each feature only costs: none wins on its own
    # Habits are drawn apart from the content: each shows as often on right answers as on any.
    sides = [(quality.split("+")[0], set(quality.split("+")[1:])) for c in pairs for quality in c.qualities]
    right = sum(content == "right" for content, _ in sides) / len(sides)
    for habit in ("filler", "hedge", "drift"):
        with_habit = [content for content, habits in sides if habit in habits]
        assert abs(sum(content == "right" for content in with_habit) / len(with_habit) - right) < 0.08, habit


def test_the_same_content_with_a_habit_loses(world):
    """Pairs whose two sides have the same content and differ in one habit: the side without it is chosen."""
    wins = Counter()  # True: the chosen side is the one without the habit
    for c in (c for b in (1, 2, 3) for c in preference_batch(world, b) if c.kind == "helpfulness"):
        if c.prompt.category not in WRITTEN:
            continue
        (chosen, *chosen_habits), (rejected, *rejected_habits) = (q.split("+") for q in c.qualities)
        if chosen == rejected and len(set(chosen_habits) ^ set(rejected_habits)) == 1:
            wins[len(chosen_habits) < len(rejected_habits)] += 1
    assert wins[True] + wins[False] > 50 and wins[True] / (wins[True] + wins[False]) > 0.6


def test_a_reader_sees_the_habits_a_writer_wrote(world):
    demos = [d for d in demonstrations(world) if d.prompt.category in WRITTEN]
    assert sum(bool(d.habits) for d in demos) > 50
    for d in demos:
        assert set(shown_habits(d.prompt.category, d.prompt.meta, d.answer)) == set(d.habits), d.answer
