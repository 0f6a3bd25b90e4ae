"""`load`: a file in, its table, rejects and summary out."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.tokenizer import Tokenizer
from pipeline.data import validate as v
from pipeline.data.readers.common import LoadResult, LoadSummary, TABLE_KINDS, _ROW, _Raw, _Reject
from pipeline.data.readers.formats import _read
from pipeline.data.readers.layouts import _Context, _adapt, _context
from pipeline.data.readers.vectorised import _NeedsRowPath, _fast_adapt, _working_schema
from pipeline.data.schemas import MESSAGE, MESSAGES, REJECTS, SCHEMAS
from pipeline.data.store import write_table_atomic
from pipeline.data.validate import DataError, RowError


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
