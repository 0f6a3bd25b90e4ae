"""Loader throughput: `python -m bench.bench_loader [--rows N] [--corrupt]`.

Builds a synthetic preferences file (2-turn prompts: user, assistant, user) in a temp dir, in Parquet and in JSONL,
and times `load` on each, validation included, no tokenizer. `--corrupt` instead loads a file with a share of
deliberately bad rows and prints the accepted / rejected-by-reason table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.readers import load
from pipeline.data.schemas import PREFERENCES, RATINGS

WORDS = ("the model should answer briefly and cite the source when the user asks about history science or code "
         "please explain why this step matters and what could go wrong in practice").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"pref-{i:07d}",
            "batch": 1 + i % 14,
            "prompt": [
                {"role": "user", "content": _text(rng, 12)},
                {"role": "assistant", "content": _text(rng, 30)},
                {"role": "user", "content": _text(rng, 10)},
            ],
            "chosen": _text(rng, 40),
            "rejected": _text(rng, 35),
            "rating": rng.choice(RATINGS),
            "kind": "safety" if i % 5 == 0 else "helpfulness",
            "source": "bench",
        }
        for i in range(n)
    ]


def corrupt(rows: list[dict], share: float, seed: int = 1) -> list[str]:
    """JSONL lines with about `share` of the rows broken, one of several ways each."""
    rng = random.Random(seed)

    def swap_roles(row: dict) -> None:
        row["prompt"][0]["role"] = "assistant"

    breakers = [
        lambda row: row.pop("chosen"),
        swap_roles,
        lambda row: row.update(chosen="  "),
        lambda row: row.update(rating="amazing"),
        lambda row: row.update(rejected=row["chosen"]),
        lambda row: row.update(margin=-1.0),
        lambda row: row.update(id="pref-0000000"),
    ]
    lines = []
    for row in rows:
        if rng.random() < share:
            if rng.random() < 1 / (len(breakers) + 1):
                lines.append(json.dumps(row)[:-7])  # a truncated line: invalid JSON
                continue
            rng.choice(breakers)(row)
        lines.append(json.dumps(row))
    return lines


def _timed_load(path: Path, **kwargs: object) -> tuple[float, int]:
    with contextlib.redirect_stderr(io.StringIO()):  # the loader's own summary table
        start = time.perf_counter()
        result = load(path, "preferences", **kwargs)
        seconds = time.perf_counter() - start
    return seconds, result.table.num_rows


def bench(rows: int, folder: Path) -> str:
    data = synthetic_rows(rows)
    table = pa.Table.from_pylist(data, schema=PREFERENCES)
    parquet, jsonl = folder / "prefs.parquet", folder / "prefs.jsonl"
    pq.write_table(table, parquet)
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    no_ids, bad_line, array = folder / "prefs-no-ids.parquet", folder / "bad-line.jsonl", folder / "prefs.json"
    pq.write_table(table.drop_columns(["id"]), no_ids)
    bad_line.write_text(jsonl.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    array.write_text(json.dumps(data), encoding="utf-8")
    runs = [
        ("parquet", parquet, {}),
        ("parquet, no id column (content ids)", no_ids, {}),
        ("jsonl", jsonl, {}),
        ("jsonl + 1 bad line (Python parse, then Arrow)", bad_line, {"max_reject_share": 0.01}),
        ("json array (per-row path)", array, {}),
    ]
    lines = ["| file | rows | seconds | rows/s |", "|---|---:|---:|---:|"]
    for label, path, kwargs in runs:
        seconds, accepted = _timed_load(path, **kwargs)
        assert accepted == rows, f"{label}: {accepted} of {rows} rows accepted"
        lines.append(f"| {label} | {rows} | {seconds:.2f} | {rows / seconds:,.0f} |")
    return "\n".join(lines)


def bench_corrupt(rows: int, folder: Path) -> str:
    path = folder / "corrupt.jsonl"
    path.write_text("\n".join(corrupt(synthetic_rows(rows), share=0.05)) + "\n", encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        summary = load(path, "preferences", max_reject_share=1.0).summary
    lines = ["| outcome | rows |", "|---|---:|", f"| accepted | {summary.accepted} |",
             f"| rejected | {summary.rejected} |"]
    lines += [f"| rejected: {reason} | {count} |" for reason, count in summary.by_reason.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--corrupt", action="store_true", help="print the rejects summary of a corrupted file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(bench_corrupt(args.rows, Path(folder)) if args.corrupt else bench(args.rows, Path(folder)))


if __name__ == "__main__":
    main()
