"""The loader's shared pieces: the table kinds, the layouts it knows, a read file and its summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa


TABLE_KINDS = ("prompts", "demonstrations", "preferences")
_ROW = "__row"  # a row's 0-based position in its file, carried along so output and rejects keep file order

LAYOUTS = {
    "messages": "messages",
    "sharegpt": "conversations (ShareGPT from/value)",
    "prompt": "prompt",
    "prompt_completion": "prompt/completion",
    "explicit": "prompt/chosen/rejected",
    "llama_factory": "conversations/chosen/rejected (LLaMA-Factory)",
    "implicit": "chosen/rejected (implicit prompt)",
    "alpaca": "instruction/input/output (Alpaca)",
}
_LAYOUT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "explicit": ("prompt", "chosen", "rejected"),
    "llama_factory": ("conversations", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "alpaca": ("instruction", "input", "output"),
}
_CONVERSATIONAL = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "instruction", "input",
                   "output")
# Fields a file must have a column (or a default) for; every other field is optional, filled in below when a file
# or a row lacks it.
_REQUIRED = {"prompts": ("category",), "demonstrations": (), "preferences": ("kind",)}
_EXPECTED = {
    "prompts": "messages, conversations, prompt or instruction",
    "demonstrations": "messages, conversations, prompt + completion or instruction + output",
    "preferences": "chosen + rejected, with prompt or conversations, or both conversations (implicit prompt)",
}


@dataclass(frozen=True)
class LoadSummary:
    source: str
    kind: str
    format: str
    layout: str
    total: int
    accepted: int
    rejected: int
    by_reason: dict[str, int]  # short reason -> rejected rows, most frequent first
    ignored_columns: tuple[str, ...]
    defaulted: dict[str, tuple[Any, int]]  # field -> (its default, rows that had no value for it)

    def render(self) -> str:
        rows = [("accepted", self.accepted), ("rejected", self.rejected)]
        rows += [(f"  {reason}", count) for reason, count in self.by_reason.items()]
        width = max(len(label) for label, _ in rows)
        digits = len(str(self.total))
        lines = [f"{self.source} -> {self.kind} ({LAYOUTS[self.layout]}, {self.format})"]
        lines += [f"  {label:<{width}}  {count:>{digits}}" for label, count in rows]
        if self.ignored_columns:
            lines.append(f"  ignored columns: {', '.join(self.ignored_columns)}")
        if self.defaulted:
            given = (f"{name} = {value!r} ({count} row{'s' * (count != 1)})"
                     for name, (value, count) in self.defaulted.items())
            lines.append(f"  defaults for rows without a value: {', '.join(given)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadResult:
    table: pa.Table  # exactly SCHEMAS[kind], metadata included
    rejects: pa.Table  # REJECTS
    summary: LoadSummary


class _Reject(NamedTuple):
    row: int
    field: str
    reason: str
    code: str


Records = list[tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class _Raw:
    """A file read but not interpreted: a per-row Python view, and an Arrow view when the format gives one."""

    format: str
    columns: list[str]
    total: int  # rows in the file, unparseable ones included
    records: Callable[[], tuple[Records, list[_Reject]]]  # every parseable row, and rejects for the others
    raws: Callable[[list[int]], list[str]]  # rows as the rejects table keeps them
    table: pa.Table | None = None  # the parseable rows as Arrow
    table_rows: np.ndarray | None = None  # the file row of each table row
    table_rejects: tuple[_Reject, ...] = ()  # rows the table lacks: they could not be parsed
