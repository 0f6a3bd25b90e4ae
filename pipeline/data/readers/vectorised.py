"""The vectorised path: Arrow inputs with plain column types become the canonical columns in pyarrow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import validate as v
from pipeline.data.readers.common import _ROW
from pipeline.data.readers.layouts import _Context
from pipeline.data.schemas import MESSAGE, RISK_CATEGORIES, SCHEMAS


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
