"""`python -m pipeline.world --out DIR [--seed N]`: write every table of the world as Parquet, print counts."""

from __future__ import annotations

import argparse
from collections import Counter

import pyarrow as pa

from pipeline.world.config import WorldConfig
from pipeline.world.tables import build_tables, write_tables
from pipeline.world.world import World

# The column whose values each table's counts are broken down by.
_BREAKDOWN = {"prompts": "category", "demonstrations": "category", "preferences": "kind", "corpus": "kind"}


def summary(name: str, table: pa.Table) -> str:
    column = next(c for prefix, c in _BREAKDOWN.items() if name.startswith(prefix))
    counts = Counter(table.column(column).to_pylist())
    parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
    extra = ""
    if name.startswith("preferences"):
        ratings = Counter(table.column("rating").to_pylist())
        extra = "; ratings " + ", ".join(f"{k}={v}" for k, v in sorted(ratings.items()))
    return f"{name:<18} {table.num_rows:>6} rows  ({parts}){extra}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.world", description=__doc__)
    parser.add_argument("--out", required=True, help="folder for the Parquet files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tables = build_tables(World(WorldConfig(seed=args.seed)))
    write_tables(tables, args.out)
    for name, table in tables.items():
        print(summary(name, table))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
