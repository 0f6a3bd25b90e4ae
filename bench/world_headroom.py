"""Is there something for rejection sampling to select? A policy's K samples per world prompt, scored by the oracle
per task family: the mean, the best of K (the headroom a perfect selector has), the share right, and how often
the answers differ (docs/results.md, "SmolLM2-135M-Instruct on the world's tasks", has the targets and numbers).

    python -m bench.world_headroom --checkpoint .cache/models/smollm2-135m-instruct      # after `make venv`
    python -m bench.world_headroom --checkpoint runs/tiny/round-00/sft_large/checkpoint
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import pyarrow as pa

from actors.vllm_engine import Sampling
from bench.common import sample_checkpoint
from pipeline.data.schemas import PROMPTS
from pipeline.stages.evaluation.oracle_eval import answer_text
from pipeline.world import World, WorldConfig, judge
from pipeline.world.seeding import stream
from pipeline.world.tables import prompt_rows
from pipeline.world.families import FAMILY_NAMES


def family_prompts(families: list[str], per_family: int, seed: int) -> list:
    """`per_family` held-out helpful prompts of each family (one world per family, so each is drawn alike)."""
    prompts = []
    for family in families:
        world = World(WorldConfig(seed=seed, helpful_families=(family,)))
        rng = stream(seed, "world_headroom", family)
        prompts += [world.prompt("helpful", "eval", rng) for _ in range(per_family)]
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--families", default=",".join(FAMILY_NAMES))
    ap.add_argument("--per_family", type=int, default=40)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    prompts = family_prompts(a.families.split(","), a.per_family, 0)
    ids = [f"headroom-{i:05d}" for i in range(len(prompts))]
    start = time.time()
    tokenizer, _, completions = sample_checkpoint(
        a.checkpoint, pa.Table.from_pylist(prompt_rows(prompts, ids), schema=PROMPTS),
        Sampling(n=a.k, temperature=a.temperature, max_tokens=a.max_tokens, seed=0))
    print(f"{len(prompts)} prompts x {a.k} samples in {time.time() - start:.0f} s")
    rows = defaultdict(lambda: defaultdict(float))
    examples = {}
    for prompt, per in zip(prompts, completions):
        answers = [answer_text(tokenizer, c.token_ids, "llama2") for c in per]
        verdicts = [judge(prompt.category, prompt.meta, t) for t in answers]
        scores = [v.helpfulness for v in verdicts]
        row = rows[prompt.meta["task"]]
        row["prompts"] += 1
        row["mean"] += sum(scores) / len(scores)
        row["best"] += max(scores)
        row["correct"] += sum(bool(v.correct) for v in verdicts) / len(verdicts)
        row["distinct"] += len(set(answers))
        examples.setdefault(prompt.meta["task"], (prompt.messages[-1]["content"], answers[:3], scores[:3]))
    print(f"{'family':10s} {'prompts':>7s} {'mean':>6s} {f'best/{a.k}':>7s} {'headroom':>8s} {'correct':>7s} "
          f"{'distinct':>8s}")
    out = {}
    for family, row in rows.items():
        n = row["prompts"]
        out[family] = {k: v / n if k != "prompts" else int(v) for k, v in row.items()}
        r = out[family]
        print(f"{family:10s} {n:7.0f} {r['mean']:6.3f} {r['best']:7.3f} {r['best'] - r['mean']:8.3f} "
              f"{r['correct']:7.0%} {r['distinct']:8.1f}")
    for family, (question, answers, scores) in examples.items():
        print(f"\n[{family}] {question}\n" + "\n".join(f"  {s:.2f}  {t!r}" for t, s in zip(answers, scores)))
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
