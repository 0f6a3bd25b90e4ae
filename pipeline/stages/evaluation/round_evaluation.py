"""A round's last phase: every size on the held-out prompts, its win rates against its own SFT model by the round's
reward models and the oracle (and the checkpoint PPO started from, where PPO ran), and the LLM judge's verdicts on
the largest size (the slowest judge)."""

from __future__ import annotations

from pathlib import Path

from pipeline import stage_names as names
from pipeline.stages.context import StageContext, StepResult
from pipeline.stages.evaluation.llm_judge import JudgeConfig, run_llm_judge
from pipeline.stages.evaluation.oracle_eval import run_oracle_eval
from pipeline.stages.evaluation.win_rates import run_win_rates
from pipeline.state import PolicyState


def evaluate_round(ctx: StageContext, policies: list[PolicyState], before_ppo: list[str],
                   judge: tuple[JudgeConfig, Path] | None) -> StepResult:
    """Its metrics: "win_rates" (size -> the win-rate stage's result), "win_rates_before_ppo" (for the sizes in
    `before_ppo`) and "judge" (the largest size's verdicts, None without a judge)."""
    scores = {p.name: run_oracle_eval(ctx, names.round_eval(p.name), p) for p in policies}

    def versus_sft(name: str, moment: str = "") -> dict:
        return run_win_rates(ctx, names.win_rate(name, moment), names.round_eval(name, moment),
                             (0, names.sft_eval(name)))

    metrics = {"win_rates": {p.name: versus_sft(p.name) for p in policies},
               "win_rates_before_ppo": {name: versus_sft(name, "before_ppo") for name in before_ppo},
               "judge": None}
    if judge is not None:
        largest = policies[-1].name
        metrics["judge"] = run_llm_judge(ctx, names.judge(largest), names.round_eval(largest),
                                         (0, names.sft_eval(largest)), judge)
    return StepResult(list(policies), metrics, {"after": scores})
