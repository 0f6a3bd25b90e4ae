"""The README's main job (`python -m pipeline`) runs end to end: train, export, serve with vLLM."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from model.checkpoint import load_checkpoint
from model.tokenizer import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_main_job_trains_exports_and_serves(tmp_path):
    out = tmp_path / "smoke"
    result = subprocess.run([sys.executable, "-m", "pipeline", "--steps", "60", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"held-out exact answers: (\d+)/16; vLLM greedy tokens equal ours: (\d+)/16", result.stdout)
    assert match, result.stdout[-3000:]
    assert int(match.group(2)) == 16  # the exported checkpoint decodes identically in vLLM and in our model
    model = load_checkpoint(out / "checkpoint")
    assert load_tokenizer(out / "checkpoint").vocab_size == model.config.vocab_size
