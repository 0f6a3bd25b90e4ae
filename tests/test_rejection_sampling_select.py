"""Rejection sampling's selection: best of K, the all-rounds merge, the max/median curve, SFT conversion."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.data.schemas import DEMONSTRATIONS, PROMPTS, SAMPLES
from pipeline.stages.rejection_sampling.algorithm import (best_per_prompt, kept_as_demonstrations, mark_chosen,
                                                       merge_with_earlier, reward_vs_k)


def samples(rows: list[tuple], round_: int = 1) -> pa.Table:
    """A SAMPLES table from (prompt_id, sample_index, r_combined) rows; the other columns get plausible fillers."""
    full = [{"prompt_id": pid, "round": round_, "sampler": f"policy-r{round_}", "temperature": 1.0,
             "sample_index": i, "is_safety": False, "prompt_token_ids": [1, 2], "response": f"{pid} r{round_} s{i}",
             "token_ids": [3, 4], "logprobs": [-0.5, -0.5], "finish_reason": "stop", "r_help": r, "r_safe": 0.9,
             "r_combined": r, "chosen": None} for pid, i, r in rows]
    return pa.Table.from_pylist(full, schema=SAMPLES)


def picked(table: pa.Table) -> list[tuple[str, int, int]]:
    return [(r["prompt_id"], r["round"], r["sample_index"]) for r in table.to_pylist()]


def test_best_per_prompt_picks_highest_reward_sorted_by_prompt():
    t = samples([("b", 0, 0.2), ("a", 0, 0.1), ("b", 1, 0.7), ("a", 1, 0.9), ("a", 2, 0.5), ("b", 2, 0.3)])
    best = best_per_prompt(t)
    assert picked(best) == [("a", 1, 1), ("b", 1, 1)]
    assert best.column("chosen").to_pylist() == [True, True]
    assert best.schema == SAMPLES and best.schema.metadata == SAMPLES.metadata


def test_best_per_prompt_breaks_ties_by_lowest_sample_index():
    t = samples([("a", 3, 0.8), ("a", 1, 0.8), ("a", 0, 0.2), ("a", 2, 0.8)])
    assert picked(best_per_prompt(t)) == [("a", 1, 1)]
    assert picked(best_per_prompt(t.take([3, 2, 1, 0]))) == [("a", 1, 1)]  # row order does not matter


def test_an_answer_cut_at_max_tokens_is_kept_last_or_never():
    """"a": its best answer was cut, a worse one finished; "b": every answer was cut."""
    t = samples([("a", 0, 0.9), ("a", 1, 0.4), ("a", 2, 0.6), ("b", 0, 0.3), ("b", 1, 0.8)])
    cut = [True, False, False, True, True]
    t = t.set_column(t.schema.get_field_index("finish_reason"), SAMPLES.field("finish_reason"),
                     pa.array(["length" if c else "stop" for c in cut]))
    assert picked(best_per_prompt(t, "keep")) == [("a", 1, 0), ("b", 1, 1)]  # by reward alone
    assert picked(best_per_prompt(t, "last")) == [("a", 1, 2), ("b", 1, 1)]  # the best finished one, else the best
    assert picked(best_per_prompt(t, "drop")) == [("a", 1, 2)]
    with pytest.raises(ValueError, match="truncated 'sometimes'"):
        best_per_prompt(t, "sometimes")


def test_unscored_sample_names_the_first_prompt():
    t = samples([("a", 0, 0.5), ("b", 0, None), ("c", 0, None)])
    with pytest.raises(ValueError, match="'b'"):
        best_per_prompt(t)
    with pytest.raises(ValueError, match="'b'"):
        mark_chosen(t)


def test_empty_table_gives_empty_samples():
    best = best_per_prompt(samples([]))
    assert best.num_rows == 0 and best.schema == SAMPLES


def test_mark_chosen_keeps_rows_in_order():
    t = samples([("b", 0, 0.2), ("a", 0, 0.1), ("b", 1, 0.7), ("a", 1, 0.9), ("a", 2, 0.9)])
    marked = mark_chosen(t)
    assert picked(marked) == picked(t)
    assert marked.column("chosen").to_pylist() == [False, False, True, True, False]
    assert marked.schema == SAMPLES


def test_all_rounds_keeps_better_earlier_answers_and_adds_new_prompts():
    earlier = best_per_prompt(samples([("a", 0, 0.9), ("b", 0, 0.2), ("c", 0, 0.5), ("old", 0, 0.4)], round_=1))
    current = best_per_prompt(samples([("a", 1, 0.6), ("b", 1, 0.8), ("c", 1, 0.5), ("new", 1, 0.3)], round_=2))
    merged = merge_with_earlier(current, earlier, "all_rounds")
    # a: the earlier answer is better; b: the new one; c: tie, the earlier stays; old kept; new added.
    assert picked(merged) == [("a", 1, 0), ("b", 2, 1), ("c", 1, 0), ("new", 2, 1), ("old", 1, 0)]
    assert merged.column("chosen").to_pylist() == [True] * 5
    assert merged.schema == SAMPLES
    assert picked(merge_with_earlier(current, None, "all_rounds")) == picked(current)


def test_last_round_keeps_only_the_current_best():
    earlier = best_per_prompt(samples([("a", 0, 0.9), ("old", 0, 0.4)], round_=1))
    current = best_per_prompt(samples([("a", 1, 0.6), ("new", 1, 0.3)], round_=2))
    assert picked(merge_with_earlier(current, earlier, "last_round")) == [("a", 2, 1), ("new", 2, 1)]


def test_merge_rejects_unknown_mode_and_repeated_prompts():
    current = best_per_prompt(samples([("a", 0, 0.6)]))
    with pytest.raises(ValueError, match="all_rounds.*last_round"):
        merge_with_earlier(current, None, "best_ever")
    with pytest.raises(ValueError, match="more than once"):
        merge_with_earlier(samples([("a", 0, 0.6), ("a", 1, 0.7)]), None, "all_rounds")


def test_reward_vs_k_on_a_hand_example():
    # Stored out of order: the first k are taken by sample_index, not by row.
    t = samples([("a", 2, 0.5), ("a", 0, 0.1), ("a", 3, 0.3), ("a", 1, 0.9)])
    curve = reward_vs_k(t, [1, 2, 4])
    assert [c["k"] for c in curve] == [1, 2, 4] and all(c["prompts"] == 1 for c in curve)
    assert [c["max"] for c in curve] == pytest.approx([0.1, 0.9, 0.9])
    assert [c["median"] for c in curve] == pytest.approx([0.1, 0.5, 0.4])


def test_reward_vs_k_averages_over_prompts_and_checks_k():
    t = samples([("a", 0, 0.1), ("a", 1, 0.9), ("b", 0, 0.3), ("b", 1, 0.5)])
    (k2,) = reward_vs_k(t, [2])
    assert k2["max"] == pytest.approx((0.9 + 0.5) / 2) and k2["median"] == pytest.approx((0.5 + 0.4) / 2)
    assert k2["prompts"] == 2
    with pytest.raises(ValueError, match="k=3"):
        reward_vs_k(t, [3])
    with pytest.raises(ValueError, match="positive"):
        reward_vs_k(t, [0])
    with pytest.raises(ValueError, match="twice"):
        reward_vs_k(pa.concat_tables([t, samples([("a", 0, 0.2)], round_=2)]), [1])


def prompts_table(ids: list[str]) -> pa.Table:
    """PROMPTS rows; the id "s" is a safety prompt."""
    rows = [{"id": pid, "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": f"Q {pid}"}],
             "category": "illicit_criminal" if pid == "s" else "helpful",
             "attack_vector": "direct" if pid == "s" else None, "is_safety": pid == "s",
             "meta": json.dumps({"key": pid})} for pid in ids]
    return pa.Table.from_pylist(rows, schema=PROMPTS)


def test_kept_as_demonstrations_appends_the_answer():
    kept = best_per_prompt(samples([("h", 0, 0.2), ("h", 1, 0.7), ("s", 0, 0.6)], round_=3))
    demos = kept_as_demonstrations(kept, prompts_table(["s", "h", "unused"]))
    assert demos.schema == DEMONSTRATIONS
    rows = demos.to_pylist()
    assert [r["id"] for r in rows] == ["h", "s"]
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q h"},
                                   {"role": "assistant", "content": "h r3 s1"}]
    assert rows[0]["category"] == "helpful" and rows[0]["source"] == "rejection_sampling"
    meta = json.loads(rows[0]["meta"])
    assert meta["key"] == "h" and meta["rejection_sampling"]["round"] == 3
    assert meta["rejection_sampling"]["sample_index"] == 1
    assert meta["rejection_sampling"]["r_combined"] == pytest.approx(0.7)
    assert json.loads(rows[1]["meta"])["attack_vector"] == "direct"


def test_kept_prompt_missing_from_prompts_is_named():
    kept = best_per_prompt(samples([("h", 0, 0.2), ("gone", 0, 0.5)]))
    with pytest.raises(ValueError, match="'gone'"):
        kept_as_demonstrations(kept, prompts_table(["h"]))


def test_blank_answers_cannot_be_kept_and_answers_are_trimmed():
    from pipeline.stages.rejection_sampling.stage import answered

    table = samples([("a", 0, 0.9), ("a", 1, 0.5), ("b", 0, 0.7)])
    table = table.set_column(table.schema.get_field_index("response"), SAMPLES.field("response"),
                             pa.array(["  ", " fine answer ", ""]))
    best = best_per_prompt(answered(table))
    assert picked(best) == [("a", 1, 1)] and best.column("response").to_pylist() == ["fine answer"]
