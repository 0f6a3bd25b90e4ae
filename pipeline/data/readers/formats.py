"""File formats: Parquet, JSON, JSONL, CSV and `datasets` folders read into a `_Raw` (not yet interpreted)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from pipeline.data.readers.common import Records, _Raw, _Reject
from pipeline.data.store import read_parquet
from pipeline.data.validate import DataError


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
    except UnicodeDecodeError:
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
