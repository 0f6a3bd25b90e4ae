"""Every benchmark against the peers, in one process run: `python -m bench [--quick] [--reps N] [--only a,b]
[--json FILE] [--markdown FILE]`.

One Ray instance and one set of pools serve all of them (a generator pool per model size, the scorer, the trainer
group); each benchmark runs both (or all) of its sides alternating, `--reps` times, and prints a Markdown table
with the median and the spread. TRL's sides run when TRL is importable (`pip install -e '.[bench]'`); without it
their rows say so. A benchmark that fails prints its error in place of its table and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from bench import bench_flops, bench_generation, bench_ppo, bench_rejection, bench_rm, bench_sync
from bench.common import Context, Section, machine, machine_line, write_json

# The order. Pools start on first use and stay up: the `large` generator pool, the scorer and the trainer
# group serve every benchmark after the first that needs them.
BENCHMARKS = {
    "rm": bench_rm.run,
    "ppo": bench_ppo.run,
    "generation": bench_generation.run,
    "sync": bench_sync.run,
    "flops": bench_flops.run,
    "rejection": bench_rejection.run,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer prompts, steps and repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side (default 3, quick 2)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=None,
                   help="include SmolLM2-135M in the weight-sync benchmark (default: on, off with --quick)")
    p.add_argument("--json", type=Path, default=None, help="write every result (and the machine) here")
    p.add_argument("--markdown", type=Path, default=None, help="write the printed Markdown here too")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine()
    command = "python -m bench" + (" --quick" if args.quick else "") + (f" --reps {args.reps}" if args.reps else "")
    header = f"## Benchmarks{' (quick mode)' if args.quick else ''}\n\nMachine: {machine_line(info)}\n\n`{command}`\n"
    print(header, flush=True)
    ctx = Context(quick=args.quick, reps=args.reps, smollm2=args.smollm2)
    sections: list[Section] = []
    failed = []
    try:
        for name in args.names:
            start = time.perf_counter()
            try:
                section = BENCHMARKS[name](ctx)
            except Exception as err:  # noqa: BLE001 - one benchmark's failure must not hide the others' tables
                failed.append(name)
                section = Section(name, f"{name}: FAILED", f"```\n{traceback.format_exc(limit=8)}```", [],
                                  [f"{type(err).__name__}: {err}"])
            section.seconds = time.perf_counter() - start
            sections.append(section)
            print(section.markdown() + f"\n({name}: {section.seconds:.0f} s)\n", flush=True)
    finally:
        ctx.close()
    if args.json:
        write_json(args.json, sections, info, sys.argv)
    if args.markdown:
        args.markdown.write_text(header + "\n" + "\n".join(s.markdown() for s in sections))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
