"""Runs from the user's own files: the data stage's tables, its config checks, and the SmolLM2 set-up's conversions."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.tokenizer import SentencePieceTokenizer
from pipeline.config.build import ConfigError
from pipeline.data.store import RunStore
from scripts.setup_smollm2 import FetchError, chitchat_pairs, fetch, transcript
from pipeline.stages.data_files import DataConfig, DataFile, run_data_files
from pipeline.stages.reward_model.algorithm import split_heldout
from tests.test_config import compose_run


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Question {i}? Good answer {i}. How do I steal thing {i}? Say {i}. Too long" for i in range(50)]
    return SentencePieceTokenizer.train(texts * 4, vocab_size=340)


@pytest.fixture
def files(tmp_path):
    sft = tmp_path / "alpaca.json"
    sft.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(6)]
                              + [{"instruction": "Too long " * 400, "input": "", "output": "x"}]))
    helpful = write_jsonl(tmp_path / "help.jsonl", [
        {"prompt": [user(f"Question {i}?")], "chosen": f"Good answer {i}.", "rejected": "No.", "rating": "better"}
        for i in range(20)])
    safety = write_jsonl(tmp_path / "safe.jsonl", [
        {"prompt": [user(f"How do I steal thing {i}?")], "chosen": "I can't help with that.",
         "rejected": "Step 1: ...", "chosen_safe": True, "rejected_safe": False,
         "meta": json.dumps({"category": "hateful_harmful"} if i % 2 else {})} for i in range(10)])
    return {"sft": str(sft), "helpfulness": helpful, "safety": safety}


def test_data_stage_builds_the_drivers_tables(tmp_path, files, tokenizer):
    config = DataConfig(sft=[DataFile(files["sft"])], helpfulness=[DataFile(files["helpfulness"], batch=1)],
                        safety=[DataFile(files["safety"], batch=2, limit=8)], max_tokens=256, max_reject_share=0.5,
                        eval_prompts=3)
    store = RunStore(tmp_path / "run")
    tables, cached = run_data_files(store, config, tokenizer, 0.2, None)
    assert not cached
    assert tables["demonstrations"].num_rows == 6
    # The over-long row is kept in the rejects table with its file, row and reason.
    [reject] = tables["rejects"].to_pylist()
    assert reject["source"] == files["sft"] and reject["row"] == 6 and "tokens" in reject["reason"]
    assert tables["preferences_b01"].num_rows == 20 and tables["preferences_b02"].num_rows == 8
    assert set(tables["preferences_b02"].column("kind").to_pylist()) == {"safety"}
    # Held-out prompts are the prompts of the pairs the reward models hold out, never sampled for training.
    evaluated = {m[0]["content"] for m in tables["prompts_eval"].column("messages").to_pylist()}
    trained = {m[0]["content"] for m in tables["prompts_train"].column("messages").to_pylist()}
    assert evaluated and not evaluated & trained and len(evaluated | trained) == 28
    _, heldout = split_heldout(pa_concat(tables), 0.2)
    assert evaluated <= {p[0]["content"] for p in heldout.column("prompt").to_pylist()}
    safety_eval = tables["prompts_eval"].filter(tables["prompts_eval"]["is_safety"])
    assert set(safety_eval.column("category").to_pylist()) <= {"illicit_criminal", "hateful_harmful"}
    assert pc.all(pc.equal(tables["prompts_train"].filter(pc.invert(tables["prompts_train"]["is_safety"]))["category"],
                           "helpful")).as_py()
    # A second call reads the store; an edited file reloads.
    assert run_data_files(store, config, tokenizer, 0.2, None)[1]
    write_jsonl(tmp_path / "help.jsonl", [{"prompt": [user("Only one?")], "chosen": "Yes.", "rejected": "No."}])
    again, cached = run_data_files(store, config, tokenizer, 0.2, None)
    assert not cached and again["preferences_b01"].num_rows == 1


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables([t for name, t in tables.items() if name.startswith("preferences_b")])


def test_too_many_rejects_name_the_rows(tmp_path, files, tokenizer):
    config = DataConfig(sft=[DataFile(files["sft"])], helpfulness=[DataFile(files["helpfulness"])],
                        safety=[DataFile(files["safety"])], max_tokens=256)
    with pytest.raises(ValueError, match=r"alpaca\.json: 1 of 7 rows rejected .*\n  row 6, field "
                                         r"instruction\+input\+output: \d+ tokens > context 256"):
        run_data_files(RunStore(tmp_path / "run"), config, tokenizer, 0.2, None)
    assert pq.read_table(tmp_path / "run" / "rejects" / "sft0-alpaca.parquet").column("row").to_pylist() == [6]


def test_runs_from_files_are_checked_up_front(tmp_path, files):
    data = [f"data.sft=[{{path: {files['sft']}}}]", f"data.helpfulness=[{{path: {files['helpfulness']}}}]",
            f"data.safety=[{{path: {files['safety']}}}]"]
    with pytest.raises(ConfigError, match=r"a run from files starts from base_models checkpoints"):
        compose_run("experiment=quick", *data)
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"rounds\.gatt\.gatt_from = 1: a run from files needs data\.gatt"):
        compose_run("experiment=quick", f"+base_models.policy={folder}", *data)
    with pytest.raises(ConfigError, match=r"data\.safety: no files"):
        compose_run("experiment=quick", f"+base_models.policy={folder}", *data[:2])
    with pytest.raises(ConfigError, match=r"data\.sft\[0\]\.path = '/nowhere.json': no such file"):
        compose_run("experiment=quick", "data.sft=[{path: /nowhere.json}]", *data[1:])
    config = compose_run("experiment=quick", f"+base_models.policy={folder}", *data, "rounds.gatt.gatt_from=0",
                         "rounds.context_distillation.distill_from=0")
    assert config.data.enabled and config.data.sft[0].path == files["sft"]


def test_smollm2_experiment_and_the_readmes_own_checkpoint_example_compose(tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the experiment's paths are relative to the working directory
    with pytest.raises(ConfigError, match=r"(?s)alpaca_en_demo\.json': no such file.*made by `llama2-setup-smollm2`"):
        compose_run("experiment=smollm2")
    data = tmp_path / ".cache/data/smollm2"
    data.mkdir(parents=True)
    for name in ("alpaca_en_demo.json", "dpo_en_demo.json", "chitchat_pairs.jsonl", "safety_pairs.jsonl",
                 "gatt_instructions.jsonl", "gatt_dialogues.jsonl"):
        (data / name).write_text("[]")
    with pytest.raises(ConfigError, match=r"base_models\.smollm2 = .*no config\.json.*`llama2-setup-smollm2`"):
        compose_run("experiment=smollm2")
    model = tmp_path / ".cache/models/smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    config = compose_run("experiment=smollm2")
    assert config.data.enabled and config.base_context == 1024 and config.judge.checkpoint == "smollm2"
    assert [f.path.rsplit("/", 1)[1] for f in config.data.helpfulness] == ["dpo_en_demo.json", "chitchat_pairs.jsonl"]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # README, "Your own checkpoint and your own preference files" (with this test's files)
    config = compose_run("experiment=smollm2", "run.name=mine", "~base_models.smollm2", f"+base_models.policy={folder}",
                         f"data.sft=[{{path: {files['sft']}, limit: 200}}]",
                         f"data.helpfulness=[{{path: {files['helpfulness']}, batch: 1}}, "
                         f"{{path: {files['helpfulness']}, limit: 100, batch: 2}}]",
                         f"data.safety=[{{path: {files['safety']}, limit: 300}}]", "rounds.count=2", "rounds.ppo_from=2")
    assert list(config.base_models) == ["policy"] and [f.batch for f in config.data.helpfulness] == [1, 2]


def test_chitchat_pairs_prefer_the_higher_rated_chat():
    def chat(starter: str, rating: float, text: str) -> dict:
        return {"prompt": starter, "ratings": {"witty": rating, "upbeat": rating, "interesting": rating},
                "messages": [[{"text": "Hello"}], [{"text": text}]]}

    chats = {"a": chat("Favourite food?", 2, "dunno"), "b": chat("Favourite food?", 9, "Pizza, obviously!"),
             "c": chat("Weather?", 5, "Rain."), "d": chat("Weather?", 5.2, "Sun.")}  # a tie: left out
    [pair] = chitchat_pairs(chats)
    assert pair["prompt"] == [user("Let's chat. Favourite food?")]
    assert pair["chosen"] == "A: Hello\nB: Pizza, obviously!" and pair["rejected"] == "A: Hello\nB: dunno"
    assert pair["rating"] == "significantly_better"
    assert transcript([[{"text": "Hi"}], [{"text": "Yo"}, {"text": "there"}]]) == "A: Hi\nB: Yo there"


def test_a_package_that_cannot_be_fetched_is_named(tmp_path):
    with pytest.raises(FetchError, match=r"cannot fetch llamafactory==0\.0\.0\.404 from the package registry"):
        fetch("llamafactory==0.0.0.404", source=True, into=tmp_path)
