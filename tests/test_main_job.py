"""The README's main job (`python -m pipeline`) end to end at quick sizes, and a re-run that reuses every stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from model.checkpoint import load_checkpoint
from pipeline.config.run import RunConfig
from pipeline.data.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def run_main(root):
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment=quick", f"run.root={root}"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_main_job_runs_round_zero_and_resumes_from_the_store(tmp_path):
    run_dir = tmp_path / "quick"
    first = run_main(tmp_path)
    assert "== world (built)" in first and "== pretrain (trained, " in first
    store = RunStore(run_dir)
    models = store.stage(0, "pretrain").manifest()["extra"]["models"]
    assert [m["size"] for m in models] == ["small", "large"]
    for m in models:
        assert load_checkpoint(store.stage(0, "pretrain").path / m["checkpoint"]).num_parameters == m["parameters"]
        assert 1 < m["heldout_perplexity"] < 512
        samples = store.stage(0, f"base_eval_{m['size']}").read()
        prompts = store.stage(0, "world_prompts_eval").read()
        single_turn = [c for c in prompts.column("category").to_pylist() if c != "dialogue"]
        per_prompt = RunConfig().eval_sampling.n
        assert samples.num_rows == per_prompt * len(single_turn)  # every single-turn prompt answered n times
        assert set(samples.column("prompt_id").to_pylist()) <= set(prompts.column("id").to_pylist())
        assert re.search(rf"^  {m['size']}\s+helpful\s+\d+\s+\d\.\d\d", first, re.M)  # the oracle's table
    # Round 1: RMs, rejection sampling (K samples per prompt, one kept per prompt), distillation, PPO, evaluation.
    config = RunConfig().rounds  # the quick experiment's values are checked through the stage outputs
    rs = store.stage(1, "rs_samples").read()
    kept = store.stage(1, "rs_kept").read()
    per_prompt = rs.group_by("prompt_id").aggregate([("sample_index", "count")]).column("sample_index_count")
    assert set(per_prompt.to_pylist()) == {4} and kept.num_rows <= rs.num_rows // 4
    assert all(kept.column("chosen").to_pylist()) and None not in rs.column("r_combined").to_pylist()
    for name in ("rm_helpfulness", "rm_safety", "rs_sft_small", "rs_sft_large", "ppo", "eval_small", "eval_large"):
        assert store.stage(1, name).manifest() is not None, name
    # GAtt: only the largest policy samples; the small one trains on its samples (gatt.distil).
    gatt_data = store.stage(1, "gatt_data_large").manifest()
    assert gatt_data is not None and store.stage(1, "gatt_data_small").manifest() is None
    if gatt_data["rows"]:
        assert store.stage(1, "gatt_sft_small").manifest()["input_digests"]["dialogues"] == gatt_data["content_digest"]
    ppo = store.stage(1, "ppo").manifest()["extra"]["metrics"]
    assert len(ppo["iterations"]) >= 1 and {"kl", "r_combined", "sync_s"} <= set(ppo["iterations"][0])
    assert "== round 1" in first and re.search(r"^  1\s+large\s+\d\.\d\d", first, re.M)
    assert config.count >= 1
    # Weekly batch 2 (round 1 ingests batches 1-2) is on-policy: mostly the SFT policies' own answers, rated.
    on_policy = store.stage(1, "policy_preferences_b02")
    made = on_policy.manifest()["extra"]
    batch_2 = store.stage(0, "world_preferences_b02").manifest()["rows"]
    assert made["on_policy"] > made["prebuilt"] and made["on_policy"] + made["prebuilt"] == batch_2
    assert set(on_policy.read().column("source").to_pylist()) == {"policy", "world"}
    # The summary, with the helpfulness RM's fidelity on the round's own samples (seeded, so the same each run).
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"] == "quick" and summary["seed"] == 0 and summary["minutes"] > 0
    assert set(summary["sft"]) == {"small", "large"} and summary["sft"]["large"]["helpfulness"] is not None
    # Measured on every headline helpful prompt the round sampled (the quick policies answer too few right for the
    # oracle to tell many of their answers apart: the default run's numbers are in docs/results.md).
    fidelity = summary["rounds"][0]["rm_fidelity"]
    assert fidelity["prompts"] > 0 and fidelity["oracle_best"] >= fidelity["oracle_mean"]
    assert sum(family["pairs"] for family in fidelity["by_family"].values()) == fidelity["pairs"]
    assert summary["ppo"]["start_heldout_rc"] is not None and summary["rounds"][0]["win_rate"]["oracle"]
    # Win rates against the SFT model (RMs and oracle) and the run report with its plots.
    wins = store.stage(1, "winrate_large").manifest()["extra"]
    assert set(wins["win_rates"]) == {"reward models", "oracle"}
    asked_for_help = sum(c in ("helpful", "borderline") for c in prompts.column("category").to_pylist())
    assert sum(wins["win_rates"]["oracle"]["helpfulness"][k] for k in ("wins", "ties", "losses")) == asked_for_help
    report = (run_dir / "report.md").read_text()
    for plot in ("win_rate", "reward_vs_k", "rm_accuracy", "ppo"):
        assert f"plots/{plot}.png" in report and (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").iterdir())
    manifests = {p: p.read_text() for p in run_dir.rglob("manifest.json")}

    second = run_main(tmp_path)
    assert "== world (cached)" in second and "== pretrain (cached)" in second
    assert {p: p.read_text() for p in run_dir.rglob("manifest.json")} == manifests  # nothing recomputed
    assert json.loads(next(iter(manifests.values())))["code_version"]
