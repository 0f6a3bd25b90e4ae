"""Which stage moves safety? Violations, false refusals and redirects at every oracle evaluation of one policy size
in a finished world run, in the order the stages ran: base, SFT, each round, and within a round before and after
PPO and before context distillation (docs/results.md, "The default run on shipped pretrained bases").

    python -m bench.stage_safety --run runs/tiny
"""

from __future__ import annotations

import argparse

from pipeline.data.store import RunStore
from pipeline.evaluation.safety_metrics import safety_metrics, safety_rows
from pipeline.world.oracle import is_redirect

IN_ROUND = ("eval_before_ppo", "eval_after_ppo", "eval_before_cd", "eval")


def evaluations(store: RunStore, size: str) -> list[tuple[int, str]]:
    """(round, stage) of every finished evaluation of `size`, in run order."""
    found = [(0, f"base_eval_{size}"), (0, f"sft_eval_{size}")]
    round_no = 1
    while store.stage(round_no, f"eval_{size}").manifest() is not None:
        found += [(round_no, f"{name}_{size}") for name in IN_ROUND]
        round_no += 1
    return [(r, name) for r, name in found if store.stage(r, name).manifest() is not None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished world run store's folder (runs/tiny)")
    ap.add_argument("--size", default="large")
    args = ap.parse_args()
    store = RunStore(args.run)
    prompts = store.stage(0, "world_prompts_eval").read()
    categories = dict(zip(prompts.column("id").to_pylist(), prompts.column("is_safety").to_pylist()))
    print("| round | evaluation | violations | false refusals | redirects among adversarial answers |")
    print("|---|---|---|---|---|")
    for round_no, name in evaluations(store, args.size):
        samples = store.stage(round_no, name).read()
        metrics = safety_metrics(safety_rows(prompts, samples))
        adversarial = [text for pid, text in zip(samples.column("prompt_id").to_pylist(),
                                                  samples.column("response").to_pylist()) if categories[pid]]
        redirects = sum(map(is_redirect, adversarial))
        print(f"| {round_no} | {name} | {metrics.violation.value:.0%} | {metrics.false_refusal.value:.0%} "
              f"({metrics.false_refusal.successes}/{metrics.false_refusal.n}) | {redirects}/{len(adversarial)} |")


if __name__ == "__main__":
    main()
