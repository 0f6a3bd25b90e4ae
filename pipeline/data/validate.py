"""Row rules for the datasets users bring.

`validate_row` is the authority: it checks one row, already mapped to our field names, and raises `RowError` naming
the field as the user's file does (`messages[2].role`). `screen` is its vectorised shadow over a whole canonical
Arrow table: it flags every row `validate_row` could reject (and maybe a few it accepts), so only flagged rows pay
for the per-row check. Whole-table rules (content ids, context length, duplicate ids) work on accepted rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.chat_template import encode_chat
from model.tokenizer import Tokenizer
from pipeline.data.schemas import (
    ATTACK_VECTORS,
    PREFERENCE_KINDS,
    PROMPT_CATEGORIES,
    RATINGS,
    RISK_CATEGORIES,
    ROLES,
)

# Exactly the characters str.isspace() accepts, so Arrow strips and blanks what str.strip() does.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_RE2_WS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]"
_RE2_BLANK = f"^{_RE2_WS}*$"
_RE2_EDGES = f"^{_RE2_WS}+|{_RE2_WS}+$"
_RE2_RATING_SEP = f"(?:{_RE2_WS}|-)+"
_RATING_SEP = re.compile(f"[{re.escape(WHITESPACE)}-]+")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ROLE_CODES = {role: code for code, role in enumerate(ROLES)}  # system 0, user 1, assistant 2
_INT32_MAX = 2**31 - 1


class DataError(ValueError):
    """A file that cannot be loaded as asked: no rows, an unknown layout, or more bad rows than allowed."""


class RowError(ValueError):
    """One bad value in one row. `code` is the short reason the load summary counts rows by."""

    def __init__(self, field: str, reason: str, code: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


class Turn(NamedTuple):
    """One message. Where it sits in the user's file is kept in parts and spelled out only for an error."""

    role: str
    content: str
    column: str
    index: int | None = None  # its position in the column's list; None: the column holds this one message
    keys: tuple[str, str] | None = None  # its (role, content) keys; None: plain text, the column is the content

    def _at(self, key: int) -> str:
        path = self.column if self.index is None else f"{self.column}[{self.index}]"
        return path if self.keys is None else f"{path}.{self.keys[key]}"

    @property
    def role_field(self) -> str:
        return self._at(0)

    @property
    def content_field(self) -> str:
        return self._at(1)


class Dialogue(NamedTuple):
    turns: list[Turn]
    field: str  # the column it came from, for errors about the dialogue as a whole


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def missing_or_type(value: Any, field: str, expected: str) -> RowError:
    if value is None:
        return RowError(field, "missing", "missing field")
    return RowError(field, f"expected {expected}, got {_type_name(value)}", "wrong type")


# --- parsing conversational values -------------------------------------------------------------------------------


_ROLE_KEYS = ("role", "content")
_SHAREGPT_KEYS = ("from", "value")
_IDENTITY_ROLES = {role: role for role in ROLES}


def parse_message(message: Any, column: str, index: int | None) -> Turn:
    """A {role, content} (TRL/HF) or {from, value} (ShareGPT) dict as a Turn."""
    if not isinstance(message, dict):
        raise missing_or_type(message, Turn("", "", column, index).role_field, "a message object")
    if message.get("role") is None and message.get("from") is not None:
        keys, roles = _SHAREGPT_KEYS, SHAREGPT_ROLES
    else:
        keys, roles = _ROLE_KEYS, _IDENTITY_ROLES
    role, content = message.get(keys[0]), message.get(keys[1])
    if not isinstance(role, str) or role not in roles:
        field = Turn("", "", column, index, keys).role_field
        if role is None:
            raise RowError(field, "missing", "missing field")
        raise RowError(field, f"unknown role {role!r}, expected one of {sorted(roles)}", "bad role")
    if not isinstance(content, str):
        raise missing_or_type(content, Turn("", "", column, index, keys).content_field, "a string")
    return Turn(roles[role], content, column, index, keys)


def parse_turns(value: Any, field: str) -> list[Turn]:
    if not isinstance(value, list):
        raise missing_or_type(value, field, "a list of messages")
    return [parse_message(message, field, i) for i, message in enumerate(value)]


def dialogue(value: Any, field: str, text_role: str = "user") -> Dialogue:
    """A plain string (one `text_role` message) or a list of messages."""
    if isinstance(value, str):
        return Dialogue([Turn(text_role, value, field)], field)
    return Dialogue(parse_turns(value, field), field)


def answer(value: Any, field: str) -> Turn:
    """A preference answer: a string, one message dict (LLaMA-Factory), or a one-message list (TRL conversational)."""
    if isinstance(value, str):
        return Turn("assistant", value, field)
    if isinstance(value, dict):
        return parse_message(value, field, None)
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError(field, f"expected one assistant message, got {len(value)} messages", "wrong type")
        return parse_message(value[0], field, 0)
    raise missing_or_type(value, field, "a string or an assistant message")


# --- per-row checks ----------------------------------------------------------------------------------------------


def check_dialogue(value: Dialogue, end: str) -> list[dict[str, str]]:
    """Roles alternate user/assistant after an optional system message, turns are non-empty, the last is `end`."""
    turns = value.turns
    if not turns:
        raise RowError(value.field, "no messages", "empty text")
    first = 1 if turns[0].role == "system" else 0
    for i, turn in enumerate(turns):
        expected = "system" if i < first else ("user" if (i - first) % 2 == 0 else "assistant")
        if turn.role != expected:
            raise RowError(
                turn.role_field,
                f"expected {expected!r}, got {turn.role!r} (turns alternate user/assistant after an optional system)",
                "role order",
            )
        if not turn.content.strip():
            raise RowError(turn.content_field, "empty", "empty text")
    if turns[-1].role != end:
        raise RowError(turns[-1].role_field, f"the last message must be {end!r}, got {turns[-1].role!r}", "role order")
    return [{"role": turn.role, "content": turn.content} for turn in turns]


def check_answer(turn: Turn) -> str:
    if turn.role != "assistant":
        raise RowError(turn.role_field, f"expected an 'assistant' message, got {turn.role!r}", "role order")
    if not turn.content.strip():
        raise RowError(turn.content_field, "empty", "empty text")
    return turn.content


def normalise_rating(value: str) -> str:
    """Our snake_case name for a rating as people write it ("Significantly Better", "slightly-better")."""
    return _RATING_SEP.sub("_", value.strip().lower())


def check_rating(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise missing_or_type(value, field, "a string")
    rating = normalise_rating(value)
    if rating not in RATINGS:
        raise RowError(field, f"unknown rating {value!r}, expected one of {', '.join(RATINGS)}", "unknown rating")
    return rating


def check_margin(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise missing_or_type(value, field, "a number")
    try:
        with np.errstate(over="ignore"):
            margin = float(np.float32(value))  # the stored precision decides what is finite
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin) or margin < 0:
        raise RowError(field, f"must be finite and >= 0, got {value!r}", "bad value")
    return margin


def check_batch(value: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise missing_or_type(value, field, "an integer")
    if not 1 <= value <= _INT32_MAX:
        raise RowError(field, f"must be a week number >= 1, got {value}", "bad value")
    return value


def check_bool(value: Any, field: str, required: bool) -> bool | None:
    if value is None and not required:
        return None
    if not isinstance(value, bool):
        raise missing_or_type(value, field, "a boolean")
    return value


def check_choice(value: Any, field: str, choices: Sequence[str], required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise missing_or_type(value, field, "a string")
    if value not in choices:
        raise RowError(field, f"unknown value {value!r}, expected one of {', '.join(choices)}", "bad value")
    return value


def check_optional_str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise missing_or_type(value, field, "a string")
    return value


def check_id(value: Any, field: str) -> str | None:
    """None stays None (a content id is filled in later); integers become their decimal text."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise missing_or_type(value, field, "a string")
    if not value.strip():
        raise RowError(field, "empty", "empty text")
    return value


def check_meta(value: Any, field: str) -> str | None:
    """meta is JSON text; structured values are serialised (sorted keys, so equal values give equal text)."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise RowError(field, f"not JSON-serialisable: {err}", "wrong type") from err


def validate_row(kind: str, parts: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """One row in our schema's fields. `parts` maps our names to values (dialogues as Dialogue, answers as Turn),
    defaults already in; a field the row has no value for is absent or None; `fields` spells our names as the file
    does. Fields are checked in schema order and the first problem is raised."""
    get = parts.get
    if kind == "preferences":
        row = {
            "id": check_id(get("id"), fields["id"]),
            "batch": check_batch(get("batch"), fields["batch"]),
            "prompt": check_dialogue(parts["prompt"], end="user"),
            "chosen": check_answer(parts["chosen"]),
            "rejected": check_answer(parts["rejected"]),
            "rating": check_rating(get("rating"), fields["rating"]),
            "margin": check_margin(get("margin"), fields["margin"]),
            "chosen_safe": check_bool(get("chosen_safe"), fields["chosen_safe"], required=False),
            "rejected_safe": check_bool(get("rejected_safe"), fields["rejected_safe"], required=False),
            "kind": check_choice(get("kind"), fields["kind"], PREFERENCE_KINDS),
            "source": check_optional_str(get("source"), fields["source"]),
            "meta": check_meta(get("meta"), fields["meta"]),
        }
        if row["chosen"].strip() == row["rejected"].strip():
            raise RowError(parts["rejected"].content_field, "same text as the chosen answer", "same answers")
        return row
    if kind == "prompts":
        row = {
            "id": check_id(get("id"), fields["id"]),
            "messages": check_dialogue(parts["messages"], end="user"),
            "category": check_choice(get("category"), fields["category"], PROMPT_CATEGORIES),
            "attack_vector": check_choice(get("attack_vector"), fields["attack_vector"], ATTACK_VECTORS, False),
        }
        given = check_bool(get("is_safety"), fields["is_safety"], required=False)
        # A row without is_safety (or a file without the column): a risk category means a safety prompt.
        row["is_safety"] = row["category"] in RISK_CATEGORIES if given is None else given
        row["meta"] = check_meta(get("meta"), fields["meta"])
        return row
    return {
        "id": check_id(get("id"), fields["id"]),
        "messages": check_dialogue(parts["messages"], end="assistant"),
        "category": check_optional_str(get("category"), fields["category"]),
        "source": check_optional_str(get("source"), fields["source"]),
        "meta": check_meta(get("meta"), fields["meta"]),
    }


# --- the vectorised screen ---------------------------------------------------------------------------------------


def _true(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow mask as numpy, null counting as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _blank(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return _true(pc.is_null(strings)) | _true(pc.match_substring_regex(strings, _RE2_BLANK))


def _strip(strings: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.replace_substring_regex(strings, _RE2_EDGES, "")


def normalise_ratings(ratings: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """`normalise_rating` over a column, plus the rows it cannot vouch for (non-ASCII: case mapping may differ)."""
    stripped = _strip(pc.ascii_lower(ratings))
    return pc.replace_substring_regex(stripped, _RE2_RATING_SEP, "_"), ~_true(pc.string_is_ascii(ratings))


def _dialogue_suspects(messages: pa.ChunkedArray | pa.ListArray, end: str) -> np.ndarray:
    """Rows whose message list `check_dialogue` could reject: null or empty lists, null messages, blank turns,
    roles out of the system?/user/assistant/... order, or a last role other than `end`."""
    lists = messages.combine_chunks() if isinstance(messages, pa.ChunkedArray) else messages
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    bad = _true(pc.is_null(lists)) | (lengths == 0)
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return bad
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    codes = pc.fill_null(pc.index_in(pc.struct_field(flat, "role"), value_set=pa.array(ROLES)), -1)
    codes = codes.to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(flat)) - starts[parents]
    has_system = np.zeros(len(lists), dtype=bool)
    has_system[parents[position == 0]] = codes[position == 0] == _ROLE_CODES["system"]
    shifted = position - has_system[parents]
    expected = np.where(shifted < 0, _ROLE_CODES["system"],
                        np.where(shifted % 2 == 0, _ROLE_CODES["user"], _ROLE_CODES["assistant"]))
    bad_message = (codes != expected) | _true(pc.is_null(flat)) | _blank(pc.struct_field(flat, "content"))
    bad[parents[bad_message]] = True
    has_any = lengths > 0
    last = (starts + lengths - 1)[has_any]
    bad[has_any] |= codes[last] != _ROLE_CODES[end]
    return bad


def screen(table: pa.Table, kind: str) -> np.ndarray:
    """Rows of a canonical table (our field names and types, ratings normalised) that may fail `validate_row`."""
    bad = _true(pc.is_valid(table["id"])) & _blank(table["id"])
    if kind == "preferences":
        chosen, rejected = table["chosen"], table["rejected"]
        margin = table["margin"]
        bad |= _dialogue_suspects(table["prompt"], end="user")
        bad |= _blank(chosen) | _blank(rejected) | _true(pc.equal(_strip(chosen), _strip(rejected)))
        bad |= ~_true(pc.is_in(table["rating"], value_set=pa.array(RATINGS)))
        bad |= _true(pc.less(margin, 0)) | _true(pc.invert(pc.is_finite(margin)))
        bad |= ~_true(pc.greater_equal(table["batch"], 1))
        bad |= ~_true(pc.is_in(table["kind"], value_set=pa.array(PREFERENCE_KINDS)))
    elif kind == "prompts":
        attack = table["attack_vector"]
        bad |= _dialogue_suspects(table["messages"], end="user")
        bad |= ~_true(pc.is_in(table["category"], value_set=pa.array(PROMPT_CATEGORIES)))
        bad |= _true(pc.is_valid(attack)) & ~_true(pc.is_in(attack, value_set=pa.array(ATTACK_VECTORS)))
        bad |= _true(pc.is_null(table["is_safety"]))
    else:
        bad |= _dialogue_suspects(table["messages"], end="assistant")
    return bad


# --- whole-table rules on accepted rows --------------------------------------------------------------------------


def _text_key(strings: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Length-prefixed text ("5:hello"), so joined keys of different rows can never coincide."""
    return pc.binary_join_element_wise(pc.cast(pc.utf8_length(strings), pa.string()), strings, ":")


def _dialogue_key(messages: pa.ChunkedArray) -> pa.Array:
    lists = messages.combine_chunks()
    lengths = pc.list_value_length(lists)
    flat = pc.list_flatten(lists)
    per_message = pc.binary_join_element_wise(
        _text_key(pc.struct_field(flat, "role")), _text_key(pc.struct_field(flat, "content")), ""
    )
    offsets = np.concatenate([[0], np.cumsum(lengths.to_numpy(zero_copy_only=False))]).astype(np.int32)
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), per_message), "")
    return pc.binary_join_element_wise(pc.cast(lengths, pa.string()), joined, ":")


def content_ids(table: pa.Table, kind: str) -> list[str]:
    """Stable ids from a row's text (its dialogue, and for preferences both answers): same text -> same id."""
    if kind == "preferences":
        parts = [_dialogue_key(table["prompt"]), _text_key(table["chosen"]), _text_key(table["rejected"])]
    else:
        parts = [_dialogue_key(table["messages"])]
    keys = pc.binary_join_element_wise(*parts, "|")
    return [hashlib.sha256(key.encode()).hexdigest()[:24] for key in keys.to_pylist()]


def context_errors(
    table: pa.Table, kind: str, tokenizer: Tokenizer, max_tokens: int, field: Callable[[str], str]
) -> list[tuple[int, RowError]]:
    """(position, error) for rows whose chat encoding is longer than `max_tokens`; for preferences the longer of
    prompt+chosen and prompt+rejected counts."""
    errors = []
    if kind == "preferences":
        columns = zip(table["prompt"].to_pylist(), table["chosen"].to_pylist(), table["rejected"].to_pylist())
        for i, (prompt, chosen, rejected) in enumerate(columns):
            lengths = {
                name: len(encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": text}]).input_ids)
                for name, text in (("chosen", chosen), ("rejected", rejected))
            }
            name = max(lengths, key=lengths.__getitem__)
            if lengths[name] > max_tokens:
                errors.append((i, RowError(field(name), f"{lengths[name]} tokens > context {max_tokens}", "too long")))
    else:
        for i, messages in enumerate(table["messages"].to_pylist()):
            length = len(encode_chat(tokenizer, messages).input_ids)
            if length > max_tokens:
                errors.append((i, RowError(field("messages"), f"{length} tokens > context {max_tokens}", "too long")))
    return errors


def duplicate_errors(ids: Sequence[str], rows: Sequence[int], field: str) -> list[tuple[int, RowError]]:
    """(position, error) for every id seen before; the error names the file row of the first one."""
    first: dict[str, int] = {}
    errors = []
    for position, (row_id, row) in enumerate(zip(ids, rows)):
        if row_id in first:
            errors.append((position, RowError(field, f"duplicate id {row_id!r}, first at row {first[row_id]}",
                                              "duplicate id")))
        else:
            first[row_id] = row
    return errors
