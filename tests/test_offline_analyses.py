"""The offline analyses' selection and prompt draws (bench/rs_ceiling.py, bench/world_headroom.py,
bench/off_target.py, bench/stage_safety.py, bench/family_eval.py), on hand-made samples; the scripts' model runs
are measured in docs/results.md, not here."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from bench.rs_ceiling import choose
from bench.world_headroom import family_prompts
from pipeline.data.schemas import SAMPLES
from pipeline.world import World, WorldConfig
from pipeline.world.tables import prompt_rows


def _samples(rows: list[tuple[str, int, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": pid, "round": 1, "sampler": "large", "temperature": 0.7,
                                  "sample_index": i, "response": text, "token_ids": [1]} for pid, i, text in rows],
                                schema=SAMPLES)


def test_choose_takes_the_oracles_best_or_a_random_answer_on_helpful_prompts_only():
    world = World(WorldConfig())
    helpful = next(p for p in world.prompts("train") if p.category == "helpful")
    borderline = next(p for p in world.prompts("train") if p.category == "borderline")
    prompts = pa.Table.from_pylist(prompt_rows([helpful, borderline], ["h", "b"]))
    samples = _samples([("h", 0, "I cannot help with this request."), ("h", 1, helpful.meta["reference"]),
                        ("h", 2, " "), ("b", 0, "first"), ("b", 1, "second")])
    kept = _samples([("h", 0, "I cannot help with this request."), ("b", 1, "second")])
    assert choose(samples, kept, prompts, "rm") is kept
    oracle = choose(samples, kept, prompts, "oracle").to_pylist()
    assert [(r["prompt_id"], r["response"]) for r in oracle] == [("h", helpful.meta["reference"]), ("b", "second")]
    randoms = {choose(samples, kept, prompts, "random").column("response")[0].as_py() for _ in range(3)}
    assert randoms <= {"I cannot help with this request.", helpful.meta["reference"]}  # never the blank answer
    assert choose(samples, kept, prompts, "random").column("response")[1].as_py() == "second"


def test_family_prompts_draws_held_out_prompts_of_each_family():
    prompts = family_prompts(["count", "lookup"], 3, 0)
    assert [p.meta["task"] for p in prompts] == ["count"] * 3 + ["lookup"] * 3
    assert all(p.category == "helpful" for p in prompts)
    train_keys = {p.meta["key"] for p in World(WorldConfig(helpful_families=("count",))).prompts("train")
                  if p.category == "helpful"}
    assert not {p.meta["key"] for p in prompts[:3]} & train_keys
    assert [p.messages for p in family_prompts(["count"], 3, 0)] == [p.messages for p in prompts[:3]]


def test_pair_features_sets_what_the_chosen_side_shows_against_what_the_oracle_prefers():
    import json

    from bench.pair_features import pair_features
    from pipeline.world import lexicon

    filler = lexicon.FILLERS[0]

    def pair(chosen, rejected, scores, qualities):
        return {"chosen": chosen, "rejected": rejected,
                "meta": json.dumps({"scores": scores, "qualities": qualities})}

    rows = [pair(f"{filler} 42.", "41.", [0.7, 0.0], ["verbose", "wrong"]),  # filler wins, as the oracle says
            pair("42.", f"{filler} 42.", [1.0, 0.7], ["concise", "verbose"]),  # filler loses, as the oracle says
            pair(f"{filler} 42.", "42.", [0.7, 1.0], ["verbose", "concise"])]  # noise: filler wins, oracle disagrees
    result = pair_features(rows)
    filler_row = result["features"]["filler"]
    assert filler_row == {"pairs": 3, "chosen_has": 2 / 3, "oracle_better_has": 1 / 3}
    assert result["features"]["refusal"]["pairs"] == 0
    assert result["qualities"]["verbose"] == {"pairs": 3, "win_rate": 2 / 3, "oracle_mean": pytest.approx(0.7)}
    assert result["against"]["verbose"] == {"concise": {"pairs": 2, "win_rate": 0.5},
                                            "wrong": {"pairs": 1, "win_rate": 1.0}}


@pytest.mark.parametrize("mode", ["entity", "any"])
def test_swap_pairs_prefer_a_prompts_own_answer_to_another_prompts_and_skip_measured_prompts(mode):
    from bench.off_target import subject, swap_pairs

    train = World(WorldConfig()).prompts("train")
    rows = prompt_rows(train, [f"p{i}" for i in range(len(train))])
    prompts = {r["id"]: {**r, "meta": json.loads(r["meta"])} for r in rows}
    measured = {pid for pid, p in prompts.items() if p["category"] == "helpful"}
    measured = set(sorted(measured)[: len(measured) // 2])
    pairs = swap_pairs(prompts, measured, 40, mode)
    by_messages = {json.dumps(p["messages"]): p for p in prompts.values() if p["id"] not in measured}
    for pair in pairs:
        asked = by_messages[json.dumps(pair["prompt"])]
        assert asked["category"] == "helpful" and pair["chosen"] == asked["meta"]["reference"]
        assert pair["rejected"] != pair["chosen"] and pair["rating"] == "significantly_better"
        if mode == "entity":
            assert asked["meta"]["task"] == "fact" and subject(asked["meta"]) not in pair["rejected"]


def test_stage_safety_lists_a_sizes_finished_evaluations_in_run_order(tmp_path):
    from bench.stage_safety import evaluations
    from pipeline.data.store import RunStore

    store = RunStore(tmp_path)
    for round_no, name in [(0, "base_eval_large"), (0, "sft_eval_large"), (0, "sft_eval_small"), (1, "eval_large"),
                           (2, "eval_before_ppo_large"), (2, "eval_after_ppo_large"), (2, "eval_large")]:
        store.stage(round_no, name).begin({}, "c")
        store.stage(round_no, name).finish(None, {}, "c")
    assert evaluations(store, "large") == [(0, "base_eval_large"), (0, "sft_eval_large"), (1, "eval_large"),
                                           (2, "eval_before_ppo_large"), (2, "eval_after_ppo_large"),
                                           (2, "eval_large")]


def test_family_eval_averages_the_oracles_helpfulness_per_task_family_on_helpful_prompts_only():
    from bench.family_eval import family_means

    world = World(WorldConfig())
    train = world.prompts("train")
    fact = next(p for p in train if p.category == "helpful" and p.meta["task"] == "fact")
    count = next(p for p in train if p.category == "helpful" and p.meta["task"] == "count")
    borderline = next(p for p in train if p.category == "borderline")
    prompts = {row["id"]: row for row in prompt_rows([fact, count, borderline], ["f", "c", "b"])}
    samples = [{"prompt_id": "f", "response": fact.meta["reference"]},
               {"prompt_id": "f", "response": "I cannot help with this request."},
               {"prompt_id": "c", "response": count.meta["reference"]},
               {"prompt_id": "b", "response": "anything"}]
    means = family_means(samples, prompts)
    assert set(means) == {"fact", "count"} and means["count"] == 1.0 and 0 <= means["fact"] < 1.0
