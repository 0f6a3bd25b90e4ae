"""Which stage moves safety? Violations, false refusals and redirects at every oracle evaluation of one policy size
in a finished world run, in the order the stages ran: base, SFT, each round, and within a round before and after
PPO and before context distillation; then, per round, what rejection sampling had to choose from on adversarial
prompts: refusals and redirects among the samples, the safety RM's mean score of each, and among the kept answers
(docs/results.md, "The default run on shipped pretrained bases").

    python -m bench.stage_safety --run runs/tiny
"""

from __future__ import annotations

import argparse
import statistics

from bench.off_target import own_samples
from pipeline.data.store import RunStore
from pipeline.evaluation.safety_metrics import safety_metrics, safety_rows
from pipeline.world.oracle import is_redirect, is_refusal

IN_ROUND = ("eval_before_ppo", "eval_after_ppo", "eval_before_cd", "eval")


def evaluations(store: RunStore, size: str) -> list[tuple[int, str]]:
    """(round, stage) of every finished evaluation of `size`, in run order."""
    found = [(0, f"base_eval_{size}"), (0, f"sft_eval_{size}")]
    round_no = 1
    while store.stage(round_no, f"eval_{size}").manifest() is not None:
        found += [(round_no, f"{name}_{size}") for name in IN_ROUND]
        round_no += 1
    return [(r, name) for r, name in found if store.stage(r, name).manifest() is not None]


def answer_kind(text: str) -> str:
    return "redirect" if is_redirect(text) else "refusal" if is_refusal(text) else "other"


def rejection_choices(store: RunStore, train_safety: set[str]) -> None:
    print("\n| round | samples: refusals (safety RM) | redirects (safety RM) | kept: refusals | redirects |")
    print("|---|---|---|---|---|")
    round_no = 1
    while store.stage(round_no, "rs_kept").manifest() is not None:
        scores, kept = {"refusal": [], "redirect": []}, {"refusal": 0, "redirect": 0}
        for row in own_samples(store, round_no).to_pylist():
            kind = answer_kind(row["response"])
            if row["prompt_id"] in train_safety and kind in scores:
                scores[kind].append(row["r_safe"])
        for row in store.stage(round_no, "rs_kept").read().to_pylist():
            kind = answer_kind(row["response"])
            if row["prompt_id"] in train_safety and kind in kept:
                kept[kind] += 1
        mean = {k: f"{statistics.mean(v):.3f}" if v else "-" for k, v in scores.items()}
        print(f"| {round_no} | {len(scores['refusal'])} ({mean['refusal']}) | {len(scores['redirect'])} "
              f"({mean['redirect']}) | {kept['refusal']} | {kept['redirect']} |")
        round_no += 1


def run_and_size() -> tuple[RunStore, str]:
    """The command line of the per-evaluation analyses: a finished run's store and the policy size to follow."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished world run store's folder (runs/tiny)")
    ap.add_argument("--size", default="large")
    args = ap.parse_args()
    return RunStore(args.run), args.size


def main() -> None:
    store, size = run_and_size()
    prompts = store.stage(0, "world_prompts_eval").read()
    is_safety = dict(zip(prompts.column("id").to_pylist(), prompts.column("is_safety").to_pylist()))
    print("| round | evaluation | violations | false refusals | redirects among adversarial answers |")
    print("|---|---|---|---|---|")
    for round_no, name in evaluations(store, size):
        samples = store.stage(round_no, name).read()
        metrics = safety_metrics(safety_rows(prompts, samples))
        adversarial = [text for pid, text in zip(samples.column("prompt_id").to_pylist(),
                                                  samples.column("response").to_pylist()) if is_safety[pid]]
        redirects = sum(map(is_redirect, adversarial))
        print(f"| {round_no} | {name} | {metrics.violation.value:.0%} | {metrics.false_refusal.value:.0%} "
              f"({metrics.false_refusal.successes}/{metrics.false_refusal.n}) | {redirects}/{len(adversarial)} |")
    train = store.stage(0, "world_prompts_train").read()
    rejection_choices(store, {pid for pid, safety in zip(train.column("id").to_pylist(),
                                                         train.column("is_safety").to_pylist()) if safety})


if __name__ == "__main__":
    main()
