"""The run report: Markdown, PNG plots and TensorBoard events from per-round results; missing data is skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.evaluation.safety_metrics import SafetyRow, safety_metrics
from pipeline.evaluation.winrate import Proportion, WinRate
from pipeline.output.report import (EVENTS, PLOTS, REPORT, SECTIONS, TENSORBOARD, RoundResults, RunResults,
                                    render_report, scalars)
from pipeline.stages.gatt.algorithm import TurnAdherence
from pipeline.world import Verdict


def _accuracy(values: tuple[float, ...], pairs: int = 100) -> dict:
    columns = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure", "avg")
    return {"pairs": pairs, "accuracy": dict(zip(columns, values))}


def full_results() -> RunResults:
    rounds = []
    for r in (1, 2, 3):
        safety = safety_metrics(
            [SafetyRow("illicit_criminal", "authority", Verdict(1.0, 0.0, False, False)),
             SafetyRow("hateful_harmful", "metaphor", Verdict(0.3, 0.8, True, True)),
             SafetyRow("borderline", None, Verdict(0.0, 1.0, True, r == 1)),
             SafetyRow("helpful", None, Verdict(1.0, 1.0, True, False))])
        rounds.append(RoundResults(
            round=r, label=f"RLHF-V{r}",
            win_rates={"reward models": {"helpfulness": WinRate(20 + 5 * r, 10, 30 - 5 * r),
                                         "harmlessness": WinRate(25 + 4 * r, 5, 30 - 4 * r)},
                       "judge tiny-large": {"helpfulness": WinRate(18 + r, 20, 22 - r, invalid=1),
                                            "harmlessness": WinRate(21, 18, 20)}},
            reward_vs_k=[{"k": k, "max": 0.7 + 0.01 * k + 0.01 * r, "median": 0.7, "prompts": 400}
                         for k in (1, 2, 4, 8)],
            reward_vs_temperature=[{"temperature": t, "k": 8, "max": 0.7 + 0.05 * t, "median": 0.72 - 0.02 * t,
                                    "prompts": 400} for t in (0.7, 1.0, 1.3)],
            rm_accuracy={(rm, test): _accuracy((0.9, 0.75, 0.7, 0.45, 0.77 + 0.01 * r))
                         for rm in ("helpfulness", "safety") for test in ("helpfulness", "safety")},
            gatt_adherence={"before GAtt": [TurnAdherence(t, 20, k) for t, k in ((1, 20), (2, 18), (4, 4), (6, 0))],
                            "GAtt": [TurnAdherence(t, 20, k) for t, k in ((1, 20), (2, 20), (4, 19), (6, 18))]}
            if r == 3 else {},
            ppo_iterations=[{"iteration": i, "r_combined": 0.66 + 0.01 * i, "kl": 0.02 * i, "r_help": 0.5}
                            for i in range(1, 6)] if r == 3 else [],
            ppo_heldout=[{"iteration": i, "heldout_reward": 0.74 - 0.001 * i} for i in (0, 2, 4, 5)] if r == 3 else [],
            safety=safety,
            judge_trust={"reward models (helpfulness)": {"agreement": Proportion(30, 60)},
                         "LLM judge": {"agreement": Proportion(20, 48), "consistency": Proportion(12, 48)}}))
    return RunResults(name="tiny", rounds=rounds, baseline="SFT (large)")


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / TENSORBOARD))
    events.Reload()
    return events


def test_report_with_every_plot(tmp_path: Path):
    path = render_report(tmp_path, full_results())
    assert path == tmp_path / REPORT
    text = path.read_text()
    assert "Skipped" not in text
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", text)
    expected = {f"{PLOTS}/{name}.png" for name, _, _ in SECTIONS if name not in ("safety", "judge_trust")}  # tables
    assert set(linked) == expected
    for link in linked:
        with Image.open(tmp_path / link) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()
    # The paper's numbers sit beside ours, and the figures that carry the arithmetic are in the tables.
    assert "| | | paper | 80.7 | 67.5 | 60.9 | 54.7 | 63.2 |" in text  # Table 8, from reward_model.PAPER_TABLE8
    assert "| 4 | 20.0 | 95.0 | 10 | 100 |" in text  # Table 30 (gatt.adherence_table): turn 4, ours, paper's
    assert "| RLHF-V3 | reward models | helpfulness | 35/10/15 | 70.0% (" in text
    assert "(1 invalid)" in text
    assert "| RLHF-V1 | 8 | 0.790 | 0.700 | 0.090 |" in text
    assert "| authority | 100.0% (" in text
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files behind


def test_a_run_from_files_shows_accuracy_per_source_beside_table_7(tmp_path: Path):
    results = full_results()
    for (rm, test), metrics in results.rounds[-1].rm_accuracy.items():
        metrics["by_source"] = {"dpo_en_demo.json": {"pairs": 17, "accuracy": 0.588}} if test == "helpfulness" else {
            "safety_pairs.jsonl": {"pairs": 32, "accuracy": 0.97 if rm == "safety" else 0.5}}
    text = render_report(tmp_path, results).read_text()
    assert "| ours: RM | dpo_en_demo.json (n=17) | safety_pairs.jsonl (n=32) |" in text
    assert "| Safety RM | 58.8 | 97.0 |" in text and "| Helpfulness RM | 63.2 | 62.8 | 72.0 |" in text
    assert "Table 7" not in render_report(tmp_path / "world", full_results()).read_text()


def test_tensorboard_events_hold_the_report_scalars(tmp_path: Path):
    results = full_results()
    render_report(tmp_path, results)
    assert [p.name for p in (tmp_path / TENSORBOARD).iterdir()] == [EVENTS]
    events = _events(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert tags == {s.tag for s in scalars(results)}
    win = events.Scalars("win_rate/reward_models/helpfulness")
    assert [(e.step, round(e.value, 4)) for e in win] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [e.step for e in events.Scalars("reward_vs_k/round_01/max")] == [1, 2, 4, 8]
    assert [e.step for e in events.Scalars("reward_vs_temperature_x100/round_02/max")] == [70, 100, 130]
    assert [e.step for e in events.Scalars("ppo/round_03/kl")] == [1, 2, 3, 4, 5]
    assert events.Scalars("safety/false_refusal")[0].value == pytest.approx(1.0)
    assert "rm_accuracy/helpfulness_rm/helpfulness_pairs/avg" in tags and "gatt_adherence/round_03/GAtt" in tags
    # A re-render replaces the file: TensorBoard sees one run, not two.
    render_report(tmp_path, results)
    assert len(list((tmp_path / TENSORBOARD).iterdir())) == 1
    assert len(_events(tmp_path).Scalars("win_rate/reward_models/helpfulness")) == 3


def test_missing_data_is_skipped_with_a_note(tmp_path: Path):
    render_report(tmp_path, full_results())  # every plot present first: stale ones must go
    only_k = RunResults(name="partial", rounds=[
        RoundResults(round=1, reward_vs_k=[{"k": 1, "max": 0.7, "median": 0.7}, {"k": 4, "max": 0.8, "median": 0.7}]),
        RoundResults(round=2)])
    text = render_report(tmp_path, only_k).read_text()
    assert "![Max and median reward against K (Figure 7)](plots/reward_vs_k.png)" in text
    assert "| round 1 | 4 | 0.800 | 0.700 | 0.100 |" in text
    skipped = re.findall(r"^_Skipped: (.*)\._$", text, flags=re.MULTILINE)
    assert len(skipped) == len(SECTIONS) - 1
    assert "no round has `win_rates` data" in skipped and "no round has `ppo_iterations` data" in skipped
    assert sorted(p.name for p in (tmp_path / PLOTS).iterdir()) == ["reward_vs_k.png"]
    assert set(_events(tmp_path).Tags()["scalars"]) == {"reward_vs_k/round_01/max", "reward_vs_k/round_01/median"}


def test_empty_run_still_renders(tmp_path: Path):
    text = render_report(tmp_path, RunResults(name="nothing")).read_text()
    assert text.startswith("# Run report: nothing")
    assert text.count("_Skipped:") == len(SECTIONS)
    assert (tmp_path / TENSORBOARD / EVENTS).is_file()


def test_a_judge_with_one_aspect_is_tabled_not_plotted(tmp_path: Path):
    results = RunResults(name="one-aspect", rounds=[
        RoundResults(round=1, win_rates={"oracle": {"helpfulness": WinRate(3, 1, 1)}})])
    text = render_report(tmp_path, results).read_text()
    assert "| round 1 | oracle | helpfulness | 3/1/1 | 75.0% (" in text
    with Image.open(tmp_path / PLOTS / "win_rate.png") as image:
        image.verify()
