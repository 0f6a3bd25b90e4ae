"""Layouts (told apart by the columns) and the per-row path, which alone decides what is accepted and why not."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data import validate as v
from pipeline.data.readers.common import _CONVERSATIONAL, _EXPECTED, _LAYOUT_COLUMNS, _REQUIRED
from pipeline.data.schemas import SCHEMAS
from pipeline.data.validate import DataError, RowError


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
