"""The world's tables: schemas, determinism, the held-out split, batch growth, coverage, config errors, CLI."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import schemas
from pipeline.world import (QUALITIES, Prompt, World, WorldConfig, build_tables, demonstrations_table, judge,
                            judge_dialogue, preference_batch, respond, table26_sizes, write_tables)
from pipeline.world.__main__ import main
from pipeline.world.corpus import corpus
from pipeline.world.oracle import is_harmful

SMALL = dict(n_people=12, n_places=8, train_helpful=60, train_borderline=20, train_safety_per_cell=2,
             train_dialogues=10, eval_helpful=40, eval_borderline=10, eval_safety_per_cell=1, eval_dialogues=10,
             sft_demonstrations=80, corpus_documents=400, batch_sizes=(20, 40, 80))
CELLS = {(c, v) for c in schemas.RISK_CATEGORIES for v in schemas.ATTACK_VECTORS}


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    """The default world, built once."""
    return build_tables(World(WorldConfig()))


def _preferences(tables: dict[str, pa.Table]) -> list[pa.Table]:
    return [t for name, t in sorted(tables.items()) if name.startswith("preferences_")]


def test_every_table_validates_against_its_schema(tables):
    expected = {"prompts_train": schemas.PROMPTS, "prompts_eval": schemas.PROMPTS,
                "demonstrations": schemas.DEMONSTRATIONS, "corpus": schemas.CORPUS}
    for name, table in tables.items():
        schema = expected.get(name, schemas.PREFERENCES)
        assert table.schema.equals(schema, check_metadata=True), name
        table.validate(full=True)
        assert table.num_rows > 0, name
        for field in schema:
            if not field.nullable:
                assert table.column(field.name).null_count == 0, (name, field.name)
        if "id" in table.column_names:
            assert len(set(table.column("id").to_pylist())) == table.num_rows, name
        if "meta" in table.column_names:
            for meta in table.column("meta").to_pylist():
                json.loads(meta)
    for split in ("train", "eval"):
        for row in tables[f"prompts_{split}"].to_pylist():
            assert row["category"] in schemas.PROMPT_CATEGORIES
            assert row["is_safety"] == (row["category"] in schemas.RISK_CATEGORIES)
            assert (row["attack_vector"] in schemas.ATTACK_VECTORS) == row["is_safety"]
            assert row["messages"][-1]["role"] == "user"
            assert all(m["role"] in schemas.ROLES and m["content"] for m in row["messages"])
    for row in tables["demonstrations"].to_pylist():
        assert row["messages"][-1]["role"] == "assistant" and row["category"] in schemas.PROMPT_CATEGORIES
    for table in _preferences(tables):
        for row in table.to_pylist():
            assert row["rating"] in schemas.RATINGS and row["kind"] in schemas.PREFERENCE_KINDS
            assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]


def test_same_config_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    paths = [write_tables(build_tables(World(WorldConfig(seed=seed, **SMALL))), tmp_path / f"{run}")
             for run, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert [p.name for p in paths[0]] == [p.name for p in paths[1]]
    for a, b in zip(paths[0], paths[1]):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert any(a.read_bytes() != c.read_bytes() for a, c in zip(paths[0], paths[2]))


def _keys(meta: dict) -> set[str]:
    """The task keys a prompt's meta stands for: a dialogue stands for its instruction and every turn's task."""
    return {meta["key"], *(t["key"] for t in meta.get("turns", []))}


def _user_turns(messages: list[dict]) -> set[str]:
    return {m["content"] for m in messages if m["role"] == "user"}


def test_held_out_prompts_never_reach_training_data(tables):
    eval_rows = tables["prompts_eval"].to_pylist()
    eval_keys = set().union(*(_keys(json.loads(r["meta"])) for r in eval_rows))
    eval_texts = set().union(*(_user_turns(r["messages"]) for r in eval_rows))

    train_keys: set[str] = set()
    train_texts: set[str] = set()
    for row in tables["prompts_train"].to_pylist() + tables["demonstrations"].to_pylist():
        train_keys |= _keys(json.loads(row["meta"]))
        train_texts |= _user_turns(row["messages"])
    for table in _preferences(tables):
        for row in table.to_pylist():
            train_keys.add(json.loads(row["meta"])["key"])
            train_texts |= _user_turns(row["prompt"])
    for text in tables["corpus"].column("text").to_pylist():
        train_texts |= {line[len("User: "):] for line in text.split("\n") if line.startswith("User: ")}

    assert len(eval_keys) > 300 and len(train_texts) > 5000
    assert not eval_keys & train_keys
    assert not eval_texts & train_texts
    # Dialogue turns are tasks too: held out with the rest.
    dialogue_turn_keys = {k for r in tables["prompts_train"].to_pylist() if r["category"] == "dialogue"
                          for k in _keys(json.loads(r["meta"]))}
    assert not dialogue_turn_keys & eval_keys


def test_every_risk_cell_is_present_everywhere_it_matters(tables):
    for name in ("prompts_train", "prompts_eval", "demonstrations"):
        rows = tables[name].to_pylist()
        cells = {(r["category"], r["attack_vector"] if "attack_vector" in r else json.loads(r["meta"])["attack_vector"])
                 for r in rows if r["category"] in schemas.RISK_CATEGORIES}
        assert cells == CELLS, name
    for table in _preferences(tables)[1:]:  # batch 1 (18 safety pairs) is smaller than the 21 cells
        metas = [json.loads(m) for m, k in zip(table.column("meta").to_pylist(), table.column("kind").to_pylist())
                 if k == "safety"]
        assert {(m["category"], m["attack_vector"]) for m in metas} == CELLS


def test_batches_grow_like_table_26(tables):
    sizes = WorldConfig().batch_sizes
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    assert [t.num_rows for t in _preferences(tables)] == list(sizes)
    assert table26_sizes(14, 5561)[-1] == 249356 and table26_sizes(1, 7) == (7,)
    for batch, table in enumerate(_preferences(tables), start=1):
        assert set(table.column("batch").to_pylist()) == {batch}
        kinds = table.column("kind").to_pylist()
        assert kinds.count("safety") == round(sizes[batch - 1] * WorldConfig().safety_share)


def test_preference_labels_agree_with_the_oracle(tables):
    """Safety labels are the oracle's; on safety prompts the chosen answer is never the only unsafe one."""
    unsafe_rejected = 0
    for table in _preferences(tables):
        for row in table.to_pylist():
            assert row["chosen_safe"] == (not is_harmful(row["chosen"]))
            assert row["rejected_safe"] == (not is_harmful(row["rejected"]))
            if row["kind"] == "safety":
                assert row["chosen_safe"] or not row["rejected_safe"]
                unsafe_rejected += not row["rejected_safe"]
    assert unsafe_rejected > 100


def test_demonstrations_are_right_and_lose_only_to_their_writers_habits(tables):
    """Every demonstration holds the right answer (world v3); a helpful or borderline one scores below 1 exactly
    when its writer showed a habit, and only a needless refusal leaves the answer out."""
    for row in tables["demonstrations"].to_pylist():
        meta, messages = json.loads(row["meta"]), row["messages"]
        verdict = judge(row["category"], meta, messages[-1]["content"])
        habits = meta.get("habits", [])
        if row["category"] in schemas.RISK_CATEGORIES:
            assert verdict.safe and verdict.refused and verdict.safety == 1.0
        else:
            assert (verdict.helpfulness == 1.0) == (not habits), (habits, messages[-1]["content"])
            assert verdict.correct or habits == ["refusal"], messages[-1]["content"]
        if row["category"] == "dialogue":
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            assert all(v.adherent and v.correct for v in judge_dialogue(meta, answers))


def test_sft_mix_sets_the_demonstrations_by_kind():
    mix = {"helpful": 0.6, "borderline": 0.2, "safety": 0.0, "dialogue": 0.2}
    config = WorldConfig.from_mapping({**SMALL, "sft_mix": mix})
    categories = demonstrations_table(World(config)).column("category").to_pylist()
    kinds = ["safety" if c in schemas.RISK_CATEGORIES else c for c in categories]
    assert {k: kinds.count(k) for k in mix} == {"helpful": 48, "borderline": 16, "safety": 0, "dialogue": 16}


def test_sft_flaw_share_writes_visible_flaws_on_the_same_prompts():
    """World v2's lever: clean demonstrations, a share of them written with one flaw."""
    v2 = {**SMALL, "version": 2}
    clean = demonstrations_table(World(WorldConfig.from_mapping(v2))).to_pylist()
    sloppy = demonstrations_table(World(WorldConfig.from_mapping({**v2, "sft_flaw_share": 0.5}))).to_pylist()
    assert [r["messages"][:-1] for r in clean] == [r["messages"][:-1] for r in sloppy]  # the same prompts
    changed = [(c, s) for c, s in zip(clean, sloppy) if c["messages"][-1] != s["messages"][-1]]
    assert {c["category"] for c, _ in changed} <= {"helpful", "borderline"}  # safety and dialogues stay clean
    task_rows = sum(r["category"] in ("helpful", "borderline") for r in clean)
    assert 0.3 * task_rows < len(changed) < 0.7 * task_rows  # each drawn at random: about half
    for _, s in changed:  # every flaw costs helpfulness
        meta, answer = json.loads(s["meta"]), s["messages"][-1]["content"]
        assert judge(s["category"], meta, answer).helpfulness < 1.0, answer


def test_corpus_mixes_good_and_bad_behaviour_and_states_every_fact(tables):
    rows = tables["corpus"].to_pylist()
    seen = {(r["category"], r["quality"]) for r in rows if r["kind"] == "qa"}
    for cell in [("helpful", "concise"), ("helpful", "wrong"), ("borderline", "refusal"),
                 ("borderline", "concise"), ("illicit_criminal", "unsafe"), ("hateful_harmful", "redirect")]:
        assert cell in seen, cell
    assert {r["kind"] for r in rows} == {"encyclopedia", "qa", "dialogue"}
    text = "\n".join(r["text"] for r in rows)
    world = World(WorldConfig())
    for person in world.facts.people:
        assert f"{person.name} lives in {person.home_town}." in text
    for place in world.facts.places:
        assert f"About {place.population} people live in {place.name}." in text


def test_copy_heavy_documents_take_their_share_and_leave_the_rest_of_the_mix():
    world = World(WorldConfig(**SMALL, corpus_copy_share=0.25))
    docs = corpus(world)
    copies = [d for d in docs if d.kind == "copy"]
    assert len(copies) == 100 and {d.kind for d in docs} == {"encyclopedia", "qa", "dialogue", "copy"}
    for doc in copies:  # its first two names recur in it (the third of "who did A meet, B or C?" may not)
        words = re.findall(r"\b[A-Z][a-z]+\b", doc.text)
        names_in = [w for w in words if w not in ("User", "Assistant", "Repeat", "Say", "Who")]
        assert all(words.count(w) >= 2 for w in names_in[:2]), doc.text
    names = {p.name for p in world.facts.people} | {t.name for t in world.facts.places}
    with_world_names = [doc for doc in copies if any(name in doc.text for name in names)]
    assert 0 < len(with_world_names) < len(copies)  # world names and new ones
    assert not [d for d in corpus(World(WorldConfig(**SMALL))) if d.kind == "copy"]


def _dialogue_metas(table: pa.Table) -> list[dict]:
    return [json.loads(r["meta"]) for r in table.to_pylist() if r["category"] == "dialogue"]


def test_dialogues_span_up_to_the_configured_turns(tables):
    turns = [len(meta["turns"]) for meta in _dialogue_metas(tables["prompts_eval"])]
    assert 10 <= max(turns) <= 20 and min(turns) <= 3
    short = [meta["instruction"]["short"] for meta in _dialogue_metas(tables["prompts_train"])]
    assert 0.25 < sum(short) / len(short) < 0.75


@pytest.mark.parametrize("overrides, message", [
    (dict(eval_fraction=1.5), "eval_fraction"),
    (dict(n_people=1), "n_people"),
    (dict(corpus_copy_share=1.0), "corpus_copy_share"),
    (dict(batch_sizes=()), "batch_sizes"),
    (dict(train_helpful=-1), "train_helpful"),
    (dict(max_dialogue_turns=0), "max_dialogue_turns"),
    (dict(sft_mix={"helpful": 1.0}), "sft_mix"),
    (dict(sft_mix={"helpful": 0, "borderline": 0, "safety": 0, "dialogue": 0}), "sft_mix"),
    (dict(sft_mix={"helpful": 1, "borderline": 0, "safety": -0.1, "dialogue": 0}), "sft_mix"),
    (dict(sft_flaw_share=0.3), "world v2's lever"),  # v3's writers would silently ignore it
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**overrides)


def test_config_from_mapping():
    config = WorldConfig.from_mapping({"seed": 2, "batch_sizes": [5, 10], "annotator": {"noise": 0.1,
                                                                                        "thresholds": [0.6, 0.3, 0.1]}})
    assert config.batch_sizes == (5, 10) and config.annotator.thresholds == (0.6, 0.3, 0.1)
    with pytest.raises(ValueError, match="unknown field"):
        WorldConfig.from_mapping({"sede": 2})
    with pytest.raises(ValueError, match="annotator.thresholds"):
        WorldConfig.from_mapping({"annotator": {"thresholds": [0.1, 0.3, 0.6]}})


def test_cli_writes_every_table(tmp_path: Path, capsys):
    main(["--out", str(tmp_path), "--seed", "1"])
    out = capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.iterdir())
    weeks = [f"preferences_b{b:02d}.parquet" for b in range(1, 6)]
    assert files == ["corpus.parquet", "demonstrations.parquet", *weeks, "prompts_eval.parquet",
                     "prompts_train.parquet"]
    assert pq.read_table(tmp_path / "prompts_eval.parquet").schema.metadata[b"kind"] == b"prompts"
    assert "prompts_train" in out and "illicit_criminal=" in out and "ratings" in out


def test_prompt_rows_round_trip_for_the_oracle(tables):
    """A pipeline stage reads prompt rows back and scores its samples with the oracle through them."""
    for row in tables["prompts_eval"].to_pylist()[::7]:
        prompt = Prompt.from_row(row)
        assert prompt.messages == row["messages"] and prompt.is_safety == row["is_safety"]
        best = respond(prompt.category, prompt.meta, QUALITIES[prompt.category][0], random.Random(0))
        verdict = judge(row["category"], row["meta"], best)
        assert verdict.safety == 1.0 and (prompt.is_safety or verdict.helpfulness == 1.0)


def test_bad_arguments_are_named():
    world = World(WorldConfig(**SMALL))
    with pytest.raises(ValueError, match="unknown split"):
        world.prompts("test")
    with pytest.raises(ValueError, match="unknown attack vector"):
        world.prompt("illicit_criminal", "train", random.Random(0), "bribery")
    with pytest.raises(ValueError, match="batch must be in"):
        preference_batch(world, 4)

