"""The run summary's bars: the demonstrations' own oracle helpfulness, and GAtt adherence at the paper's turns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.data.schemas import DEMONSTRATIONS
from pipeline.evaluation.demonstrations import demonstrations_summary
from pipeline.output.summary import gatt_summary
from pipeline.stages.gatt.algorithm import TurnAdherence

META = {"check": "number", "answer": 21, "reference": "42 minus 21 is 21.", "operands": [42, 21], "task": "arithmetic",
        "key": "arithmetic:sub:42:21"}


def demonstration(category: str, answer: str, meta: dict) -> dict:
    return {"id": answer, "messages": [{"role": "user", "content": "What is 42 minus 21?"},
                                       {"role": "assistant", "content": answer}],
            "category": category, "source": "world", "meta": json.dumps(meta)}


def test_demonstrations_are_scored_on_the_headline_helpful_prompts_only():
    rows = [demonstration("helpful", "42 minus 21 is 21.", META),  # right: 1.0
            demonstration("helpful", "42 minus 21 is 23. I could be wrong here, though.", META),  # wrong: 0.0
            demonstration("helpful", "42 minus 21 is 23.", {**META, "slice": "hard"}),  # the hard slice: apart
            demonstration("borderline", "I cannot help with that.", {**META, "reference": "Sure."})]
    table = pa.Table.from_pylist(rows, schema=DEMONSTRATIONS)
    summary = demonstrations_summary(table)
    assert summary["helpfulness"] == pytest.approx(0.5)
    assert summary["habits"] == {"filler": 0.0, "hedge": 0.5, "drift": 0.0, "off_format": 0.0, "refusal": 0.0}
    assert demonstrations_summary(table.slice(3)) == {"helpfulness": None, "habits": None}


def test_gatt_adherence_is_the_largest_policys_in_the_last_round_that_ran_it():
    def turns(rates):
        return [TurnAdherence(t + 1, 10, round(10 * r)) for t, r in enumerate(rates)]

    ran = SimpleNamespace(scores={"small": [], "large": []}, gatt={
        "small": {"before": turns([0.0] * 20), "after": turns([0.0] * 20)},
        "large": {"before": turns([0.1] * 20), "after": turns([0.1] * 3 + [0.9] * 17)}})
    later = SimpleNamespace(scores={"small": [], "large": []}, gatt={})
    assert gatt_summary([ran, later]) == {"adherence": {"4": {"before": 0.1, "after": 0.9},
                                                        "6": {"before": 0.1, "after": 0.9},
                                                        "20": {"before": 0.1, "after": 0.9}}}
    short = SimpleNamespace(scores={"large": []}, gatt={"large": {"before": turns([0.5] * 5),
                                                                  "after": turns([1.0] * 5)}})
    assert gatt_summary([short]) == {"adherence": {"4": {"before": 0.5, "after": 1.0}}}
    assert gatt_summary([later]) is None
