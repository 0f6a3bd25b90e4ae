"""Load the datasets users already have into our declared schemas; every bad row goes to a rejects table.

Formats, told apart by the path: Parquet, JSON (an array, or JSON lines as `datasets.to_json` writes them), JSONL,
CSV (conversational cells hold JSON text) and folders from `datasets.Dataset.save_to_disk`. Layouts (TRL / HF /
LLaMA-Factory), told apart by the columns: `messages`; ShareGPT `conversations` of {from, value}; `prompt` and
`prompt`/`completion`; `prompt`/`chosen`/`rejected`; implicit-prompt `chosen`/`rejected` conversations; LLaMA-Factory
`conversations` + `chosen`/`rejected` message dicts; Alpaca `instruction` (+ optional `input`) / `output`.

Arrow inputs (Parquet, `datasets`, JSON lines that pyarrow parses) whose columns have the plain types take a
vectorised path: pyarrow builds the canonical columns and `validate.screen` flags the rows that may be bad. Only
flagged rows, and every row of other inputs, take the per-row path (`validate.validate_row`), which alone decides
what is accepted and why not.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from model.tokenizer import Tokenizer
from pipeline.data import validate as v
from pipeline.data.schemas import MESSAGE, MESSAGES, REJECTS, RISK_CATEGORIES, SCHEMAS
from pipeline.data.store import read_parquet, write_table_atomic
from pipeline.data.validate import DataError, RowError

__all__ = ["TABLE_KINDS", "DataError", "LoadResult", "LoadSummary", "load"]

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


# --- formats -----------------------------------------------------------------------------------------------------


def _dumps(record: Any) -> str:
    # backslashreplace: a lone surrogate (from a JSON \\u escape) is kept as its escape, which Arrow can store
    return json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode()


# --- text that is not UTF-8: one error or one reject naming where, never a crash in a later stage -----------------

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \\u escape of half a UTF-16 pair (maybe a valid pair)


def _not_utf8(data: bytes, err: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, err.start) + 1
    return f"line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); save the file as UTF-8"


def _lone_surrogate(record: Any) -> str | None:
    """The reject reason for a parsed JSON value holding a lone surrogate: it parses, but it is not text."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid UTF-8 text: lone surrogate {err.object[err.start]!r} (a \\u escape of half a UTF-16 pair)"
    return None


def _valid_utf8(table: pa.Table, source: Path) -> pa.Table:
    """Arrow readers take string bytes on trust; text that is not UTF-8 is named here (file, row, column)."""
    try:
        table.validate(full=True)
        return table
    except pa.ArrowInvalid:
        pass
    for name in table.column_names:
        column = table[name]
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        valid, invalid = 0, len(column)  # the first `valid` rows validate, the first `invalid` rows do not
        while invalid - valid > 1:
            middle = (valid + invalid) // 2
            try:
                column.slice(0, middle).validate(full=True)
                valid = middle
            except pa.ArrowInvalid:
                invalid = middle
        raise DataError(f"{source}: row {valid}, field {name}: not valid UTF-8 text")
    table.validate(full=True)  # not a text problem: Arrow's own error
    return table


def _columns(records: Records) -> list[str]:
    return list(dict.fromkeys(key for _, record in records for key in record))


def _arrow_raw(fmt: str, table: pa.Table, source: Path) -> _Raw:
    table = _valid_utf8(table, source)
    return _Raw(
        fmt, table.column_names, table.num_rows,
        records=lambda: (list(enumerate(table.to_pylist())), []),
        raws=lambda rows: [_dumps(record) for record in table.take(pa.array(rows, pa.int64())).to_pylist()],
        table=table, table_rows=np.arange(table.num_rows),
    )


def _records_raw(fmt: str, total: int, records: Records, rejects: list[_Reject], raw: Callable[[int], str]) -> _Raw:
    return _Raw(fmt, _columns(records), total, lambda: (records, rejects), lambda rows: [raw(r) for r in rows])


def _arrow_json_lines(data: bytes, rows: int) -> pa.Table | None:
    try:
        table = pa_json.read_json(io.BytesIO(data))
    except pa.ArrowException:  # a bad line, or a column changing type between rows
        return None
    try:
        table.validate(full=True)  # Arrow's JSON reader keeps bytes that are not UTF-8; the lines say which
    except pa.ArrowInvalid:
        return None
    return table if table.num_rows == rows else None


def _read_json_lines(data: bytes, fmt: str) -> _Raw:
    """One object per line; a bad line is a reject, never the end of the file. Rows are 0-based line numbers."""
    lines = data.split(b"\n")
    if not lines[-1].strip():
        lines.pop()
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip()]

    def parse() -> tuple[Records, list[_Reject]]:
        records, rejects = [], []
        for i, line in numbered:
            try:
                text = line.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                reason = f"not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start} of the line)"
                rejects.append(_Reject(i, "<json>", reason, "bad encoding"))
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                rejects.append(_Reject(i, "<json>", f"invalid JSON: {err}", "bad json"))
                continue
            if isinstance(record, dict) and _SURROGATE_ESCAPE.search(text) and (reason := _lone_surrogate(record)):
                rejects.append(_Reject(i, "<json>", reason, "bad encoding"))
            elif isinstance(record, dict):
                records.append((i, record))
            else:
                rejects.append(_Reject(i, "<json>", f"expected a JSON object, got {type(record).__name__}", "bad json"))
        return records, rejects

    def raws(rows: list[int]) -> list[str]:
        return [lines[row].decode("utf-8", errors="replace").rstrip("\r") for row in rows]

    total = len(numbered)
    table = _arrow_json_lines(data, total) if total == len(lines) else None
    if table is not None:
        return _Raw(fmt, table.column_names, total, parse, raws, table, np.arange(total))
    records, rejects = parse()
    if rejects or total != len(lines):
        # Arrow still reads the good lines, so a few bad ones do not send the whole file down the per-row path.
        good = [i for i, _ in records]
        table = _arrow_json_lines(b"\n".join(lines[i] for i in good), len(good))
        if table is not None:
            return _Raw(fmt, table.column_names, total, lambda: (records, rejects), raws, table, np.array(good),
                        tuple(rejects))
    return _records_raw(fmt, total, records, rejects, lambda row: raws([row])[0])


def _read_json(path: Path) -> _Raw:
    data = path.read_bytes()
    if data.lstrip()[:1] != b"[":
        return _read_json_lines(data, "json")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {_not_utf8(data, err)}; a JSON array cannot be read row by row") from None
    try:
        items = json.loads(text)
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); a JSON array cannot be read row by row") from err
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    records, rejects = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            rejects.append(_Reject(i, "<json>", f"expected a JSON object, got {type(item).__name__}", "bad json"))
        elif surrogates and (reason := _lone_surrogate(item)):
            rejects.append(_Reject(i, "<json>", reason, "bad encoding"))
        else:
            records.append((i, item))
    return _records_raw("json", len(items), records, rejects, lambda row: _dumps(items[row]))


def _read_csv(path: Path) -> _Raw:
    """Rows are 0-based records after the header; blank lines are not records."""
    limit = csv.field_size_limit(2**31 - 1)  # long dialogues exceed the 128 KiB default
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            lines = [values for values in csv.reader(file) if values]
    except UnicodeDecodeError as err:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as located:
            err = located
        raise DataError(f"{path}: {_not_utf8(data, err)}") from None
    finally:
        csv.field_size_limit(limit)
    if not lines:
        return _records_raw("csv", 0, [], [], str)
    header, body = lines[0], lines[1:]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: repeated column names in the header {header}")
    records, rejects = [], []
    for i, values in enumerate(body):
        if len(values) == len(header):
            records.append((i, dict(zip(header, values))))
        else:
            rejects.append(_Reject(i, "<csv>", f"expected {len(header)} fields, got {len(values)}", "bad csv"))
    return _Raw("csv", header, len(body), lambda: (records, rejects), lambda rows: [_dumps(body[row]) for row in rows])


def _read_datasets(path: Path) -> _Raw:
    import datasets  # slow to import; only this format needs it

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}; pass one split's folder")
    return _arrow_raw("datasets", dataset.with_format("arrow")[:], path)


def _read(path: Path) -> _Raw:
    if path.is_dir():
        return _read_datasets(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _arrow_raw("parquet", read_parquet(path, "Parquet file", DataError), path)
    if suffix == ".jsonl":
        return _read_json_lines(path.read_bytes(), "jsonl")
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{path}: unknown format {suffix!r}; expected .parquet, .json, .jsonl, .csv or a datasets folder")


# --- layouts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    kind: str
    layout: str
    names: dict[str, str]  # our field -> the file's column, for the fields the file has
    # our field -> the value a row gets when it has none: the file lacks the column, or the row's cell is null,
    # absent or (CSV) empty. A row without an optional field is never a reject for it.
    defaults: dict[str, Any]
    fields: dict[str, str]  # every field we know -> as the user's file names it, for errors
    ignored: tuple[str, ...]
    csv: bool

    def field(self, name: str) -> str:
        return self.fields[name]

    def dialogue_field(self, name: str) -> str:
        """Like `field`, with our `messages` named by the columns the layout builds it from."""
        if name == "messages" and self.layout != "messages":
            return "+".join(self.field(column) for column in _LAYOUT_COLUMNS[self.layout])
        return self.field(name)


def _detect(kind: str, have: set[str], source: Path, columns: list[str]) -> str:
    """The layout of the fields the file has (`have`, after column_map); errors name the file's own `columns`."""
    if kind == "preferences":
        if {"chosen", "rejected"} <= have:
            return "explicit" if "prompt" in have else "llama_factory" if "conversations" in have else "implicit"
    elif "messages" in have:
        return "messages"
    elif "conversations" in have:
        return "sharegpt"
    elif kind == "prompts" and "prompt" in have:
        return "prompt"
    elif {"prompt", "completion"} <= have:
        return "prompt_completion"
    elif "instruction" in have and (kind == "prompts" or "output" in have):
        return "alpaca"
    raise DataError(
        f"{source}: no {kind} layout fits the file's columns {columns}; expected {_EXPECTED[kind]} "
        "(column_map renames yours, e.g. column_map={'prompt': 'question'})"
    )


def _context(kind: str, columns: list[str], column_map: Mapping[str, str], defaults: Mapping[str, Any],
             source: Path, is_csv: bool) -> _Context:
    schema_fields = SCHEMAS[kind].names
    known = dict.fromkeys([*schema_fields, *_CONVERSATIONAL])
    scalars = [name for name in schema_fields if name not in _CONVERSATIONAL]
    for given, allowed, what in ((column_map, known, "column_map"), (defaults, scalars, "defaults")):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"{what}: unknown {kind} fields {unknown}; expected some of {list(allowed)}")
    present = set(columns)
    names = {ours: column_map.get(ours, ours) for ours in known}
    names = {ours: theirs for ours, theirs in names.items() if theirs in present}
    layout = _detect(kind, set(names), source, columns)
    # A file without a batch column is one batch; without ratings, every pair is "unsure" (no margin).
    builtin = {"source": source.name} | ({"rating": "unsure", "batch": 1} if kind == "preferences" else {})
    filled = {name: value for name, value in {**builtin, **defaults}.items() if name in schema_fields}
    missing = [name for name in _REQUIRED[kind] if name not in names and name not in filled]
    if missing:
        raise DataError(
            f"{source}: no {missing[0]!r} column; add one, map yours with column_map, or pass "
            f"defaults={{{missing[0]!r}: ...}} (the file's columns: {columns})"
        )
    used = {names[name] for name in (*scalars, *_LAYOUT_COLUMNS[layout]) if name in names}
    ignored = tuple(column for column in columns if column not in used)
    fields = {name: names.get(name, name) for name in known}
    return _Context(kind, layout, names, filled, fields, ignored, is_csv)


# --- the per-row path --------------------------------------------------------------------------------------------

_CSV_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_CSV_INT = re.compile(r"[+-]?\d+")


def _is_conversational(value: Any) -> bool:
    def message(item: Any) -> bool:
        return isinstance(item, dict) and ("role" in item or "from" in item)

    return message(value) or (isinstance(value, list) and bool(value) and all(map(message, value)))


def _csv_structured(text: str) -> Any:
    """A conversational CSV cell: JSON text (or the Python repr pandas writes for list columns); other text stays."""
    if not text.lstrip().startswith(("[", "{")):
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            continue
        if _is_conversational(value):
            return value
    return text


def _csv_number(text: str) -> Any:
    try:
        return int(text) if _CSV_INT.fullmatch(text.strip()) else float(text)
    except ValueError:
        return text  # validation reports the type


def _csv_value(name: str, text: Any) -> Any:
    """CSV cells are all text: give known fields their types back; an empty cell is a missing value."""
    if not isinstance(text, str) or text == "":
        return None if text == "" else text
    if name in _CONVERSATIONAL:
        return _csv_structured(text)
    if name in ("batch", "margin"):
        return _csv_number(text)
    if name in ("chosen_safe", "rejected_safe", "is_safety"):
        return _CSV_BOOLS.get(text.strip().lower(), text)
    return text


_IMPLICIT = ("an implicit-prompt conversation is the prompt's messages (a user turn first, after an optional system "
             "one), then the assistant's answer")


def _implicit_turns(value: Any, field: str) -> list[v.Turn]:
    """One side of an implicit-prompt pair: a user turn (after an optional system one) first, the assistant's answer
    last. The error names the turn and the role order, not just "no prompt"."""
    turns = v.parse_turns(value, field)
    if not turns:
        raise RowError(field, f"no messages; {_IMPLICIT}", "empty text")
    first = turns[1] if turns[0].role == "system" and len(turns) > 1 else turns[0]
    if first.role == "assistant" and len(turns) == 1:
        # Often an answer-only column whose prompt is in another column: say so.
        raise RowError(first.role_field, f"only an 'assistant' message, no prompt before it; {_IMPLICIT} (with a "
                                         "separate prompt column, the prompt/chosen/rejected layout)", "role order")
    if first.role == "assistant":
        raise RowError(first.role_field, f"expected 'user', got 'assistant'; {_IMPLICIT}", "role order")
    if turns[-1].role != "assistant":
        raise RowError(turns[-1].role_field, f"the last message must be the 'assistant' answer, got "
                                             f"{turns[-1].role!r}; {_IMPLICIT}", "role order")
    return turns


def _split_implicit(chosen: Any, rejected: Any, chosen_field: str, rejected_field: str
                    ) -> tuple[v.Dialogue, v.Turn, v.Turn]:
    """TRL's implicit prompt: two conversations sharing every message but their last, which is each answer."""
    chosen_turns, rejected_turns = _implicit_turns(chosen, chosen_field), _implicit_turns(rejected, rejected_field)
    prompt = [(turn.role, turn.content) for turn in chosen_turns[:-1]]
    other = [(turn.role, turn.content) for turn in rejected_turns[:-1]]
    if prompt != other:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise RowError(rejected_field, f"does not share its prompt with {chosen_field} (they differ at message {at})",
                       "implicit prompt")
    return v.Dialogue(chosen_turns[:-1], chosen_field), chosen_turns[-1], rejected_turns[-1]


def _adapt(record: Mapping[str, Any], ctx: _Context) -> dict[str, Any]:
    """One file row -> one row of our schema (without `__row`); raises RowError."""
    parts: dict[str, Any] = {}
    for ours, theirs in ctx.names.items():
        value = record.get(theirs)
        parts[ours] = _csv_value(ours, value) if ctx.csv else value
    for name, value in ctx.defaults.items():
        if parts.get(name) is None:
            parts[name] = value  # a row without the field gets what a file without the column gets
    field, layout = ctx.field, ctx.layout
    if layout in ("explicit", "llama_factory"):
        source = "prompt" if layout == "explicit" else "conversations"
        parts["prompt"] = v.dialogue(parts.get(source), field(source))
        parts["chosen"] = v.answer(parts.get("chosen"), field("chosen"))
        parts["rejected"] = v.answer(parts.get("rejected"), field("rejected"))
    elif layout == "implicit":
        parts["prompt"], parts["chosen"], parts["rejected"] = _split_implicit(
            parts.get("chosen"), parts.get("rejected"), field("chosen"), field("rejected"))
    elif layout in ("messages", "sharegpt"):
        source = "messages" if layout == "messages" else "conversations"
        parts["messages"] = v.Dialogue(v.parse_turns(parts.get(source), field(source)), field(source))
    elif layout == "prompt":
        parts["messages"] = v.dialogue(parts.get("prompt"), field("prompt"))
    elif layout == "alpaca":
        parts["messages"] = _alpaca(parts, ctx)
    else:
        prompt = v.dialogue(parts.get("prompt"), field("prompt"))
        completion = v.dialogue(parts.get("completion"), field("completion"), text_role="assistant")
        parts["messages"] = v.Dialogue(prompt.turns + completion.turns, ctx.dialogue_field("messages"))
    return v.validate_row(ctx.kind, parts, ctx.fields)


def _alpaca(parts: Mapping[str, Any], ctx: _Context) -> v.Dialogue:
    """Alpaca's instruction, its optional input below it (as Alpaca's own template puts it), then the output."""
    instruction, extra = parts.get("instruction"), parts.get("input")
    if not isinstance(instruction, str):
        raise v.missing_or_type(instruction, ctx.field("instruction"), "a string")
    if extra is not None and not isinstance(extra, str):
        raise v.missing_or_type(extra, ctx.field("input"), "a string")
    prompt = v.dialogue(f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction,
                        ctx.field("instruction"))
    if ctx.kind == "prompts":
        return prompt
    output = v.dialogue(parts.get("output"), ctx.field("output"), text_role="assistant")
    return v.Dialogue(prompt.turns + output.turns, ctx.dialogue_field("messages"))


# --- the vectorised path -----------------------------------------------------------------------------------------


class _NeedsRowPath(Exception):
    """A column type the vectorised path does not handle; the whole file takes the per-row path."""


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _cast(column: pa.ChunkedArray | pa.Array, target: pa.DataType, accepts: Callable[[pa.DataType], bool]
          ) -> pa.ChunkedArray | pa.Array:
    if not (pa.types.is_null(column.type) or accepts(column.type)):
        raise _NeedsRowPath
    try:
        return pc.cast(column, target, safe=not pa.types.is_floating(target))  # int -> float32 may round: fine
    except pa.ArrowInvalid as err:  # e.g. an int64 batch beyond int32
        raise _NeedsRowPath from err


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return _cast(column, pa.string(), _is_text)


def _ids(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return _cast(column, pa.string(), lambda t: _is_text(t) or pa.types.is_integer(t))


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _messages(column: pa.ChunkedArray | pa.Array, text_role: str | None) -> pa.ListArray:
    """A message-list column (struct role/content, any extra fields dropped), or a text column as one-turn lists
    when `text_role` says whose turn plain text is."""
    column = _array(column)
    n = len(column)
    if _is_text(column.type) and text_role is not None:
        values = pa.StructArray.from_arrays([pa.repeat(pa.scalar(text_role), n), _text(column)], fields=list(MESSAGE))
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)
    value_type = getattr(column.type, "value_type", None)
    is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    if not is_list or not pa.types.is_struct(value_type):
        raise _NeedsRowPath
    names = {value_type.field(i).name for i in range(value_type.num_fields)}
    if not {"role", "content"} <= names or names & {"from", "value"}:
        raise _NeedsRowPath  # ShareGPT keys, even mixed in, take the per-row path
    flat = pc.list_flatten(column)
    values = pa.StructArray.from_arrays(
        [_text(pc.struct_field(flat, "role")), _text(pc.struct_field(flat, "content"))],
        fields=list(MESSAGE), mask=pc.is_null(flat),
    )
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pc.is_null(column))


def _prompt_completion(prompt: pa.ChunkedArray | pa.Array, completion: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """Two text columns as [user, assistant] lists (conversational ones take the per-row path)."""
    n = len(prompt)
    contents = pa.concat_arrays([_array(_text(prompt)), _array(_text(completion))])
    interleaved = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()
    roles = pa.array(["user", "assistant"]).take(pa.array(np.tile([0, 1], n)))
    values = pa.StructArray.from_arrays([roles, contents.take(pa.array(interleaved))], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), values)


def _working_schema(kind: str) -> pa.Schema:
    """Our schema, every field nullable (ids are filled in later), plus the file row."""
    fields = [pa.field(f.name, f.type) for f in SCHEMAS[kind]]
    return pa.schema([*fields, pa.field(_ROW, pa.int64())])


def _fast_adapt(table: pa.Table, rows: np.ndarray, ctx: _Context) -> tuple[pa.Table, np.ndarray]:
    """Canonical columns built by Arrow (`rows`: each row's place in the file), and the rows it cannot vouch for
    (non-ASCII ratings); raises _NeedsRowPath."""
    n = table.num_rows

    def column(name: str) -> pa.ChunkedArray | pa.Array:
        return table[ctx.names[name]] if name in ctx.names else pa.nulls(n)

    def scalar(name: str, convert: Callable[[Any], Any]) -> pa.ChunkedArray | pa.Array:
        """A scalar field through `convert`, its nulls (all rows, without a column) filled with its default."""
        values = convert(column(name))
        if name not in ctx.defaults or values.null_count == 0:
            return values
        try:
            default = pa.array([ctx.defaults[name]])
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise _NeedsRowPath from err  # validate_row names what is wrong with it
        return pc.fill_null(values, convert(default)[0])  # the default passes the same type checks as a cell

    def boolean(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
        return _cast(column, pa.bool_(), pa.types.is_boolean)

    suspects = np.zeros(n, dtype=bool)
    out: dict[str, Any] = {"id": scalar("id", _ids)}
    if ctx.kind == "preferences":
        if ctx.layout != "explicit":
            raise _NeedsRowPath
        rating, suspects = v.normalise_ratings(scalar("rating", _text))
        out |= {
            "batch": scalar("batch", lambda c: _cast(c, pa.int32(), pa.types.is_integer)),
            "prompt": _messages(column("prompt"), "user"),
            "chosen": _text(column("chosen")),
            "rejected": _text(column("rejected")),
            "rating": rating,
            "margin": scalar("margin", lambda c: _cast(c, pa.float32(), _is_number)),
            "chosen_safe": scalar("chosen_safe", boolean),
            "rejected_safe": scalar("rejected_safe", boolean),
            "kind": scalar("kind", _text),
            "source": scalar("source", _text),
        }
    elif ctx.layout == "messages":
        out["messages"] = _messages(column("messages"), text_role=None)  # the per-row path rejects plain text
    elif ctx.layout == "prompt":
        out["messages"] = _messages(column("prompt"), "user")
    elif ctx.layout == "prompt_completion":
        out["messages"] = _prompt_completion(column("prompt"), column("completion"))
    else:
        raise _NeedsRowPath
    if ctx.kind == "prompts":
        out["category"] = scalar("category", _text)
        out["attack_vector"] = scalar("attack_vector", _text)
        # A row without is_safety (or a file without the column): a risk category makes a safety prompt, as
        # validate_row derives it.
        given = _array(scalar("is_safety", boolean))
        derived = _array(pc.is_in(out["category"], pa.array(RISK_CATEGORIES)))
        out["is_safety"] = pc.if_else(pc.is_null(given), derived, given) if given.null_count else given
    elif ctx.kind == "demonstrations":
        out["category"] = scalar("category", _text)
        out["source"] = scalar("source", _text)
    out["meta"] = scalar("meta", _text)
    out[_ROW] = pa.array(rows, pa.int64())
    schema = _working_schema(ctx.kind)
    return pa.Table.from_arrays([out[name] for name in schema.names], schema=schema), suspects


# --- load --------------------------------------------------------------------------------------------------------


def _messages_array(values: list[list[dict[str, str]]]) -> pa.ListArray:
    """Message lists from Python, via flat role/content lists (several times faster than nested conversion)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(messages) for messages in values], out=offsets[1:])
    roles = pa.array([message["role"] for messages in values for message in messages], pa.string())
    contents = pa.array([message["content"] for messages in values for message in messages], pa.string())
    values = pa.StructArray.from_arrays([roles, contents], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        columns.append(_messages_array(values) if field.type == MESSAGES else pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _convert(raw: _Raw, ctx: _Context) -> tuple[pa.Table, list[_Reject]]:
    """Every row of the file either in the canonical table (sorted by file row) or in the rejects."""
    good: pa.Table | None = None
    if raw.table is not None:
        with contextlib.suppress(_NeedsRowPath):
            good, suspects = _fast_adapt(raw.table, raw.table_rows, ctx)
    if good is not None:
        suspects |= v.screen(good, ctx.kind)
        positions = np.flatnonzero(suspects)
        records = list(zip(raw.table_rows[positions].tolist(), raw.table.take(positions).to_pylist()))
        good, rejects = good.filter(pa.array(~suspects)), list(raw.table_rejects)
    else:
        records, parse_rejects = raw.records()
        rejects = list(parse_rejects)
    accepted = []
    for row, record in records:
        try:
            accepted.append({**_adapt(record, ctx), _ROW: row})
        except RowError as err:
            rejects.append(_Reject(row, err.field, err.reason, err.code))
    table = _table_from_rows(accepted, _working_schema(ctx.kind))
    if good is not None and accepted:
        table = pa.concat_tables([good, table])
        table = table.take(pc.sort_indices(table[_ROW]))
    elif good is not None:
        table = good
    return table, rejects


def _table_rules(table: pa.Table, ctx: _Context, tokenizer: Tokenizer | None, max_tokens: int | None
                 ) -> tuple[pa.Table, list[_Reject]]:
    """Content ids for rows without one, then the context limit, then duplicate ids (first valid row wins)."""
    ids = table["id"].to_pylist()
    missing = [i for i, row_id in enumerate(ids) if row_id is None]
    if missing:
        for i, content_id in zip(missing, v.content_ids(table.take(missing), ctx.kind)):
            ids[i] = content_id
        table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
    rows = table[_ROW].to_pylist()
    errors = []
    if tokenizer is not None and max_tokens is not None:
        errors = v.context_errors(table, ctx.kind, tokenizer, max_tokens, ctx.dialogue_field)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[[position for position, _ in errors]] = False
    kept = np.flatnonzero(keep)
    duplicates = v.duplicate_errors([ids[i] for i in kept], [rows[i] for i in kept], ctx.field("id"))
    errors += [(int(kept[position]), err) for position, err in duplicates]
    keep[[position for position, _ in errors]] = False
    rejects = [_Reject(rows[position], err.field, err.reason, err.code) for position, err in errors]
    return table.filter(pa.array(keep)), rejects


def _defaulted(raw: _Raw, ctx: _Context) -> dict[str, tuple[Any, int]]:
    """Field -> (its default, how many parseable rows had no value for it), for the summary."""
    if raw.table is not None:
        missing = {name: raw.table[ctx.names[name]].null_count if name in ctx.names else raw.table.num_rows
                   for name in ctx.defaults}
    else:
        records, _ = raw.records()
        empty = (None, "") if ctx.csv else (None,)
        missing = {name: sum(record.get(ctx.names[name]) in empty for _, record in records)
                   if name in ctx.names else len(records) for name in ctx.defaults}
    return {name: (ctx.defaults[name], count) for name, count in missing.items() if count}


def _failure(summary: LoadSummary, rejects: list[_Reject], max_share: float, rejects_path: Path | None) -> str:
    shown = 5
    lines = [f"{summary.source}: {summary.rejected} of {summary.total} rows rejected "
             f"(more than max_reject_share={max_share:g}):"]
    lines += [f"  row {r.row}, field {r.field}: {r.reason}" for r in rejects[:shown]]
    if len(rejects) > shown:
        lines.append(f"  ... and {len(rejects) - shown} more")
    lines.append(f"rejects written to {rejects_path}" if rejects_path is not None
                 else "pass rejects_path= to keep every rejected row in a Parquet file")
    return "\n".join(lines)


def load(
    path: str | Path,
    kind: str,
    *,
    column_map: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = None,
    max_reject_share: float = 0.0,
    rejects_path: str | Path | None = None,
) -> LoadResult:
    """Read `path` as `kind` ("prompts", "demonstrations", "preferences") into SCHEMAS[kind].

    column_map: {our field: your column}, applied before the layout is detected. defaults: values for fields a row
    has no value for, whether the file lacks the column or the row's cell is null or empty (built in: source is the
    file name; a preference's rating is "unsure", no strength given, so no margin; its batch is 1, one batch).
    tokenizer + max_tokens: reject rows whose LLaMA-2 chat encoding is longer. Rows failing any rule go to
    `rejects` (and to `rejects_path` as Parquet when given); more than `max_reject_share` of them raises DataError.
    """
    if kind not in TABLE_KINDS:
        raise ValueError(f"kind: expected one of {TABLE_KINDS}, got {kind!r}")
    if (tokenizer is None) != (max_tokens is None):
        raise ValueError("tokenizer and max_tokens go together")
    source = Path(path)
    raw = _read(source)
    if raw.total == 0:
        raise DataError(f"{source}: no rows")
    ctx = _context(kind, raw.columns, column_map or {}, defaults or {}, source, raw.format == "csv")
    table, rejects = _convert(raw, ctx)
    table, more = _table_rules(table, ctx, tokenizer, max_tokens)
    rejects = sorted([*rejects, *more])
    rows = [r.row for r in rejects]
    rejects_table = pa.Table.from_pydict(
        {"source": [str(source)] * len(rejects), "row": rows, "field": [r.field for r in rejects],
         "reason": [r.reason for r in rejects], "raw": raw.raws(rows)},
        schema=REJECTS,
    )
    summary = LoadSummary(
        source=str(source), kind=kind, format=raw.format, layout=ctx.layout, total=raw.total,
        accepted=table.num_rows, rejected=len(rejects),
        by_reason=dict(Counter(r.code for r in rejects).most_common()), ignored_columns=ctx.ignored,
        defaulted=_defaulted(raw, ctx),
    )
    print(summary.render(), file=sys.stderr)
    written = None if rejects_path is None else write_table_atomic(rejects_table, rejects_path)
    if len(rejects) > max_reject_share * raw.total:
        raise DataError(_failure(summary, rejects, max_reject_share, written))
    return LoadResult(table.drop_columns([_ROW]).cast(SCHEMAS[kind]), rejects_table, summary)
