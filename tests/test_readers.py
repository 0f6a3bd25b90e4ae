"""Readers and validation on real files written by json, csv, pandas and `datasets`; no mocks."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.tokenizer import SentencePieceTokenizer
from pipeline.data.readers import DataError, load
from pipeline.data.schemas import DEMONSTRATIONS, PREFERENCES, PROMPTS, RATINGS, REJECTS
from pipeline.data.validate import WHITESPACE

SCHEMA = {"prompts": PROMPTS, "demonstrations": DEMONSTRATIONS, "preferences": PREFERENCES}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def rejects_of(result) -> list[tuple[int, str, str]]:
    return [(r["row"], r["field"], r["reason"]) for r in result.rejects.to_pylist()]


# --- formats ---------------------------------------------------------------------------------------------------

PREFERENCE_ROWS = [
    {"id": "a", "batch": 1, "prompt": [user("Hi there?")], "chosen": "Hello! How can I help?",
     "rejected": "Go away.", "rating": "better", "margin": None, "chosen_safe": None, "rejected_safe": None,
     "kind": "helpfulness", "source": "fixture", "meta": None},
    {"id": "b", "batch": 2,
     "prompt": [system("Be brief."), user("2+2?"), assistant("4"), user("and 3+3?")],
     "chosen": "6", "rejected": "7", "rating": "significantly_better", "margin": 1.5, "chosen_safe": True,
     "rejected_safe": False, "kind": "safety", "source": "fixture", "meta": '{"note": "x"}'},
]
EXPECTED = pa.Table.from_pylist(PREFERENCE_ROWS, schema=PREFERENCES)


def _csv_frame() -> pd.DataFrame:
    frame = pd.DataFrame(PREFERENCE_ROWS)
    frame["prompt"] = frame["prompt"].map(json.dumps)  # conversational CSV cells hold JSON text
    return frame


WRITERS = {
    "json array": lambda rows, path: path.with_suffix(".json").write_text(json.dumps(rows)),
    "jsonl": lambda rows, path: write_jsonl(path.with_suffix(".jsonl"), rows),
    "datasets to_json": lambda rows, path: _datasets(rows).to_json(str(path.with_suffix(".json"))),
    "datasets to_parquet": lambda rows, path: _datasets(rows).to_parquet(str(path.with_suffix(".parquet"))),
    "datasets save_to_disk": lambda rows, path: _datasets(rows).save_to_disk(str(path)),
    "pandas to_csv": lambda rows, path: _csv_frame().to_csv(path.with_suffix(".csv")),
    "pandas to_csv, list repr": lambda rows, path: pd.DataFrame(rows).to_csv(path.with_suffix(".csv"), index=False),
    "pandas to_json lines": lambda rows, path: pd.DataFrame(rows).to_json(
        path.with_suffix(".jsonl"), orient="records", lines=True),
    "pandas to_parquet": lambda rows, path: pd.DataFrame(rows).to_parquet(path.with_suffix(".parquet")),
}


def _datasets(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("writer", WRITERS)
def test_every_format_round_trips(tmp_path, writer):
    WRITERS[writer](PREFERENCE_ROWS, tmp_path / "prefs")
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("prefs")]
    result = load(path, "preferences")
    assert result.table.to_pylist() == EXPECTED.to_pylist()
    assert result.table.equals(EXPECTED, check_metadata=True)
    assert result.rejects.num_rows == 0 and result.rejects.schema.equals(REJECTS, check_metadata=True)
    assert (result.summary.total, result.summary.accepted, result.summary.rejected) == (2, 2, 0)
    if writer == "pandas to_csv":
        assert result.summary.ignored_columns == ("",)  # pandas' index column


# --- layouts ---------------------------------------------------------------------------------------------------

LAYOUTS = [
    # (kind, file rows, load kwargs, expected (field -> value) for the one output row)
    ("prompts", {"messages": [user("Q")], "category": "helpful"}, {},
     {"messages": [user("Q")], "category": "helpful", "is_safety": False, "attack_vector": None}),
    ("prompts", {"prompt": "How do I pick a lock?", "category": "illicit_criminal", "attack_vector": "role_play"}, {},
     {"messages": [user("How do I pick a lock?")], "is_safety": True, "attack_vector": "role_play"}),
    ("prompts", {"conversations": [{"from": "human", "value": "Q"}]}, {"defaults": {"category": "borderline"}},
     {"messages": [user("Q")], "category": "borderline", "is_safety": False}),
    ("demonstrations", {"messages": [system("S"), user("Q"), assistant("A")]}, {},
     {"messages": [system("S"), user("Q"), assistant("A")], "source": "data.{ext}"}),
    ("demonstrations", {"prompt": "Q", "completion": "A"}, {},
     {"messages": [user("Q"), assistant("A")]}),
    ("demonstrations", {"prompt": [user("Q")], "completion": [assistant("A")], "category": "code"}, {},
     {"messages": [user("Q"), assistant("A")], "category": "code"}),
    ("demonstrations",
     {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                        {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                        {"from": "assistant", "value": "A2"}]}, {},
     {"messages": [system("S"), user("Q"), assistant("A"), user("Q2"), assistant("A2")]}),
    ("preferences", {"prompt": "Q", "chosen": "A", "rejected": "B"},
     {"defaults": {"batch": 3, "kind": "helpfulness", "source": "vendor-x"}},
     {"prompt": [user("Q")], "chosen": "A", "rejected": "B", "rating": "unsure", "batch": 3, "source": "vendor-x"}),
    ("preferences", {"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [assistant("B")],
                     "rating": "Significantly Better", "batch": 1, "kind": "safety"}, {},
     {"prompt": [user("Q")], "chosen": "A", "rejected": "B", "rating": "significantly_better"}),
    ("preferences", {"chosen": [user("Q"), assistant("Q2?"), user("Q3"), assistant("A")],
                     "rejected": [user("Q"), assistant("Q2?"), user("Q3"), assistant("B")],
                     "margin": 2, "rating": "slightly-better"},
     {"defaults": {"batch": 1, "kind": "helpfulness"}},
     {"prompt": [user("Q"), assistant("Q2?"), user("Q3")], "chosen": "A", "rejected": "B", "margin": 2.0,
      "rating": "slightly_better"}),
    ("preferences", {"conversations": [{"from": "human", "value": "Q"}],
                     "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
     {"defaults": {"batch": 1, "kind": "helpfulness"}},
     {"prompt": [user("Q")], "chosen": "A", "rejected": "B"}),
    ("preferences", {"question": "Q", "good": "A", "bad": "B", "grade": "Negligibly  Better", "week": 4,
                     "kind": "helpfulness", "extra": 1},
     {"column_map": {"prompt": "question", "chosen": "good", "rejected": "bad", "rating": "grade", "batch": "week"}},
     {"prompt": [user("Q")], "chosen": "A", "rejected": "B", "rating": "negligibly_better", "batch": 4}),
]


@pytest.mark.parametrize("ext", ["jsonl", "json"])  # JSON lines take the Arrow path, a JSON array the per-row one
@pytest.mark.parametrize(("kind", "row", "kwargs", "expected"), LAYOUTS)
def test_layouts(tmp_path, kind, row, kwargs, expected, ext):
    path = tmp_path / f"data.{ext}"
    if ext == "jsonl":
        write_jsonl(path, [row])
    else:
        path.write_text(json.dumps([row]))
    result = load(path, kind, **kwargs)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert result.table.schema.equals(SCHEMA[kind], check_metadata=True)
    (out,) = result.table.to_pylist()
    assert {name: out[name] for name in expected} == {
        name: value.format(ext=ext) if isinstance(value, str) else value for name, value in expected.items()
    }
    assert len(out["id"]) == 24  # a content id


def test_csv_with_json_conversations(tmp_path):
    import csv

    path = tmp_path / "sft.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "conversations", "category"])
        writer.writerow(["d1", json.dumps([{"from": "human", "value": "Q, \"quoted\"\nline"},
                                           {"from": "gpt", "value": "A"}]), "chat"])
        writer.writerow(["d2", "not json", "chat"])
        writer.writerow(["d3", "[{\"from\": \"human\"", "chat"])
        writer.writerow(["d4", "too", "many", "fields"])
    result = load(path, "demonstrations", max_reject_share=1.0)
    assert result.table.to_pylist()[0]["messages"] == [user("Q, \"quoted\"\nline"), assistant("A")]
    assert rejects_of(result) == [
        (1, "conversations", "expected a list of messages, got str"),
        (2, "conversations", "expected a list of messages, got str"),
        (3, "<csv>", "expected 3 fields, got 4"),
    ]


# --- the corrupted file ----------------------------------------------------------------------------------------


def good(row_id: str, **changes):
    row = {"id": row_id, "batch": 1, "prompt": [user("What is the capital of France?")],
           "chosen": "Paris is the capital.", "rejected": "Rome, I think.", "rating": "better",
           "kind": "helpfulness"}
    return {**row, **changes}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"what is the capital of france paris is the capital rome i think number {i}" for i in range(100)]
    return SentencePieceTokenizer.train(texts, vocab_size=320)


def corrupted_lines() -> list[str]:
    missing = good("p3")
    del missing["chosen"]
    return [
        json.dumps(good("p0")),
        json.dumps(good("p1", rating="Slightly Better", margin=0.5)),
        json.dumps(good("p2"))[:40],  # a truncated line
        json.dumps(missing),
        json.dumps(good("p4", prompt=[user("Hi"), user("Hi again")])),
        json.dumps(good("p5", rejected="   ")),
        json.dumps(good("p6", chosen="paris " * 300)),
        json.dumps(good("p7", rating="amazing")),
        json.dumps(good("p0", chosen="A different answer.")),
        json.dumps(good("p9")),
    ]


EXPECTED_REJECTS = [
    (2, "<json>", "invalid JSON"),
    (3, "chosen", "missing"),
    (4, "prompt[1].role", "expected 'assistant', got 'user'"),
    (5, "rejected", "empty"),
    (6, "chosen", "tokens > context 64"),
    (7, "rating", "unknown rating 'amazing'"),
    (8, "id", "duplicate id 'p0', first at row 0"),
]


def test_corrupted_file(tmp_path, tokenizer, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(corrupted_lines()) + "\n")
    rejects_path = tmp_path / "out" / "rejects.parquet"
    with pytest.raises(DataError) as raised:
        load(path, "preferences", tokenizer=tokenizer, max_tokens=64, rejects_path=rejects_path)
    message = str(raised.value)
    assert str(path) in message and "7 of 10 rows rejected" in message
    assert "row 2, field <json>: invalid JSON" in message and "row 3, field chosen: missing" in message
    assert f"rejects written to {rejects_path}" in message
    written = pq.read_table(rejects_path)
    assert [(r["row"], r["field"]) for r in written.to_pylist()] == [(r, f) for r, f, _ in EXPECTED_REJECTS]

    result = load(path, "preferences", tokenizer=tokenizer, max_tokens=64, max_reject_share=1.0)
    assert result.table.column("id").to_pylist() == ["p0", "p1", "p9"]
    assert result.table.to_pylist()[1]["rating"] == "slightly_better"
    assert [(row, field) for row, field, _ in rejects_of(result)] == [(r, f) for r, f, _ in EXPECTED_REJECTS]
    for (_, _, reason), (_, _, expected) in zip(rejects_of(result), EXPECTED_REJECTS):
        assert expected in reason
    assert result.rejects.column("source").to_pylist() == [str(path)] * 7
    assert result.rejects.column("raw").to_pylist()[0] == corrupted_lines()[2]  # the line as it was
    assert json.loads(result.rejects.column("raw").to_pylist()[1])["id"] == "p3"
    assert result.summary.by_reason == {"bad json": 1, "missing field": 1, "role order": 1, "empty text": 1,
                                        "too long": 1, "unknown rating": 1, "duplicate id": 1}
    assert "accepted" in capsys.readouterr().err


def test_jsonl_rows_are_line_numbers(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps(good("a")), "", "  ", json.dumps(good("b", rating="great"))]) + "\n")
    result = load(path, "preferences", max_reject_share=1.0)
    assert result.summary.total == 2 and result.table.column("id").to_pylist() == ["a"]
    assert rejects_of(result) == [(3, "rating", "unknown rating 'great', expected one of " + ", ".join(RATINGS))]


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "prompt,chosen,rejected\n"), ("empty.json", "[]"),
])
def test_empty_file_fails(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="no rows"):
        load(tmp_path / name, "preferences")


def test_empty_parquet_fails(tmp_path):
    pq.write_table(EXPECTED.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="no rows"):
        load(tmp_path / "empty.parquet", "preferences")


def test_file_level_errors(tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"no 'kind' column.*defaults=\{'kind': \.\.\.\} "
                                        r"\(the file's columns: \['prompt', 'chosen', 'rejected'\]\)"):
        load(path, "preferences")
    with pytest.raises(DataError, match="no demonstrations layout fits"):
        load(path, "demonstrations")
    with pytest.raises(ValueError, match="column_map: unknown preferences fields"):
        load(path, "preferences", column_map={"answer": "chosen"})
    with pytest.raises(DataError, match="unknown format"):
        load(tmp_path / "prefs.txt", "preferences")


# --- ids and the two paths -------------------------------------------------------------------------------------


def test_content_ids_are_stable_and_catch_repeats(tmp_path):
    rows = [{k: v for k, v in good("x").items() if k != "id"} for _ in range(2)]
    rows.append({**rows[0], "chosen": "Paris."})
    write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    first = load(tmp_path / "a.jsonl", "preferences", max_reject_share=1.0)
    again = load(tmp_path / "a.jsonl", "preferences", max_reject_share=1.0)
    other = load(tmp_path / "a.parquet", "preferences", max_reject_share=1.0)
    ids = first.table.column("id").to_pylist()
    assert ids == again.table.column("id").to_pylist() == other.table.column("id").to_pylist()
    assert len(set(ids)) == 2
    assert rejects_of(first) == [(1, "id", f"duplicate id {ids[0]!r}, first at row 0")]


TRICKY = [
    good("t0", chosen="\u3000Paris\u2028"),
    good("t1", chosen="Same answer ", rejected="\tSame answer"),
    good("t2", chosen="\u3000 \x1c"),
    good("t3", rating=" BETTER "),
    good("t4", rating="négligibly better"),
    good("t5", margin=-0.5),
    good("t6", margin=math.nan),
    good("t7", batch=0),
    good("t8", kind="other"),
    good("t9", prompt=[system("only a system message")]),
    good("t10", prompt=[user("Q"), assistant("A")]),
    good("t11", prompt=[system("S"), user("Q"), assistant("A"), user("Q2")]),
    good("t12", prompt=[user("Q"), {"role": "assistant", "content": None}, user("Q2")]),
    good("t13", prompt=[user("Q"), {"role": "robot", "content": "beep"}, user("Q2")]),
    good("t14", prompt=[]),
    good("t15", prompt=[None]),
    good(" "),
    good("t17", chosen=None),
    good("t18", margin=1e300),
    good("t19", rating="Negligibly-Better"),
    {k: v for k, v in good("t20").items() if k != "id"},
]


def both_paths(tmp_path, kind, rows, **kwargs):
    """Parquet goes through the vectorised screen, a JSON array through the per-row checks: same verdicts."""
    columns = {name: [row.get(name) for row in rows] for name in dict.fromkeys(k for r in rows for k in r)}
    pq.write_table(pa.table(columns), tmp_path / "tricky.parquet")
    (tmp_path / "tricky.json").write_text(json.dumps(rows))
    kwargs = {"max_reject_share": 1.0, "defaults": {"source": "tricky"} if kind != "prompts" else {}, **kwargs}
    arrow = load(tmp_path / "tricky.parquet", kind, **kwargs)
    per_row = load(tmp_path / "tricky.json", kind, **kwargs)
    assert rejects_of(arrow) == rejects_of(per_row)
    assert arrow.table.equals(per_row.table)
    return arrow


def test_arrow_and_per_row_paths_agree(tmp_path):
    arrow = both_paths(tmp_path, "preferences", TRICKY)
    accepted = arrow.table.column("id").to_pylist()
    assert accepted[:5] == ["t0", "t3", "t11", "t19", accepted[4]] and len(accepted) == 5
    assert dict((row, field) for row, field, _ in rejects_of(arrow)) == {
        1: "rejected", 2: "chosen", 4: "rating", 5: "margin", 6: "margin", 7: "batch", 8: "kind",
        9: "prompt[0].role", 10: "prompt[1].role", 12: "prompt[1].content", 13: "prompt[1].role", 14: "prompt",
        15: "prompt[0]", 16: "id", 17: "chosen", 18: "margin",
    }


def test_whitespace_is_pythons():
    assert WHITESPACE == "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


def test_arrow_and_per_row_paths_agree_on_prompts_and_demonstrations(tmp_path):
    prompts = [
        {"id": "q0", "messages": [user("Q")], "category": "helpful", "attack_vector": None},
        {"id": "q1", "messages": [user("Q")], "category": "unknown", "attack_vector": None},
        {"id": "q2", "messages": [user("Q")], "category": "illicit_criminal", "attack_vector": "direct"},
        {"id": "q3", "messages": [user("Q"), assistant("A")], "category": "helpful", "attack_vector": None},
        {"id": "q4", "messages": [system("S"), user("Q")], "category": "borderline", "attack_vector": None},
        {"id": "q5", "messages": [user("Q")], "category": "hateful_harmful", "attack_vector": "laser"},
        {"id": "q6", "messages": [user("Q")], "category": None, "attack_vector": None},
        {"id": "q7", "messages": [user(" \n ")], "category": "helpful", "attack_vector": None},
    ]
    (tmp_path / "p").mkdir()
    result = both_paths(tmp_path / "p", "prompts", prompts)
    assert result.table.column("id").to_pylist() == ["q0", "q2", "q4"]
    assert result.table.column("is_safety").to_pylist() == [False, True, False]
    assert [(row, field) for row, field, _ in rejects_of(result)] == [
        (1, "category"), (3, "messages[1].role"), (5, "attack_vector"), (6, "category"), (7, "messages[0].content")]

    demonstrations = [
        {"id": "d0", "prompt": "Q", "completion": "A"},
        {"id": "d1", "prompt": "Q", "completion": None},
        {"id": "d2", "prompt": "Q", "completion": "\t"},
        {"id": "d3", "prompt": "", "completion": "A"},
    ]
    (tmp_path / "d").mkdir()
    result = both_paths(tmp_path / "d", "demonstrations", demonstrations)
    assert result.table.column("id").to_pylist() == ["d0"]
    assert rejects_of(result) == [(1, "completion", "missing"), (2, "completion", "empty"), (3, "prompt", "empty")]


def test_plain_text_is_not_a_message_list(tmp_path):
    pq.write_table(pa.table({"messages": ["Q"], "category": ["helpful"]}), tmp_path / "p.parquet")
    result = load(tmp_path / "p.parquet", "prompts", max_reject_share=1.0)
    assert rejects_of(result) == [(0, "messages", "expected a list of messages, got str")]


def test_alpaca_layout_joins_instruction_and_input(tmp_path):
    """LLaMA-Factory's alpaca_en_demo.json layout: the input goes below the instruction; a bad row is a reject."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": 7, "input": "", "output": "x"},
    ]))
    result = load(path, "demonstrations", max_reject_share=0.5)
    assert result.summary.layout == "alpaca"
    assert result.table.column("messages").to_pylist() == [
        [user("Translate to French.\n\nGood morning"), assistant("Bonjour")],
        [user("Name a colour."), assistant("Blue.")],
    ]
    assert rejects_of(result) == [(2, "instruction", "expected a string, got int")]
    prompts = load(path, "prompts", defaults={"category": "helpful"}, max_reject_share=0.5)
    assert prompts.table.column("messages").to_pylist()[0] == [user("Translate to French.\n\nGood morning")]
