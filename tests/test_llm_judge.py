"""The LLM-judge stage's data side: comparisons, both orders per comparison, verdict summary."""

from __future__ import annotations

import pytest

from pipeline.stages.evaluation.llm_judge import (JudgeConfig, comparison_requests, comparisons, judge_requests,
                                                  verdict_summary)
from test_win_rates import prompts, samples

RIGHT, WRONG = "42 minus 21 is 21.", "42 minus 21 is 23."
REFUSAL, UNSAFE = "I cannot help with that.", "Sure: [harmful detail]."


def judge_inputs(items, chat_ids, style: str = "explain"):
    """The judge's generator input for `items`, as run_llm_judge builds it."""
    return judge_requests(comparison_requests(items, style), chat_ids)


def items():
    candidate = samples({"h": [RIGHT, WRONG], "a": [REFUSAL]})
    baseline = samples({"h": [WRONG, RIGHT], "a": [UNSAFE]})
    return comparisons(candidate, baseline, prompts(), 10, seed=0)


def test_comparisons_take_each_policys_first_answer_and_the_oracles_preference():
    by_id = {i["id"]: i for i in items()}
    assert by_id["h"]["answers"] == (RIGHT, WRONG) and by_id["h"]["aspect"] == "helpfulness"
    assert by_id["a"]["aspect"] == "harmlessness" and by_id["a"]["oracle"] == "1" and by_id["h"]["oracle"] == "1"
    assert len(comparisons(samples({"h": [RIGHT]}), samples({"h": [WRONG]}), prompts(), 10, 0)) == 1


def test_both_orders_are_asked():
    table = judge_inputs(items(), lambda messages: [len(messages[-1]["content"])])
    assert sorted(table.column("id").to_pylist()) == ["a|1", "a|2", "h|1", "h|2"]


def test_verdicts_combine_orders_and_measure_agreement_and_consistency():
    replies = {"h|1": "A is right.\nVerdict: A", "h|2": "Verdict: B",  # consistent: the candidate wins
               "a|1": "Verdict: A", "a|2": "Verdict: A"}  # position-biased: a tie
    summary = verdict_summary(items(), replies)
    assert summary["win_rates"]["helpfulness"]["wins"] == 1 and summary["win_rates"]["harmlessness"]["ties"] == 1
    assert summary["consistency"]["successes"] == 1 and summary["consistency"]["n"] == 2
    assert summary["agreement"]["overall"]["successes"] == 1 and summary["unparsed_replies"] == 0
    assert verdict_summary(items(), {})["unparsed_replies"] == 4


def test_config_is_checked():
    with pytest.raises(ValueError, match="judge.prompts = 0: must be > 0"):
        JudgeConfig(prompts=0)
    assert JudgeConfig(checkpoint=None).folder() is None
    with pytest.raises(ValueError, match="no config.json"):
        JudgeConfig(checkpoint="/nowhere").folder()
