"""Where a run's time went: one row per stage of the run store, from the timing its manifest records.

A stage's manifest carries `seconds` (wall clock from begin to finish of the attempt that made it) and `cores_busy`
(machine-wide, see pipeline/data/store.py); stores written before these existed show no time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime

from pipeline.data.store import MANIFEST, RunStore

_ROUND = re.compile(r"round-(\d{2})")


@dataclass(frozen=True)
class StageTime:
    round: int  # noqa: A003 - the paper's word for an iteration
    stage: str
    seconds: float | None  # None: a manifest from before stages were timed
    cores_busy: float | None  # None: not timed, or no /proc/stat where it ran
    rows: int
    created: float  # the manifest's `created`, epoch seconds
    cached: bool  # from the store, made before this invocation started


def stage_profile(store: RunStore, since: float | None) -> list[StageTime]:
    """Every finished stage of `store`, by round then creation time. `since` is the driver's start (epoch seconds):
    a stage whose manifest is older came from the store; None counts every stage as computed."""
    rows = []
    for path in store.root.glob(f"round-*/*/{MANIFEST}"):
        match = _ROUND.fullmatch(path.parent.parent.name)
        if match is None:
            continue
        manifest = json.loads(path.read_text(encoding="utf-8"))
        created = datetime.fromisoformat(manifest["created"]).timestamp()
        # `created` is whole seconds (truncated): compare with the start's whole second, or a stage made in the
        # run's first second would read as older than the run.
        cached = since is not None and created < math.floor(since)
        rows.append(StageTime(round=int(match[1]), stage=path.parent.name, seconds=manifest.get("seconds"),
                              cores_busy=manifest.get("cores_busy"), rows=int(manifest.get("rows", 0)),
                              created=created, cached=cached))
    return sorted(rows, key=lambda row: (row.round, row.created, row.stage))


def profile_table(rows: list[StageTime]) -> str:
    """One text table: round, stage, "cached" or seconds, share of the computed seconds, cores busy, rows; then a
    total line over the stages this invocation computed."""
    computed = [row for row in rows if not row.cached]
    total = sum(row.seconds or 0.0 for row in computed)
    label = f"total ({len(computed)} computed, {len(rows) - len(computed)} cached)"
    width = max([len(row.stage) for row in rows] + [len(label)])
    lines = [f"  {'round':>5}  {'stage':<{width}}  {'seconds':>9}  {'share':>6}  {'cores':>5}  {'rows':>8}"]
    for row in rows:
        if row.cached:
            when, share = "cached", ""
        elif row.seconds is None:
            when, share = "?", ""  # computed, but by code that did not time its stages
        else:
            when, share = f"{row.seconds:.1f}", (f"{100 * row.seconds / total:.1f}%" if total > 0 else "-")
        cores = "" if row.cached or row.cores_busy is None else f"{row.cores_busy:.1f}"
        lines.append(f"  {row.round:>5}  {row.stage:<{width}}  {when:>9}  {share:>6}  {cores:>5}  {row.rows:>8,d}")
    # The run's cores busy: each computed stage's, weighted by its seconds (stages without a reading left out).
    busy = [(row.cores_busy, row.seconds) for row in computed if row.cores_busy is not None and row.seconds]
    busy_s = sum(seconds for _, seconds in busy)
    cores = f"{sum(c * seconds for c, seconds in busy) / busy_s:.1f}" if busy_s > 0 else ""
    lines.append(f"  {'':>5}  {label:<{width}}  {total:>9.1f}  {'100%' if total > 0 else '-':>6}  {cores:>5}  "
                 f"{sum(row.rows for row in computed):>8,d}")
    return "\n".join(lines)
