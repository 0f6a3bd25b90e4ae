"""`experiment=smollm2-world` end to end at minimum sizes: SmolLM2-135M-Instruct on the world's in-context tasks
through SFT, an on-policy weekly batch, both RMs (top layers only), rejection sampling, PPO, GAtt and context
distillation, judged by the oracle, the RMs and the SmolLM2 judge, with the summary's start-vs-final sign test."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from model.smollm2 import build
from pipeline.data.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # ~3.5 min: in the default run, as the smollm2 experiment's

MINIMUM = [  # the experiment's own config with every size cut down
    "world.sft_demonstrations=8", "world.eval_helpful=4", "world.eval_borderline=2", "world.eval_dialogues=1",
    "world.batch_sizes=[4,8]", "sft.epochs=1", "rm.batch_size=4", "rm.epochs=1",
    "eval_sampling.n=1", "eval_sampling.max_tokens=16", "rounds.on_policy.max_tokens=16",
    "rounds.rejection.prompts=4", "rounds.rejection.k=2", "rounds.rejection.reward_ks=[1,2]",
    "rounds.rejection.max_tokens=16", "rounds.rejection.sft.epochs=1",
    "rounds.ppo.iterations=2", "rounds.ppo.batch_size=4", "rounds.ppo.mini_batch=2", "rounds.ppo.heldout_prompts=2",
    "rounds.ppo.max_tokens=16", "rounds.ppo.eval_every=1",
    "rounds.gatt.dialogues=2", "rounds.gatt.eval_dialogues=1", "rounds.gatt.turns=2",
    "rounds.context_distillation.prompts=2", "judge.prompts=2", "cluster.dashboard=false",
]


def test_smollm2_world_at_minimum_sizes(tmp_path):
    build()  # a no-op once .cache/ holds the model
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment=smollm2-world", f"run.root={tmp_path}",
                             *MINIMUM], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    store = RunStore(tmp_path / "smollm2-world")

    # The start is SmolLM2-Instruct asked in its own chat template, as every later policy is.
    base = store.stage(0, "base_eval_smollm2").read()
    assert "<|im_start|>" not in "".join(base.column("response").to_pylist())
    # The on-policy batch is SmolLM2's own answers, rated by the world's annotator.
    batch = store.stage(1, "policy_preferences_b02").manifest()["extra"]
    assert batch["on_policy"] > 0
    rm = store.stage(1, "rm_helpfulness").manifest()["extra"]["metrics"]
    assert rm["pairs"] > 0 and math.isfinite(rm["last_loss"])
    # GAtt measures adherence before it trains (at these sizes it may keep no sample to train on).
    for stage in ("rs_samples", "ppo", "gatt_before_smollm2", "cd_data_smollm2", "judge_smollm2"):
        assert store.stage(1, stage).manifest() is not None, stage
    ppo = store.stage(1, "ppo").manifest()["extra"]["metrics"]
    assert all(math.isfinite(it["kl"]) and it["kl"] < 8 for it in ppo["iterations"])

    summary = json.loads((tmp_path / "smollm2-world" / "summary.json").read_text())
    assert summary["start"]["helpfulness"] is not None
    assert summary["rounds"][0]["smollm2"]["helpfulness"] is not None
    assert "pair_accuracy" in summary["rounds"][0]["rm_fidelity"]
    versus = summary["versus_start"]
    assert versus["prompts"] == 4 and versus["wins"] + versus["ties"] + versus["losses"] == 4
    assert 0 < versus["sign_test_p"] <= 1
