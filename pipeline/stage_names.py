"""The run store's stage names that more than one module reads: the one place they are spelled.

A stage's folder is `round-RR/<name>`; a size's stages carry its name (`sft_large`), an evaluation its moment
(`eval_before_ppo_large`). Names a single stage module reads and writes alone (GAtt's, distillation's) stay there.
"""

from __future__ import annotations

RS_SAMPLES = "rs_samples"  # rejection sampling's K answers per prompt, scored
RS_KEPT = "rs_kept"  # the best answer per prompt, merged with the earlier rounds'
PPO = "ppo"


def rm(kind: str) -> str:
    """A round's reward model of `kind` (helpfulness or safety)."""
    return f"rm_{kind}"


def sft(size: str) -> str:
    return f"sft_{size}"


def rs_sft(size: str) -> str:
    """A size fine-tuned on the round's kept answers."""
    return f"rs_sft_{size}"


def base_eval(size: str) -> str:
    """The base model's answers to the held-out prompts (round 0)."""
    return f"base_eval_{size}"


def sft_eval(size: str) -> str:
    return f"sft_eval_{size}"


def round_eval(size: str, moment: str = "") -> str:
    """A round's answers to the held-out prompts: at its end (""), or "before_ppo", "after_ppo", "before_cd"."""
    return f"eval_{moment + '_' if moment else ''}{size}"


def win_rate(size: str, moment: str = "") -> str:
    """A round's win rates against the SFT model: at its end (""), or "before_ppo"."""
    return f"winrate_{moment + '_' if moment else ''}{size}"


def judge(size: str) -> str:
    """The LLM judge's verdicts on the size against its SFT model."""
    return f"judge_{size}"
