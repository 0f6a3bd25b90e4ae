"""The in-run RM fidelity measurement, on hand-made samples with hand-computed values."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.data.schemas import SAMPLES
from pipeline.evaluation.rm_fidelity import rm_fidelity
from pipeline.world import World, WorldConfig
from pipeline.world.tables import prompt_rows


def test_pair_accuracy_and_headroom_by_hand():
    world = World(WorldConfig(helpful_families=("lookup", "pick"), format_share=0.0))
    helpful = [p for p in world.prompts("train") if p.category == "helpful"]
    prompts = [next(p for p in helpful if p.meta["task"] == family) for family in ("lookup", "pick")]
    table = pa.Table.from_pylist(prompt_rows(prompts, ["p0", "p1"]))
    rows = []
    for pid, p, rm in (("p0", prompts[0], (0.9, 0.5, 0.1)), ("p1", prompts[1], (0.2, 0.8, 0.5))):
        other = next(v for v in p.meta["domain"] if v != p.meta["answer"])
        answers = (p.meta["reference"], p.meta["sentences"][other], p.meta["sentences"][other])  # oracle 1, 0.4, 0.4
        for i, (answer, r_help) in enumerate(zip(answers, rm)):
            rows.append({"prompt_id": pid, "round": 1, "sampler": "large", "temperature": 0.7, "sample_index": i,
                         "response": answer, "token_ids": [1], "r_help": r_help})
    rows.append({**rows[0], "sample_index": 9, "response": " ", "r_help": 1.0})  # blank: not a candidate
    result = rm_fidelity(pa.Table.from_pylist(rows, schema=SAMPLES), table)
    # p0: the right answer scores highest, both its pairs ordered right; p1: the RM prefers a wrong one, and of the
    # right answer's two pairs it orders one right (0.2 < 0.5 and 0.2 < 0.8: none right). Pairs: 4, right: 2.
    assert result["prompts"] == 2 and result["pairs"] == 4 and result["pair_accuracy"] == pytest.approx(0.5)
    # World v3's oracle gives a wrong answer written well 0.4. Means 0.6 each; oracle's best 1 each; the RM's picks 1
    # (p0) and 0.4 (p1): recovered (0.7 - 0.6) / (1 - 0.6).
    assert result["oracle_mean"] == pytest.approx(0.6) and result["oracle_best"] == 1.0
    assert result["rm_best"] == pytest.approx(0.7) and result["headroom_recovered"] == pytest.approx(0.25)
    # p0 is a lookup prompt, p1 a pick prompt: per family, both of p0's pairs right and neither of p1's; p0's pick
    # recovers all its headroom, p1's loses (0.4 - 0.6) / (1 - 0.6) = -0.5 of it.
    lookup, pick = result["by_family"]["lookup"], result["by_family"]["pick"]
    assert set(result["by_family"]) == {"lookup", "pick"}
    assert lookup["prompts"] == pick["prompts"] == 1 and lookup["pairs"] == pick["pairs"] == 2
    assert lookup["pair_accuracy"] == 1.0 and pick["pair_accuracy"] == 0.0
    assert lookup["headroom_recovered"] == pytest.approx(1.0) and pick["headroom_recovered"] == pytest.approx(-0.5)
