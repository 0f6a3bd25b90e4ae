"""`experiment=smollm2` end to end at minimum sizes: the set-up (model and data from the package registry), then
SFT, both RMs, rejection sampling, PPO, GAtt on the set-up's instruction and dialogue files (adherence judged by
the LLM judge), context distillation, evaluation by the RMs and the SmolLM2 judge, and the report (~6 min)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from pipeline.data.store import RunStore
from scripts.setup_smollm2 import setup

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MINIMUM = [  # the experiment's own config with every size cut down
    "data.sft.0.limit=12", "data.helpfulness.0.limit=6", "data.helpfulness.1.limit=12", "data.safety.0.limit=12",
    "data.max_tokens=320", "data.eval_prompts=3", "rm.batch_size=4",
    "rounds.rejection.prompts=4", "rounds.rejection.k=2", "rounds.rejection.reward_ks=[1,2]",
    "rounds.rejection.max_tokens=24", "rounds.ppo.iterations=2", "rounds.ppo.batch_size=4", "rounds.ppo.mini_batch=2",
    "rounds.ppo.heldout_prompts=2", "rounds.ppo.max_tokens=24", "rounds.ppo.eval_every=1",
    "eval_sampling.max_tokens=24", "judge.prompts=2", "cluster.dashboard=false",
    "rounds.gatt.dialogues=2", "rounds.gatt.eval_dialogues=2", "rounds.gatt.turns=2", "rounds.gatt.sft.seq_len=512",
    "rounds.context_distillation.prompts=2",
]


def test_smollm2_experiment_at_minimum_sizes(tmp_path):
    setup()  # a no-op once .cache/ holds the model and the data
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment=smollm2", f"run.root={tmp_path}",
                             *MINIMUM], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    store = RunStore(tmp_path / "smollm2")

    # Data from the files, in the model's own chat template; rejected rows kept with their reason.
    assert store.stage(0, "data_demonstrations").read().num_rows == 12
    rejects = store.stage(0, "data_rejects").read()
    assert rejects.num_rows > 0 and all(rejects.column("reason").to_pylist())
    samples = store.stage(0, "sft_eval_smollm2").read()
    assert samples.num_rows > 0 and "<|im_start|>" not in "".join(samples.column("response").to_pylist())

    # Both RMs with held-out accuracy per source (dpo_en_demo.json reported on its own).
    rm = store.stage(1, "rm_helpfulness").manifest()["extra"]["metrics"]
    assert "dpo_en_demo.json" in rm["heldout"]["helpfulness"]["by_source"]
    assert re.search(r"^\| ours: RM \| .*dpo_en_demo\.json \(n=\d+\)", out, re.M)  # beside the paper's Table 7
    assert re.search(r"^\| Helpfulness RM \| \d+\.\d \|", out, re.M) and "Anthropic Helpful" in out

    # Rejection sampling, then PPO with a bounded KL; rewards on held-out prompts before and after PPO.
    assert store.stage(1, "rs_samples").read().num_rows == 8
    # Only finished answers are kept (`truncated: drop`); at 24 tokens most are cut, maybe all: then no fine-tuning.
    kept = store.stage(1, "rs_kept").read()
    assert set(kept.column("finish_reason").to_pylist()) <= {"stop"}
    assert (store.stage(1, "rs_sft_smollm2").manifest() is not None) == (kept.num_rows > 0)
    assert (kept.num_rows == 0) == ("nothing to fine-tune on" in out)
    ppo = store.stage(1, "ppo").manifest()["extra"]["metrics"]
    assert all(math.isfinite(it["kl"]) and it["kl"] < 8 for it in ppo["iterations"])
    for key in ("winrate_before_ppo_smollm2", "winrate_smollm2"):
        means = store.stage(1, key).manifest()["extra"]["mean_scores"]
        assert 0 <= means["candidate"]["helpfulness"] <= 1 and 0 <= means["baseline"]["helpfulness"] <= 1
    assert re.search(r"^  1\s+smollm2 before PPO\s+\d\.\d{3} -> \d\.\d{3}", out, re.M)

    # GAtt from the files: held-out dialogues answered turn by turn, adherence asked of the judge per answered turn.
    assert store.stage(0, "data_gatt_instructions").read().num_rows == 16
    before = store.stage(1, "gatt_before_smollm2").manifest()["extra"]
    assert [row["dialogues"] for row in before["adherence"]] == [2, 2] and before["judge_requests"] > 0
    assert re.search(r"GAtt smollm2: \d+ samples; adherence \(%\) by turn \(the LLM judge's", out)
    # Context distillation with the generic preprompt on the safety file's prompts.
    counts = store.stage(1, "cd_data_smollm2").manifest()["extra"]["counts"]
    assert counts["prompts"] == 2 and "context distillation smollm2: kept" in out

    # The SmolLM2 judge: verdicts with position-swap consistency, no oracle agreement (real data has no oracle).
    judged = store.stage(1, "judge_smollm2").manifest()["extra"]
    assert judged["agreement"] is None and "consistency" in judged and judged["comparisons"] == 2
    report = (tmp_path / "smollm2" / "report.md").read_text()
    assert "no oracle" in report and "position-swap consistency" in report
