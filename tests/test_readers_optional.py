"""Optional fields that some rows lack, errors that name what the file has, and plain TRL files.

Every file here is written by the test the way a user's own tools write one: JSON lines and Parquet (the
vectorised path), a JSON array and CSV (the per-row path). An optional field a row leaves out (absent key, null,
empty CSV cell) gets the default a file without the column gets, never a reject.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.readers import DataError, load
from pipeline.data.schemas import PREFERENCES, RATINGS


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def rejects_of(result) -> list[tuple[int, str, str]]:
    return [(r["row"], r["field"], r["reason"]) for r in result.rejects.to_pylist()]


# --- writers: rows without a key become an absent key (JSON), a null (Parquet) or an empty cell (CSV) -----------


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json_array(rows: list[dict[str, Any]], path: Path) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path = path.with_suffix(".csv")
    names = _columns(rows)

    def cell(value: Any) -> str:
        if value is None:
            return ""  # an empty cell: no value
        if isinstance(value, bool):
            return str(value).lower()
        return json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(names)
        writer.writerows([[cell(row.get(name)) for name in names] for row in rows])
    return path


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    path = path.with_suffix(".parquet")
    names = _columns(rows)
    pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in names}), path)  # absent: null
    return path


WRITERS = {"jsonl": write_jsonl, "json array": write_json_array, "csv": write_csv, "parquet": write_parquet}


# --- 1 and 5: optional fields some rows lack; duplicates among them ---------------------------------------------


def pair(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": f"A good answer to {prompt}", "rejected": "No.", "kind": "helpfulness",
            **fields}


MIXED = [
    pair("Q0", id="a", batch=2, rating="Better", margin=0.5, source="vendor", chosen_safe=True, rejected_safe=False,
         meta='{"note": 1}'),
    pair("Q1"),  # a plain valid row without any optional field
    pair("Q2", id="c", batch=2, rating="slightly better"),
    pair("Q3", id="d", batch=2, margin=1.0),  # a margin but no rating
    pair("Q4", batch=2, rating="better"),
    pair("Q4", batch=2),  # only differs from the row above in the rating: the same pair, a content-id duplicate
    pair("Q6", id="a", batch=2),  # a duplicate id on a row without rating, margin or source
    pair("Q7", id="h", batch=2, rating="amazing"),  # a bad value is still a reject
    {k: v for k, v in pair("Q8", id="i", batch=2).items() if k != "kind"},  # a required field is still required
]
MIXED_ACCEPTED = [
    # id (None: a content id), batch, rating, margin, chosen_safe, rejected_safe, source, meta
    ("a", 2, "better", 0.5, True, False, "vendor", '{"note": 1}'),
    (None, 1, "unsure", None, None, None, "{name}", None),
    ("c", 2, "slightly_better", None, None, None, "{name}", None),
    ("d", 2, "unsure", 1.0, None, None, "{name}", None),
    (None, 2, "better", None, None, None, "{name}", None),
]


@pytest.mark.parametrize("fmt", WRITERS)
def test_rows_without_optional_fields_get_the_defaults(tmp_path, fmt):
    path = WRITERS[fmt](MIXED, tmp_path / "mixed")
    result = load(path, "preferences", max_reject_share=1.0)
    rows = result.table.to_pylist()
    got = [(r["id"], r["batch"], r["rating"], r["margin"], r["chosen_safe"], r["rejected_safe"], r["source"],
            r["meta"]) for r in rows]
    expected = [tuple(path.name if value == "{name}" else value for value in row) for row in MIXED_ACCEPTED]
    assert [g[1:] for g in got] == [e[1:] for e in expected]
    ids = [r["id"] for r in rows]
    assert [ids[0], ids[2], ids[3]] == ["a", "c", "d"]
    assert len(ids[1]) == len(ids[4]) == 24  # content ids for rows without one
    assert [r["prompt"] for r in rows] == [[user(f"Q{i}")] for i in (0, 1, 2, 3, 4)]
    assert rejects_of(result) == [
        (5, "id", f"duplicate id {rows[4]['id']!r}, first at row 4"),
        (6, "id", "duplicate id 'a', first at row 0"),
        (7, "rating", f"unknown rating 'amazing', expected one of {', '.join(RATINGS)}"),
        (8, "kind", "missing"),
    ]
    assert result.summary.by_reason == {"duplicate id": 2, "unknown rating": 1, "missing field": 1}
    assert result.summary.defaulted == {"rating": ("unsure", 5), "batch": (1, 1), "source": (path.name, 8)}
    assert "defaults for rows without a value: " in result.summary.render()
    assert "rating = 'unsure' (5 rows), batch = 1 (1 row)" in result.summary.render()


def test_every_format_gives_the_same_table(tmp_path):
    tables = []
    for fmt, write in WRITERS.items():
        (tmp_path / fmt).mkdir()
        result = load(write(MIXED, tmp_path / fmt / "mixed"), "preferences", max_reject_share=1.0,
                      defaults={"source": "mine"})
        tables.append(result.table)
        assert [(row, field) for row, field, _ in rejects_of(result)] == [(5, "id"), (6, "id"), (7, "rating"),
                                                                          (8, "kind")], fmt
    assert all(table.equals(tables[0], check_metadata=True) for table in tables[1:])
    assert tables[0].column("source").to_pylist() == ["vendor", "mine", "mine", "mine", "mine"]


def test_a_file_without_the_column_and_a_row_without_the_value_agree(tmp_path):
    rows = [pair("Q0", batch=1), pair("Q1", batch=1)]
    (tmp_path / "none").mkdir()
    without_column = load(write_jsonl(rows, tmp_path / "none" / "p"), "preferences")
    some = [rows[0] | {"rating": None, "margin": None}, rows[1] | {"rating": "unsure"}]
    (tmp_path / "some").mkdir()
    with_column = load(write_parquet(some, tmp_path / "some" / "p"), "preferences")
    assert without_column.table.drop_columns(["source"]).equals(with_column.table.drop_columns(["source"]))
    assert without_column.table.column("rating").to_pylist() == ["unsure", "unsure"]


def test_user_defaults_fill_null_cells_too(tmp_path):
    rows = [pair("Q0", kind="safety", rating="better"), pair("Q1", kind=None, rating=None)]
    for fmt, write in WRITERS.items():
        (tmp_path / fmt).mkdir()
        result = load(write(rows, tmp_path / fmt / "p"), "preferences",
                      defaults={"kind": "helpfulness", "rating": "Negligibly better", "batch": 3})
        assert result.table.select(["kind", "rating", "batch"]).to_pylist() == [
            {"kind": "safety", "rating": "better", "batch": 3},
            {"kind": "helpfulness", "rating": "negligibly_better", "batch": 3},
        ], fmt


def test_rows_without_rating_or_margin_train_without_margin_and_count_as_unsure(tmp_path):
    """The RM stage's rule on what the loader gives: no rating and no margin is "unsure", margin 0 in every
    margin table (the paper's loss without a margin), counted in Table 8's "negligibly better / unsure" column."""
    import torch

    from pipeline.stages.reward_model.algorithm import COLUMN_OF_RATING, accuracy_by_rating, pair_margins

    path = write_csv([pair("Q0", batch=1, rating="better"), pair("Q1", batch=1), pair("Q2", batch=1, margin=2.5)],
                     tmp_path / "p")
    table = load(path, "preferences").table
    assert table.column("rating").to_pylist() == ["better", "unsure", "unsure"]
    for margins in ("none", "small", "large"):
        assert pair_margins(table, margins).tolist()[1:] == [0.0, 2.5]  # the explicit margin still wins
    counts = accuracy_by_rating(torch.ones(3), torch.zeros(3), table.column("rating").to_pylist())["counts"]
    assert counts[COLUMN_OF_RATING["unsure"]] == 2 and counts["better"] == 1


def test_optional_prompt_and_demonstration_fields(tmp_path):
    """is_safety left out by a row is derived from the category (as without the column); attack_vector, meta and
    a demonstration's category and source may be null; the Arrow and per-row paths agree."""
    prompts = [
        {"id": "q0", "prompt": "Q", "category": "illicit_criminal", "attack_vector": "direct", "is_safety": False},
        {"id": "q1", "prompt": "Q", "category": "illicit_criminal"},
        {"id": "q2", "prompt": "Q", "category": "helpful", "meta": '{"a": 1}'},
        {"prompt": "Q2", "category": "borderline", "is_safety": True},
    ]
    demonstrations = [{"prompt": "Q", "completion": "A", "category": "code", "source": "s"},
                      {"prompt": "Q2", "completion": "A2"}]
    for fmt, write in WRITERS.items():
        (tmp_path / fmt).mkdir()
        result = load(write(prompts, tmp_path / fmt / "prompts"), "prompts")
        assert result.table.select(["id", "is_safety", "attack_vector", "meta"]).to_pylist()[:3] == [
            {"id": "q0", "is_safety": False, "attack_vector": "direct", "meta": None},
            {"id": "q1", "is_safety": True, "attack_vector": None, "meta": None},
            {"id": "q2", "is_safety": False, "attack_vector": None, "meta": '{"a": 1}'},
        ], fmt
        assert result.table.column("is_safety").to_pylist()[3] is True
        path = write(demonstrations, tmp_path / fmt / "sft")
        result = load(path, "demonstrations")
        assert result.table.select(["category", "source"]).to_pylist() == [
            {"category": "code", "source": "s"}, {"category": None, "source": path.name}], fmt


# --- 2: a layout that does not fit names the file's columns -----------------------------------------------------


def test_no_layout_names_the_files_columns(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["Q"], "answer": ["A"]}), path)
    for kind in ("preferences", "demonstrations"):
        with pytest.raises(DataError, match=re.escape(
                f"{path}: no {kind} layout fits the file's columns ['question', 'answer']; expected ")):
            load(path, kind)
    result = load(path, "demonstrations", column_map={"prompt": "question", "completion": "answer"})
    assert result.table.column("messages").to_pylist() == [[user("Q"), assistant("A")]]


# --- 3: implicit-prompt rows in the wrong role order ------------------------------------------------------------

IMPLICIT = [
    {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]},
    {"chosen": [assistant("A")], "rejected": [assistant("B")]},
    {"chosen": [assistant("Hi"), user("Q"), assistant("A")], "rejected": [assistant("Hi"), user("Q"), assistant("B")]},
    {"chosen": [user("Q"), assistant("A"), user("Thanks")], "rejected": [user("Q"), assistant("B")]},
    {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q")]},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json array", "csv"])
def test_implicit_prompt_role_order_is_named(tmp_path, fmt):
    path = WRITERS[fmt](IMPLICIT, tmp_path / "implicit")
    result = load(path, "preferences", defaults={"kind": "helpfulness"}, max_reject_share=1.0)
    assert result.summary.layout == "implicit"
    assert result.table.select(["prompt", "chosen", "rejected"]).to_pylist() == [
        {"prompt": [user("Q")], "chosen": "A", "rejected": "B"}]
    rejects = rejects_of(result)
    assert [(row, field) for row, field, _ in rejects] == [
        (1, "chosen[0].role"), (2, "chosen[0].role"), (3, "chosen[2].role"), (4, "rejected[0].role")]
    assert rejects[0][2].startswith("only an 'assistant' message, no prompt before it; an implicit-prompt "
                                    "conversation is the prompt's messages (a user turn first")
    assert "prompt/chosen/rejected layout" in rejects[0][2]
    assert rejects[1][2].startswith("expected 'user', got 'assistant'; an implicit-prompt conversation")
    assert rejects[2][2].startswith("the last message must be the 'assistant' answer, got 'user'")
    assert rejects[3][2].startswith("the last message must be the 'assistant' answer, got 'user'")
    assert result.summary.by_reason == {"role order": 4}


# --- 4: TRL preference files through the library API -----------------------------------------------------------

TRL = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5.", "margin": 1.5},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A dog."},
]
TRL_CONVERSATIONAL = [
    {"prompt": [user("What is 2+2?")], "chosen": [assistant("4.")], "rejected": [assistant("5.")]},
    {"prompt": [user("Name a colour.")], "chosen": [assistant("Blue.")], "rejected": [assistant("A dog.")]},
]


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("rows", [TRL, TRL_CONVERSATIONAL, [{k: v for k, v in r.items() if k != "margin"} for r in TRL]],
                         ids=["with margin", "conversational", "without margin"])
def test_trl_preference_file_is_one_batch(tmp_path, fmt, rows):
    path = WRITERS[fmt](rows, tmp_path / "trl")
    columns = list(rows[0])
    with pytest.raises(DataError, match=re.escape(
            f"{path}: no 'kind' column; add one, map yours with column_map, or pass defaults={{'kind': ...}} "
            f"(the file's columns: {columns})")):
        load(path, "preferences")
    result = load(path, "preferences", defaults={"kind": "helpfulness"})
    assert result.table.schema.equals(PREFERENCES, check_metadata=True)
    assert result.table.select(["batch", "prompt", "chosen", "rating", "kind"]).to_pylist() == [
        {"batch": 1, "prompt": [user("What is 2+2?")], "chosen": "4.", "rating": "unsure", "kind": "helpfulness"},
        {"batch": 1, "prompt": [user("Name a colour.")], "chosen": "Blue.", "rating": "unsure",
         "kind": "helpfulness"},
    ]
    expected_margins = [1.5, None] if "margin" in columns else [None, None]
    assert result.table.column("margin").to_pylist() == expected_margins
    assert result.rejects.num_rows == 0
