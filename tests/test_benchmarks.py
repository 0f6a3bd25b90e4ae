"""The benchmarks against the peers (bench/): each runs in quick mode and prints its table. No timing is checked.

`python -m bench --quick --reps 1` runs once for the module (one Ray instance, one set of pools, the vLLM engines
started once); each test then reads its benchmark's table from the output and its rows from the JSON. TRL's sides
run only where TRL is importable (the `bench` extra): there they must show numbers, elsewhere a row that says TRL
is not installed. Independent of the installed extras either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import alternate, markdown_table, spread
from bench.run_all import BENCHMARKS, parse

ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.long]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--reps", "1", "--json", str(out / "bench.json"),
                           "--markdown", str(out / "bench.md")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert (out / "bench.md").read_text().startswith("## Benchmarks (quick mode)")
    return proc.stdout, json.loads((out / "bench.json").read_text())


def section(results: dict, name: str) -> dict:
    return next(s for s in results["sections"] if s["name"] == name)


def table_lines(stdout: str, title: str) -> list[str]:
    """The Markdown table printed under `### title`."""
    lines = stdout.splitlines()
    start = lines.index(f"### {title}")
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) >= 3, f"no table under {title!r}"
    return table


def test_helpers_alternate_and_format():
    calls = []
    results = alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, reps=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # one warm-up each, then alternating
    assert results == {"a": [1, 1], "b": [2, 2]}
    assert spread([3.0, 1.0, 2.0], ".1f") == "2.0 (1.0-3.0)"
    assert markdown_table(["x", "y"], [[1, 2]]).splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(SystemExit):
        parse(["--only", "nope"])
    assert parse(["--only", "rm,ppo"]).names == ["rm", "ppo"]


def test_every_benchmark_has_a_section(quick_run):
    stdout, results = quick_run
    assert [s["name"] for s in results["sections"]] == list(BENCHMARKS)
    assert results["machine"]["cpus"] and results["machine"]["torch"]
    assert stdout.startswith("## Benchmarks (quick mode)")


def test_rm_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Reward-model training: ours vs TRL RewardTrainer")
    assert "acc significantly better" in table[0] and table[2].startswith("| ours |")
    rows = section(results, "rm")["rows"]
    assert 0 <= rows[0]["accuracy"]["avg"] <= 1 and rows[0]["epoch_s"]["median"] > 0
    assert rows[1]["side"] == "ours, rm.group_by_length=8" and rows[1]["epoch_s"]["median"] > 0
    if HAS_TRL:
        assert len(rows) == 3 and "RewardTrainer" in rows[2]["side"] and rows[2]["epoch_s"]["median"] > 0
    else:
        assert "TRL is not installed" in table[4]


def test_ppo_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Policy optimisation: one iteration, ours vs TRL PPO and RLOO")
    assert "generate s" in table[0] and table[2].startswith("| ours (gae) |") and table[3].startswith("| ours (rloo) |")
    rows = section(results, "ppo")["rows"]
    assert all(r["samples_per_s"]["median"] > 0 and r["split_s"]["sync"] > 0 for r in rows[:2])
    if HAS_TRL:
        assert [r["side"].split()[-1] for r in rows[2:]] == ["PPOTrainer", "RLOOTrainer"]
        assert all(r["samples_per_s"]["median"] > 0 for r in rows)
        assert [r["ours"] for r in rows[2:]] == ["ours (gae)", "ours (rloo)"]
    else:
        assert sum("TRL is not installed" in line for line in table) == 2


def test_generation_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Generation: generator pool vs raw vLLM vs transformers generate")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "4", "16", "64"]
    for row in section(results, "generation")["rows"]:
        assert all(row[side]["median"] > 0 for side in ("generator pool", "raw vLLM", "transformers generate"))


def test_sync_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Weight sync: trainer -> generator vs a raw in-memory copy")
    assert table[2].startswith("| tiny large |")
    [row] = section(results, "sync")["rows"]
    assert row["bytes"] > 4 * row["parameters"] - 1 and row["ours_s"]["median"] > 0 and row["raw_copy_s"]["median"] > 0


def test_flops_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Training efficiency: trainer FLOP/s vs a plain matmul")
    assert "share of matmul" in table[0]
    [row] = section(results, "flops")["rows"]
    assert row["train_flops"]["median"] > 0 and row["matmul_flops"]["median"] > 0


def test_rejection_table(quick_run):
    stdout, results = quick_run
    table = table_lines(stdout, "Cost growth: a rejection-sampling round as prompts double")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1x", "2x", "4x"]
    rows = section(results, "rejection")["rows"]
    assert [r["prompts"] for r in rows] == [rows[0]["prompts"] * m for m in (1, 2, 4)]
