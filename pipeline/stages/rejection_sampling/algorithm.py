"""Rejection sampling's selection step (LLaMA-2, Touvron et al. 2023, section 3.2.3), on scored SAMPLES tables.

The generator pool draws K samples per prompt from the largest policy and the scorer pool fills r_combined;
what remains is plain table work, kept here free of Ray, vLLM and torch so that it is cheap to test:

    best = best_per_prompt(scored)                                  # best of K, one row per prompt
    kept = merge_with_earlier(best, earlier_kept, "all_rounds")     # the paper's fix; "last_round" = its regression
    sft_data = kept_as_demonstrations(kept, prompts)                # fine-tune on the kept answers
    curve = reward_vs_k(scored, [1, 2, 4, 8])                       # paper Figure 7: max vs median over N
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence

import pyarrow as pa

from pipeline.data.schemas import DEMONSTRATIONS, SAMPLES

MERGE_MODES = ("all_rounds", "last_round")
TRUNCATED_MODES = ("keep", "last", "drop")
DEMONSTRATION_SOURCE = "rejection_sampling"


def _as_samples(table: pa.Table, name: str) -> pa.Table:
    """The table's SAMPLES columns in declared order and types, so every result carries the SAMPLES schema."""
    missing = [n for n in SAMPLES.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{name}: not a SAMPLES table, missing column(s) {missing}")
    return table.select(SAMPLES.names).cast(SAMPLES)


def _rewards(table: pa.Table, name: str) -> tuple[list[str], list[float]]:
    """prompt_id and r_combined per row; an unscored row is an error, since a missing reward cannot be ranked."""
    prompt_ids = table.column("prompt_id").to_pylist()
    rewards = table.column("r_combined").to_pylist()
    for pid, r in zip(prompt_ids, rewards):
        if r is None or math.isnan(r):
            raise ValueError(f"{name}: prompt {pid!r} has a sample without r_combined (null or NaN): score the "
                             "samples with the reward models first")
    return prompt_ids, rewards


def _with_chosen(table: pa.Table, chosen: Sequence[bool]) -> pa.Table:
    at = table.schema.get_field_index("chosen")
    return table.set_column(at, SAMPLES.field("chosen"), pa.array(chosen, pa.bool_()))


def _take_sorted(table: pa.Table, rows: dict[str, int]) -> pa.Table:
    """The rows of `rows` (prompt_id -> row index) sorted by prompt_id, all marked chosen."""
    out = table.take(pa.array([rows[pid] for pid in sorted(rows)], pa.int64()))
    return _with_chosen(out, [True] * out.num_rows)


def _best_rows(samples: pa.Table, truncated: str = "keep") -> dict[str, int]:
    """prompt_id -> row index of its best sample: highest r_combined, then lowest sample_index, then first row;
    answers cut at max_tokens per `truncated` (see `best_per_prompt`).

    The tie-breaks make the choice independent of the order the generator pool returned shards in.
    """
    if truncated not in TRUNCATED_MODES:
        raise ValueError(f"truncated {truncated!r}: use one of {TRUNCATED_MODES}")
    prompt_ids, rewards = _rewards(samples, "samples")
    indices = samples.column("sample_index").to_pylist()
    cut = [truncated != "keep" and f == "length" for f in samples.column("finish_reason").to_pylist()]
    best: dict[str, tuple[bool, float, int, int]] = {}
    for row, (pid, r, i, c) in enumerate(zip(prompt_ids, rewards, indices, cut)):
        key = (c, -r, i, row)
        if (c and truncated == "drop") or (pid in best and key >= best[pid]):
            continue
        best[pid] = key
    return {pid: key[3] for pid, key in best.items()}


def best_per_prompt(samples: pa.Table, truncated: str = "keep") -> pa.Table:
    """One SAMPLES row per prompt, its best-of-K sample by r_combined, with chosen=True; sorted by prompt_id.

    Ties go to the lowest sample_index. A null (or NaN) r_combined raises ValueError naming the first such prompt.
    `truncated` says what an answer cut at max_tokens (finish_reason "length") may be: "keep" ranks it by reward
    like any other; "last" keeps it only when none of its prompt's answers finished; "drop" never keeps it (a
    prompt whose answers were all cut keeps none). As a demonstration a cut answer teaches the policy to end its
    turn mid-sentence, and reward models that like long answers pick it often (SmolLM2's helpfulness RM: 33 of
    48 kept answers were cut at 128 tokens).
    """
    samples = _as_samples(samples, "samples")
    return _take_sorted(samples, _best_rows(samples, truncated))


def mark_chosen(samples: pa.Table) -> pa.Table:
    """The same rows, in the same order, with chosen=True on each prompt's best sample and False elsewhere.

    Keeps all K samples with the selection recorded, e.g. to store a round's full sample set.
    """
    samples = _as_samples(samples, "samples")
    best = set(_best_rows(samples).values())
    return _with_chosen(samples, [row in best for row in range(samples.num_rows)])


def _unique_rows(table: pa.Table, name: str) -> dict[str, tuple[int, float]]:
    """prompt_id -> (row, r_combined) of a best-per-prompt table, which must hold one row per prompt."""
    prompt_ids, rewards = _rewards(table, name)
    rows: dict[str, tuple[int, float]] = {}
    for row, (pid, r) in enumerate(zip(prompt_ids, rewards)):
        if pid in rows:
            raise ValueError(f"{name}: prompt {pid!r} appears more than once; pass best_per_prompt's output")
        rows[pid] = (row, r)
    return rows


def merge_with_earlier(current_best: pa.Table, earlier_best: pa.Table | None, mode: str) -> pa.Table:
    """The kept set of this round: one row per prompt, chosen=True, sorted by prompt_id.

    "last_round" keeps only `current_best`: the paper's first recipe, which made RLHF-V3 regress on some
    capabilities (e.g. rhyming lines) that earlier rounds had. "all_rounds" is its fix: the union of this round's
    best and the best of all earlier rounds (`earlier_best`, the previous call's result), keeping per prompt the
    higher r_combined; on a tie the earlier answer stays, so repeated merges are stable. Prompts only in the
    earlier set are kept.

    Why compare rewards from different rounds: the paper keeps the top samples of all iterations, so an answer
    that an earlier policy did better on survives. Caveat: earlier r_combined values came from earlier reward
    models, which may be scaled or calibrated differently from this round's. A caller who wants one yardstick can
    rescore `earlier_best` with the current RMs (the scorer pool's `score`) before merging; this function only
    compares the r_combined it is given.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode {mode!r}: use one of {MERGE_MODES}")
    current = _as_samples(current_best, "current_best")
    current_rows = _unique_rows(current, "current_best")
    if mode == "last_round" or earlier_best is None:
        return _take_sorted(current, {pid: row for pid, (row, _) in current_rows.items()})
    earlier = _as_samples(earlier_best, "earlier_best")
    earlier_rows = _unique_rows(earlier, "earlier_best")
    both = pa.concat_tables([earlier, current])  # earlier rows first: a current row `row` sits at offset + row
    offset = earlier.num_rows
    keep = {pid: row for pid, (row, _) in earlier_rows.items()}
    for pid, (row, r) in current_rows.items():
        if pid not in earlier_rows or r > earlier_rows[pid][1]:
            keep[pid] = offset + row
    return _take_sorted(both, keep)


def reward_vs_k(samples: pa.Table, ks: Sequence[int]) -> list[dict]:
    """Mean over prompts of the max and of the median r_combined among each prompt's first k samples, per k.

    The gap between max and median is what rejection sampling can gain over a single sample (paper Figure 7).
    Estimator: the first k samples by sample_index. The K samples of a prompt are i.i.d. draws of one policy, so
    the first k are a fair draw of k, and nested prefixes make each prompt's max non-decreasing in k; averaging
    over prompts already smooths the noise, so no resampling of subsets (and no seed) is needed. Even k: the median
    is the mean of the two middle values. A prompt with fewer than k samples raises ValueError, as does a table
    mixing rounds or samplers (the same sample_index twice for a prompt): a curve describes one policy.
    """
    samples = _as_samples(samples, "samples")
    prompt_ids, rewards = _rewards(samples, "samples")
    per_prompt: dict[str, dict[int, float]] = {}
    for pid, i, r in zip(prompt_ids, samples.column("sample_index").to_pylist(), rewards):
        drawn = per_prompt.setdefault(pid, {})
        if i in drawn:
            raise ValueError(f"prompt {pid!r}: sample_index {i} appears twice; pass one round's samples of one "
                             "sampler")
        drawn[i] = r
    if not per_prompt:
        raise ValueError("reward_vs_k: no samples")
    ordered = {pid: [drawn[i] for i in sorted(drawn)] for pid, drawn in sorted(per_prompt.items())}
    curve = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"reward_vs_k: k must be a positive int, got {k!r}")
        short = next((pid for pid, rs in ordered.items() if len(rs) < k), None)
        if short is not None:
            raise ValueError(f"reward_vs_k: k={k} but prompt {short!r} has only {len(ordered[short])} sample(s)")
        firsts = [rs[:k] for rs in ordered.values()]
        curve.append({"k": k, "max": statistics.fmean(max(f) for f in firsts),
                      "median": statistics.fmean(statistics.median(f) for f in firsts), "prompts": len(firsts)})
    return curve


def kept_as_demonstrations(kept: pa.Table, prompts: pa.Table) -> pa.Table:
    """A DEMONSTRATIONS table of the kept answers, for fine-tuning on them (rejection-sampling fine-tuning).

    One row per kept sample, in `kept`'s order: messages = the prompt's messages + the assistant's response;
    id = the prompt id (the kept set holds one answer per prompt, so it is unique; a repeated prompt_id raises);
    category from the prompt; source "rejection_sampling"; meta = the prompt's meta (plus attack_vector for
    safety prompts, as the world's demonstrations carry it) and a "rejection_sampling" entry recording which
    round, sampler and sample the answer came from and its rewards, since the merged set mixes rounds.
    """
    kept = _as_samples(kept, "kept")
    by_id = {p["id"]: p for p in prompts.select(["id", "messages", "category", "attack_vector", "is_safety",
                                                 "meta"]).to_pylist()}
    rows, seen = [], set()
    for s in kept.to_pylist():
        pid = s["prompt_id"]
        if pid in seen:
            raise ValueError(f"kept: prompt {pid!r} appears more than once; demonstration ids would collide")
        seen.add(pid)
        prompt = by_id.get(pid)
        if prompt is None:
            raise ValueError(f"kept: prompt {pid!r} is not in the prompts table")
        if not prompt["messages"] or prompt["messages"][-1]["role"] != "user":
            raise ValueError(f"prompt {pid!r}: its messages must end with a user turn")
        meta = json.loads(prompt["meta"]) if prompt["meta"] else {}
        if prompt["is_safety"]:
            meta["attack_vector"] = prompt["attack_vector"]
        meta["rejection_sampling"] = {k: s[k] for k in ("round", "sampler", "sample_index", "temperature",
                                                        "r_help", "r_safe", "r_combined")}
        rows.append({"id": pid, "messages": [*prompt["messages"], {"role": "assistant", "content": s["response"]}],
                     "category": prompt["category"], "source": DEMONSTRATION_SOURCE,
                     "meta": json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)})
    return pa.Table.from_pylist(rows, schema=DEMONSTRATIONS)
