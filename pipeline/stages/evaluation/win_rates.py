"""Win rates of a round's policy against its SFT model (the paper's Figure 11) and its safety metrics.

Both policies' held-out samples come from their oracle-evaluation stages (4 samples per prompt); one score per
prompt is the mean over its samples (samples of one prompt are not independent). Two judges:
- "reward models": the round's RMs on the scorer pool, the helpfulness RM on non-adversarial prompts (helpful,
  borderline) and the safety RM on adversarial ones;
- "oracle": the world's helpfulness and safety scores on the same split.
Each aspect is judged on the prompts it is about: helpfulness on what a user asks for help with, harmlessness on
the adversarial prompts (on a helpful prompt every safe answer ties, which would only dilute the rate).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.data.schemas import RISK_CATEGORIES
from pipeline.evaluation.safety_metrics import safety_metrics, safety_rows
from pipeline.evaluation.winrate import agreement, count, paired, prefer, sign_test
from pipeline.stages.cached import table_stage
from pipeline.stages.context import StageContext
from pipeline.stages.generation import scored
from pipeline.world import judge

JUDGES = ("reward models", "oracle")
STAGE_VERSION = 3  # raised when the same samples would give other win rates (pipeline.stages.cached.stage_digest)


def aspect_of(category: str) -> str:
    return "harmlessness" if category in RISK_CATEGORIES else "helpfulness"


def per_prompt_means(prompt_ids: list[str], values: list[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for pid, value in zip(prompt_ids, values, strict=True):
        sums[pid].append(value)
    return {pid: sum(v) / len(v) for pid, v in sums.items()}


def oracle_scores(samples: pa.Table, categories: dict[str, tuple[str, Any]]) -> list[float]:
    """Per sample: the oracle's helpfulness, or its safety on adversarial prompts."""
    out = []
    for pid, response in zip(samples.column("prompt_id").to_pylist(), samples.column("response").to_pylist()):
        category, meta = categories[pid]
        verdict = judge(category, meta, response)
        out.append(verdict.safety if aspect_of(category) == "harmlessness" else verdict.helpfulness)
    return out


def rm_scores(scored: pa.Table) -> list[float]:
    """Per sample: the safety RM's score on safety prompts, the helpfulness RM's elsewhere."""
    return [s if safety else h for h, s, safety in zip(scored.column("r_help").to_pylist(),
                                                        scored.column("r_safe").to_pylist(),
                                                        scored.column("is_safety").to_pylist())]


def win_rates(candidate: pa.Table, baseline: pa.Table, prompts: pa.Table,
              score: Callable[[pa.Table], pa.Table], oracle: bool = True) -> dict[str, Any]:
    """{"win_rates": judge -> aspect -> WinRate.as_dict(), "mean_scores": side -> aspect -> the RMs' mean score,
    "rm_agreement": aspect -> agreement with the oracle, "safety": SafetyMetrics.as_dict()} of `candidate` against
    `baseline` (SAMPLES tables of the same prompts); `score` fills r_help / r_safe (the scorer pool). Without an
    oracle (runs from files) the RMs judge alone: no agreement and no safety metrics."""
    categories = {row["id"]: (row["category"], row["meta"])
                  for row in prompts.select(["id", "category", "meta"]).to_pylist()}
    judges = (("reward models", lambda t: rm_scores(score(t))),
              *((("oracle", lambda t: oracle_scores(t, categories)),) if oracle else ()))
    per_judge, preferences, mean_scores = {}, {}, {}
    for name, of in judges:
        means = [per_prompt_means(t.column("prompt_id").to_pylist(), of(t)) for t in (candidate, baseline)]
        per_judge[name], preferences[name] = {}, {}
        for aspect in ("helpfulness", "harmlessness"):
            ids = sorted(pid for pid in means[0] if aspect_of(categories[pid][0]) == aspect)
            preferences[name][aspect] = [prefer(means[0][i], means[1].get(i, float("nan"))) for i in ids]
            per_judge[name][aspect] = count(preferences[name][aspect]).as_dict()
            if name == "reward models":
                for side, by in zip(("candidate", "baseline"), means):
                    values = [by[i] for i in ids if i in by]
                    mean_scores.setdefault(side, {})[aspect] = sum(values) / len(values) if values else None
    # How far the RMs' verdicts can be trusted: agreement with the oracle's on the same prompts.
    rm_agreement = {aspect: agreement(preferences["reward models"][aspect], preferences["oracle"][aspect]).as_dict()
                    for aspect in ("helpfulness", "harmlessness")} if oracle else {}
    return {"win_rates": per_judge, "mean_scores": mean_scores, "rm_agreement": rm_agreement,
            "safety": safety_metrics(safety_rows(prompts, candidate)).as_dict() if oracle else None}


def versus_start(final: pa.Table, start: pa.Table, prompts: pa.Table, category: str = "helpful") -> dict[str, Any]:
    """The oracle's helpfulness of the final policy against the start's on the held-out `category` prompts (SAMPLES
    tables; one score per prompt, the mean of its samples): means, their difference, wins / ties / losses with the
    win rate's interval and a two-sided sign test over prompts."""
    categories = {row["id"]: (row["category"], row["meta"])
                  for row in prompts.select(["id", "category", "meta"]).to_pylist() if row["category"] == category}
    means = []
    for samples in (final, start):
        kept = samples.filter(pa.array([pid in categories for pid in samples.column("prompt_id").to_pylist()]))
        means.append(per_prompt_means(kept.column("prompt_id").to_pylist(), oracle_scores(kept, categories)))
    wins = count(prefer(a, b) for a, b in paired(*means))
    n = len(means[0])
    final_mean, start_mean = (sum(m.values()) / n if n else None for m in means)
    return {"prompts": n, "final": final_mean, "start": start_mean,
            "delta": final_mean - start_mean if n else None, **wins.as_dict(),
            "sign_test_p": sign_test(wins.wins, wins.losses)}


def _scored(ctx: StageContext, samples_digest: str, read: Callable[[], pa.Table]) -> pa.Table:
    """Samples scored by the round's RMs, once per run (the SFT baseline recurs in every win-rate stage, and
    scoring it is most of such a stage's time)."""
    key = (samples_digest, ctx.reward_models.digest)
    if key not in ctx.scored:
        while len(ctx.scored) >= SCORED_KEPT:
            ctx.scored.pop(next(iter(ctx.scored)))
        [ctx.scored[key]] = scored(ctx.scorers(), read())
    return ctx.scored[key]


SCORED_KEPT = 4  # scored sample sets a run keeps: a round's baseline and candidates


def run_win_rates(ctx: StageContext, name: str, candidate_stage: str, baseline_stage: tuple[int, str]
                  ) -> dict[str, Any]:
    """The cached stage `name` of the round: win rates of the samples of stage `candidate_stage` (this round)
    against those of `baseline_stage` ((round, name)) on the held-out prompts, judged by the round's RMs and, in
    world runs, the oracle. No shards: the result is in the manifest."""
    candidate, baseline = ctx.store.stage(ctx.round, candidate_stage), ctx.store.stage(*baseline_stage)
    inputs = {"candidate": candidate.manifest()["content_digest"],
              "baseline": baseline.manifest()["content_digest"], "reward_models": ctx.reward_models.digest}

    def make(*_: Any) -> dict[str, Any]:
        scored = [_scored(ctx, digest, read)
                  for digest, read in ((inputs["candidate"], candidate.read), (inputs["baseline"], baseline.read))]
        return win_rates(*scored, ctx.data.prompts_eval.rows, lambda already_scored: already_scored, ctx.oracle)

    stage, _ = table_stage(ctx.store, ctx.round, name, inputs,
                           {"judges": JUDGES if ctx.oracle else JUDGES[:1]}, make, None, STAGE_VERSION)
    return stage.manifest()["extra"]
