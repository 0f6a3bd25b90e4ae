"""Ghost Attention from the user's own files: the instruction list and dialogues, their held-out split, the LLM
judge's adherence per turn, and what a run from files must configure for GAtt and context distillation."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from pipeline.config.build import ConfigError
from pipeline.data.store import RunStore
from pipeline.evaluation.judge import ADHERENCE_PREFIX, adherence_messages, parse_yes_no
from scripts.setup_smollm2 import gatt_dialogues
from pipeline.stages.data_files import DataConfig, DataFile, run_data_files
from pipeline.stages.gatt.algorithm import (GAttDialogue, GAttInstruction, TurnAdherence, first_adherent,
                                            gatt_demonstrations)
from pipeline.stages.evaluation.llm_judge import JudgeConfig
from pipeline.stages.gatt.sources import FileDialogues, GAttFiles, heldout_split, judged_adherence, load_instructions
from tests.test_config import compose_run
from tests.test_data_files import files, tokenizer, write_jsonl  # noqa: F401  (fixtures)


def chat(i: int, turns: int) -> dict:
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {i}.{t}?"}, {"role": "assistant", "content": "Ok."}]
    return {"id": f"chat-{i}", "messages": messages}


@pytest.fixture
def gatt_files(tmp_path):
    instructions = write_jsonl(tmp_path / "instructions.jsonl", [
        {"instruction": f"Always mention the number {i}.", "short": f"Number: {i}."} for i in range(8)])
    dialogues = write_jsonl(tmp_path / "chats.jsonl", [chat(i, 1 + i % 3) for i in range(12)])
    return instructions, dialogues


def test_instructions_load_from_text_and_json_lines_with_bad_rows_kept(tmp_path):
    text = tmp_path / "instructions.txt"
    text.write_text("Answer in French.\n\nAct as a pirate.\n")
    assert load_instructions(text, tmp_path / "r.parquet", 0.0)[0].column("text").to_pylist() == [
        "Answer in French.", "Act as a pirate."]
    lines = tmp_path / "instructions.jsonl"
    lines.write_text('{"instruction": "Answer in French.", "short": "Language: French."}\n'
                     '{"instruction": ""}\n'
                     'not json\n'
                     '{"instruction": "Answer in French."}\n'
                     '{"instruction": "Act as a pirate.", "short": 3}\n'
                     '{"instruction": "Use capitals."}\n')
    table, rejected = load_instructions(lines, tmp_path / "rejects.parquet", 0.9)
    assert table.select(["text", "short"]).to_pylist() == [
        {"text": "Answer in French.", "short": "Language: French."}, {"text": "Use capitals.", "short": None}]
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert rejected.to_pylist() == rejects  # what the data stage adds to its rejects table
    assert [(r["row"], r["field"]) for r in rejects] == [(1, "instruction"), (2, "row"), (3, "instruction"),
                                                         (4, "short")]
    assert "duplicate" in rejects[2]["reason"] and rejects[1]["raw"] == "not json"
    with pytest.raises(ValueError, match=r"instructions\.jsonl: 4 of 6 instruction rows rejected .*first: row 1, "
                                         r"field instruction: missing or empty"):
        load_instructions(lines, tmp_path / "rejects.parquet", 0.5)


def test_file_dialogues_hold_out_instructions_and_chats(tmp_path, gatt_files, tokenizer):  # noqa: F811
    instructions, _ = load_instructions(gatt_files[0], tmp_path / "r.parquet", 0.0)
    from pipeline.data.readers import load

    chats = load(gatt_files[1], "demonstrations").table
    source = FileDialogues.from_tables(instructions, chats, 0.25, judge=(JudgeConfig(), tmp_path), digest="d")
    assert len(source.instructions["eval"]) == 2 and len(source.instructions["train"]) == 6
    assert not set(source.instructions["eval"]) & set(source.instructions["train"])
    assert len(source.user_turns["eval"]) == 3 and sum(map(len, source.user_turns.values())) == 12
    held = source.dialogues("eval", 20, 4, random.Random(0), short_prob=0.5, min_turns=4)
    eval_turns = {t for turns in source.user_turns["eval"] for t in turns}
    eval_texts = {text for pair in source.instructions["eval"] for text in pair}
    for d in held:  # every held-out dialogue has exactly 4 user turns, all from held-out chats and instructions
        assert len(d.user_turns) == 4 and set(d.user_turns) <= eval_turns and d.instruction.text in eval_texts
        assert d.instruction.instruction is None and d.meta["instruction"]["text"] == d.instruction.text
    assert {d.instruction.short for d in held} == {True, False}
    train = source.dialogues("train", 30, 3, random.Random(1), short_prob=0.0)
    assert {len(d.user_turns) for d in train} == {1, 2, 3} and not any(d.instruction.short for d in train)
    with pytest.raises(ValueError, match=r"instructions: 1 row\(s\); need at least 2"):
        heldout_split(["a"], 0.25, "instructions")


def dialogue(i: int, turns: int) -> GAttDialogue:
    return GAttDialogue(f"d{i}", GAttInstruction(None, False, "Speak French."), tuple(f"q{t}" for t in range(turns)),
                        tuple({} for _ in range(turns)))


def test_judged_adherence_counts_yes_per_turn_and_unreached_turns_as_not_following():
    dialogues = [dialogue(0, 3), dialogue(1, 3)]
    answers = [["Bonjour", "Hello", "Salut"], ["Oui"]]  # dialogue 1 stopped after turn 1 (an empty answer)
    replies = {"d0|1": f"{ADHERENCE_PREFIX} Yes", "d0|2": f"{ADHERENCE_PREFIX} No", "d0|3": "maybe",
               "d1|1": "Yes."}
    asked = []

    def ask(requests):
        asked.extend(requests)
        return replies

    rows, extra = judged_adherence(dialogues, answers, ask)
    assert rows == [TurnAdherence(1, 2, 2), TurnAdherence(2, 2, 0), TurnAdherence(3, 2, 0)]
    assert extra == {"judge_unparsed": 1, "judge_requests": 4}
    assert [key for key, _ in asked] == ["d0|1", "d0|2", "d0|3", "d1|1"]
    assert asked[1][1] == adherence_messages("Speak French.", "q1", "Hello")
    assert "[Instruction]\nSpeak French." in asked[1][1][1]["content"]


def test_parse_yes_no():
    assert parse_yes_no("Yes") is True and parse_yes_no(f"{ADHERENCE_PREFIX} no, it is English") is False
    assert parse_yes_no("\n  YES.\nNo") is True and parse_yes_no("I cannot tell") is None and parse_yes_no(None) is None


def test_a_users_instruction_cannot_verify_samples():
    [d] = [dialogue(0, 1)]
    with pytest.raises(ValueError, match=r"dialogue 'd0': its instruction has no checker.*verify=false"):
        gatt_demonstrations([d], [["Bonjour"]], verify=True)
    assert gatt_demonstrations([d], [["Bonjour"]], verify=False).num_rows == 1
    import pyarrow as pa

    with pytest.raises(ValueError, match="no checker"):
        first_adherent([d], pa.table({"prompt_id": ["d0"], "response": ["Bonjour"]}))


def test_data_stage_loads_gatt_files_and_leaves_other_runs_digests_alone(tmp_path, files, gatt_files,  # noqa: F811
                                                                        tokenizer):  # noqa: F811
    plain = DataConfig(sft=[DataFile(files["sft"])], helpfulness=[DataFile(files["helpfulness"])],
                       safety=[DataFile(files["safety"])], max_tokens=256, max_reject_share=0.5)
    store = RunStore(tmp_path / "run")
    tables, _ = run_data_files(store, plain, tokenizer, 0.2, None)
    assert "gatt_instructions" not in tables
    before = store.stage(0, "data_demonstrations").manifest()["config_digest"]
    with_gatt = DataConfig(**{**plain.__dict__, "gatt": GAttFiles(*gatt_files)})
    tables, cached = run_data_files(store, with_gatt, tokenizer, 0.2, None)
    assert not cached and tables["gatt_instructions"].num_rows == 8 and tables["gatt_dialogues"].num_rows == 12
    assert store.stage(0, "data_gatt_dialogues").read().num_rows == 12
    # Without data.gatt the stage digest is the one it had before data.gatt existed (a finished store is reused).
    run_data_files(store, plain, tokenizer, 0.2, None)
    assert store.stage(0, "data_demonstrations").manifest()["config_digest"] == before


def test_a_run_from_files_configures_gatt_and_distillation_it_can_measure(tmp_path, files, gatt_files):  # noqa: F811
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    data = [f"+base_models.policy={folder}", f"data.sft=[{{path: {files['sft']}}}]",
            f"data.helpfulness=[{{path: {files['helpfulness']}}}]", f"data.safety=[{{path: {files['safety']}}}]"]
    gatt = [f"data.gatt.instructions={gatt_files[0]}", f"data.gatt.dialogues={gatt_files[1]}"]
    with pytest.raises(ConfigError, match=r"(?s)rounds\.gatt\.verify = true: .*no checker.*"
                                          r"category_templates = true: .*generic preprompt"):
        compose_run("experiment=quick", *data, *gatt)
    with pytest.raises(ConfigError, match=r"judge\.checkpoint = null: GAtt on files is measured by the LLM judge"):
        compose_run("experiment=quick", *data, *gatt, "rounds.gatt.verify=false", "judge.checkpoint=null",
                    "rounds.context_distillation.category_templates=false")
    with pytest.raises(ConfigError, match=r"data\.gatt\.dialogues: not set"):
        compose_run("experiment=quick", *data, gatt[0])
    with pytest.raises(ConfigError, match=r"data\.gatt: GAtt files are for a run from data files"):
        compose_run("experiment=quick", *gatt)
    config = compose_run("experiment=quick", *data, *gatt, "rounds.gatt.verify=false",
                         "rounds.context_distillation.category_templates=false")
    assert config.data.gatt.enabled and config.rounds.context_distillation.distill_from


def test_setup_writes_multi_turn_chats_of_short_alpaca_rows():
    alpaca = [{"instruction": f"Task {i}", "input": "x" if i == 1 else "", "output": f"Done {i}."} for i in range(7)]
    alpaca[2]["output"] = "long " * 200
    chats = gatt_dialogues(alpaca, turns=3)
    assert [c["id"] for c in chats] == ["alpaca-chat-0000", "alpaca-chat-0001"]
    assert [m["content"] for m in chats[0]["messages"] if m["role"] == "user"] == ["Task 0", "Task 1\nx", "Task 3"]
