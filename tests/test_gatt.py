"""Ghost Attention's data side: instructions, sampling prompts (instruction on every user turn), training samples
(instruction in the first turn only, loss on the last answer only, token by token) and per-turn adherence."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.chat_template import B_INST, E_INST, encode_chat
from model.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from pipeline.data.schemas import DEMONSTRATIONS
from pipeline.stages.gatt.algorithm import (TABLE30, GAttConfig, GAttDialogue, TurnAdherence, add_answers,
                                            adherence_by_turn, adherence_prompts, adherence_table, fit_history,
                                            gatt_demonstrations, gatt_dialogues, gatt_eval_prompt, gatt_examples,
                                            gatt_sampling_prompt, gatt_sampling_prompts, gatt_training_messages,
                                            sample_instruction, split_instruction_keys)
from pipeline.world import World, WorldConfig, judge_dialogue
from pipeline.world.tables import dump_meta
from pipeline.world.dialogue import apply_instruction, follows, instruction_keys, instruction_shape


def gatt_training_example(user_turns, answers, instruction, tokenizer: Tokenizer, max_tokens: int | None = None):
    """Ids and loss mask of one GAtt sample as gatt_examples encodes it: the instruction in the first user turn
    only, the loss on the last answer only; over `max_tokens` the middle turns are dropped (fit_history)."""
    messages = gatt_training_messages(user_turns, answers, instruction)
    if max_tokens is not None:
        messages = fit_history(messages, tokenizer, max_tokens)
    return encode_chat(tokenizer, messages, mode="last")


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0))


@pytest.fixture(scope="module")
def dialogues(world: World) -> list[GAttDialogue]:
    return gatt_dialogues(world, "train", 12, 5, random.Random(1), min_turns=3)


def adherent(d: GAttDialogue, turns: Sequence[int] | None = None) -> list[str]:
    """Answers to every turn: adherent on `turns` (1-based; all if None), the bare reference elsewhere."""
    return [apply_instruction(m["reference"], d.instruction.instruction) if turns is None or t in turns
            else m["reference"] for t, m in enumerate(d.turn_metas, start=1)]


def corpus(dialogues: list[GAttDialogue]) -> list[str]:
    texts = [d.instruction.text for d in dialogues] + [u for d in dialogues for u in d.user_turns]
    texts += [a for d in dialogues for a in adherent(d)]
    return texts * 3 + [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def hf_tokenizer(texts: list[str], directory: Path) -> Tokenizer:
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}')
    return load_tokenizer(directory)


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def tok(request: pytest.FixtureRequest, dialogues, tmp_path_factory) -> Tokenizer:
    if request.param == "sentencepiece":
        return SentencePieceTokenizer.train(corpus(dialogues), vocab_size=400)
    return hf_tokenizer(corpus(dialogues), tmp_path_factory.mktemp("hf"))


def segments(ids: list[int], bos: int) -> list[list[int]]:
    """The encoded dialogue cut at each bos: one [bos] ... sequence per turn."""
    starts = [i for i, t in enumerate(ids) if t == bos]
    return [ids[a:b] for a, b in zip(starts, [*starts[1:], len(ids)])]


# --- config and instructions ---------------------------------------------------------------------------------

def test_config_names_each_bad_value():
    assert GAttConfig().short_prob == 0.5
    with pytest.raises(ValueError, match=r"^rounds.gatt.turns = 0: must be > 0$"):
        GAttConfig(turns=0)
    with pytest.raises(ValueError) as err:
        GAttConfig(gatt_from=-1, dialogues=-2, short_prob=1.5)
    assert str(err.value).splitlines() == ["rounds.gatt.gatt_from = -1: must be >= 0 (0: never)",
                                           "rounds.gatt.dialogues = -2: must be > 0",
                                           "rounds.gatt.short_prob = 1.5: must be in [0, 1]"]


def test_instructions_combine_kinds_at_random_and_half_are_short():
    rng = random.Random(0)
    drawn = [sample_instruction(rng) for _ in range(1000)]
    assert 0.45 < sum(i.short for i in drawn) / len(drawn) < 0.55
    shapes = {(bool(i.instruction.language), bool(i.instruction.figure), bool(i.instruction.hobby)) for i in drawn}
    assert len(shapes) == 7  # every non-empty combination of language, figure, hobby
    napoleon = next(i for i in drawn if i.instruction.figure == "Napoleon" and i.short
                    and not i.instruction.language and not i.instruction.hobby)
    assert napoleon.text == "Figure: Napoleon."
    # The oracle can check each one: an adherent answer follows it, a bare one does not.
    for i in drawn[:200]:
        assert follows(i.instruction, apply_instruction("The answer is 4.", i.instruction))
        assert not follows(i.instruction, "The answer is 4.")
    assert all(not i.short for i in (sample_instruction(rng, short_prob=0.0) for _ in range(50)))
    assert sample_instruction(random.Random(5)) == sample_instruction(random.Random(5))


def test_train_and_eval_instructions_are_the_worlds_split(world: World, dialogues):
    train, held = (split_instruction_keys(s, world.config.eval_fraction) for s in ("train", "eval"))
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(instruction_keys())
    assert {instruction_shape(k) for k in held} == {instruction_shape(k) for k in train}
    for d in dialogues:
        i = d.instruction.instruction
        assert (i.language or "", i.figure or "", i.hobby or "") in train
        assert 3 <= len(d.user_turns) == len(d.turn_metas) <= 5
        # judge_dialogue reads the meta as it reads the world's dialogue prompts.
        assert all(v.adherent for v in judge_dialogue(d.meta, adherent(d)))


# --- sampling and training messages -----------------------------------------------------------------------

def test_sampling_prompts_carry_the_instruction_in_every_user_turn(dialogues, tok):
    d = dialogues[0]
    answers = adherent(d)
    text = d.instruction.text
    for k in range(len(d.user_turns)):
        messages = gatt_sampling_prompt(d.user_turns, answers[:k], d.instruction)
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert len(users) == k + 1 and all(text in u and u.endswith(q) for u, q in zip(users, d.user_turns))
        encoded = gatt_sampling_prompts([d], [answers[:k]], tok, 10_000)
        [ids] = encoded.column("prompt_token_ids").to_pylist()
        assert [text in tok.decode(s) for s in segments(ids, tok.bos_id)] == [True] * (k + 1)
        # The deployed (evaluation) prompt has it in the first turn only; that first turn is the same tokens.
        [eval_ids] = adherence_prompts([d], [answers[:k]], tok, 10_000).column("prompt_token_ids").to_pylist()
        eval_segments = segments(eval_ids, tok.bos_id)
        assert [text in tok.decode(s) for s in eval_segments] == [True] + [False] * k
        assert eval_segments[0] == segments(ids, tok.bos_id)[0]
    with pytest.raises(ValueError, match="fewer answers than"):
        gatt_sampling_prompt(d.user_turns, answers, d.instruction)


def test_a_checkpoints_own_template_gets_the_instruction_as_a_paragraph(dialogues):
    d = dialogues[0]
    [llama2] = [m["content"] for m in gatt_sampling_prompt(d.user_turns, [], d.instruction) if m["role"] == "user"]
    [own] = [m["content"] for m in gatt_sampling_prompt(d.user_turns, [], d.instruction, own_template=True)
             if m["role"] == "user"]
    assert llama2.startswith("<<SYS>>") and own == f"{d.instruction.text}\n\n{d.user_turns[0]}"


def test_training_sample_masks_all_but_the_last_answer_token_by_token(dialogues, tok):
    for d in dialogues[:4]:
        answers = adherent(d, turns=[1, len(d.user_turns)])
        chat = gatt_training_example(d.user_turns, answers, d.instruction, tok)
        ids, mask = chat.input_ids, chat.loss_mask
        # One contiguous run of ones at the very end, inside the last turn: every earlier token, earlier
        # assistant turns included, is context only.
        first = mask.index(1)
        assert mask == [0] * first + [1] * (len(mask) - first)
        assert first > max(i for i, t in enumerate(ids) if t == tok.bos_id)
        assert ids[-1] == tok.eos_id and tok.decode(ids[first:]).strip() == answers[-1]
        # Exactly the answer as the template writes it: the space after [/INST], the answer, a space, then eos.
        prompt = f"{B_INST} {d.user_turns[-1]} {E_INST}"  # the last turn (the dialogues have 3 to 5)
        text = f"{prompt} {answers[-1]} "
        last = segments(ids, tok.bos_id)[-1]
        body, offsets = tok.encode_with_offsets(text)
        assert last == [tok.bos_id, *body, tok.eos_id]
        start = first - (len(ids) - len(last)) - 1  # index of the first trained token within `body`
        assert text[offsets[start][0]:] == f" {answers[-1]} " and offsets[start - 1][1] <= len(prompt)
        # The instruction is in the first user turn only; every turn keeps its own user text.
        decoded = [tok.decode(s) for s in segments(ids, tok.bos_id)]
        assert [d.instruction.text in s for s in decoded] == [True] + [False] * (len(decoded) - 1)
        assert all(user in s for user, s in zip(d.user_turns, decoded))


def test_training_messages_drop_exactly_what_sampling_added(dialogues):
    d = dialogues[1]
    answers = adherent(d)
    training = gatt_training_messages(d.user_turns, answers, d.instruction)
    assert training[0] == {"role": "system", "content": d.instruction.text}
    assert [m["content"] for m in training[1:]] == [x for pair in zip(d.user_turns, answers) for x in pair]
    assert gatt_eval_prompt(d.user_turns, answers[:2], d.instruction) == training[:6]
    with pytest.raises(ValueError, match="as many answers as"):
        gatt_training_messages(d.user_turns, answers[:-1], d.instruction)


def test_fit_history_keeps_the_first_and_last_turns(dialogues, tok):
    d = max(dialogues, key=lambda x: len(x.user_turns))
    answers = adherent(d)
    messages = gatt_training_messages(d.user_turns, answers, d.instruction)
    n = len(encode_chat(tok, messages).input_ids)
    assert fit_history(messages, tok, n) == messages
    trimmed = fit_history(messages, tok, n - 1)  # the oldest turn after the first goes first
    assert trimmed == [*messages[:3], *messages[5:]]
    first_and_last = [*messages[:3], *messages[-2:]]
    floor = len(encode_chat(tok, first_and_last).input_ids)
    assert fit_history(messages, tok, floor) == first_and_last
    with pytest.raises(ValueError, match="first and last turns alone"):
        fit_history(messages, tok, floor - 1)
    cut = gatt_training_example(d.user_turns, answers, d.instruction, tok, max_tokens=n - 1)
    assert cut == encode_chat(tok, trimmed, mode="last")
    # A sampling prompt (ending with a user turn) is trimmed the same way.
    prompt = gatt_sampling_prompt(d.user_turns, answers[:-1], d.instruction)
    short = fit_history(prompt, tok, len(encode_chat(tok, [*prompt[:2], prompt[-1]]).input_ids))
    assert short == [*prompt[:2], prompt[-1]]


def test_a_dialogue_that_outgrows_the_context_ends_unfinished(dialogues, tok):
    first_turn = gatt_sampling_prompts(dialogues, [[] for _ in dialogues], tok, 10_000)
    longest = max(len(ids) for ids in first_turn.column("prompt_token_ids").to_pylist())
    assert gatt_sampling_prompts(dialogues, [[] for _ in dialogues], tok, longest).num_rows == len(dialogues)
    assert gatt_sampling_prompts(dialogues, [[] for _ in dialogues], tok, longest - 1).num_rows < len(dialogues)


def test_demonstrations_and_examples_train_on_the_last_answer_only(dialogues, tok):
    answers = [adherent(d) for d in dialogues[:3]]
    answers[2][1] = ""  # an empty answer ends its dialogue: it cannot be a demonstration
    demos = gatt_demonstrations(dialogues[:3], answers)
    assert demos.schema.equals(DEMONSTRATIONS, check_metadata=True) and demos.num_rows == 2
    assert set(demos.column("source").to_pylist()) == {"gatt"}
    assert set(demos.column("category").to_pylist()) == {"dialogue"}
    examples = gatt_examples(demos, tok, 10_000)
    for d, done, (ids, mask) in zip(dialogues, answers, examples):
        chat = gatt_training_example(d.user_turns, done, d.instruction, tok)
        assert (list(ids), list(mask)) == (chat.input_ids, chat.loss_mask)
    with pytest.raises(ValueError, match=r"demonstration gatt-train-00000: .*first and last turns alone"):
        gatt_examples(demos, tok, 8)


def test_prefixes_make_every_answered_turn_a_demonstration(dialogues, tok):
    ds = dialogues[:3]  # 3 to 5 turns each
    answers = [adherent(d) for d in ds]
    last = len(ds[1].user_turns)
    answers[1] = adherent(ds[1], turns=[1, last])  # turn 2 (and any other middle turn) breaks the instruction
    answers[2] = answers[2][:2] + [""]  # cut short at turn 3 by an empty answer
    demos = gatt_demonstrations(ds, answers, verify=True, prefixes=True)
    n = len(ds[0].user_turns)
    expected = [f"{ds[0].id}-t{t:02d}" for t in range(1, n + 1)]
    expected += [f"{ds[1].id}-t01", f"{ds[1].id}-t{last:02d}", f"{ds[2].id}-t01", f"{ds[2].id}-t02"]
    assert demos.column("id").to_pylist() == expected
    first = demos.slice(0, 1).to_pylist()[0]
    assert first["messages"] == gatt_training_messages(ds[0].user_turns[:1], answers[0][:1], ds[0].instruction)
    assert judge_dialogue(json.loads(first["meta"]), answers[0][:1])[0].adherent
    # Loss on the prefix's own last answer only.
    ids, mask = gatt_examples(demos.slice(1, 1), tok, 10_000)[0]
    chat = gatt_training_example(ds[0].user_turns[:2], answers[0][:2], ds[0].instruction, tok)
    assert (list(ids), list(mask)) == (chat.input_ids, chat.loss_mask)
    # Without verification the broken turn is a demonstration too; without prefixes only whole dialogues are.
    assert f"{ds[1].id}-t02" in gatt_demonstrations(ds, answers, prefixes=True).column("id").to_pylist()
    assert gatt_demonstrations(ds, answers, verify=True).column("id").to_pylist() == [ds[0].id, ds[1].id]


# --- the sampling loop and Table 30 ------------------------------------------------------------------------

def forgetful_policy(dialogues: list[GAttDialogue], answers: list[list[str]], tok: Tokenizer,
                     table: pa.Table) -> pa.Table:
    """A stand-in for the generator pool: follows the instruction only when it is in the turn being answered
    (a model without GAtt), answering each task with its reference."""
    by_id = {d.id: (d, done) for d, done in zip(dialogues, answers)}
    responses = []
    for pid, ids in zip(table.column("id").to_pylist(), table.column("prompt_token_ids").to_pylist()):
        d, done = by_id[pid]
        reference = d.turn_metas[len(done)]["reference"]
        sees_it = d.instruction.text in tok.decode(segments(ids, tok.bos_id)[-1])
        responses.append(apply_instruction(reference, d.instruction.instruction) if sees_it else reference)
    return pa.table({"prompt_id": table.column("id"), "response": responses})


LIMIT = 320  # prompt tokens: later turns drop the oldest middle turns (fit_history)


def run_loop(dialogues: list[GAttDialogue], tok: Tokenizer, build) -> list[list[str]]:
    answers: list[list[str]] = [[] for _ in dialogues]
    while (table := build(dialogues, answers, tok, LIMIT)).num_rows:
        assert all(len(ids) <= LIMIT for ids in table.column("prompt_token_ids").to_pylist())
        add_answers(dialogues, answers, forgetful_policy(dialogues, answers, tok, table))
    return answers


def test_sampling_loop_gives_adherent_answers_that_deployment_alone_does_not(world, tok):
    dialogues = gatt_dialogues(world, "train", 6, 5, random.Random(2), min_turns=5)
    metas = [d.meta for d in dialogues]
    sampled = run_loop(dialogues, tok, gatt_sampling_prompts)
    assert [a.rate for a in adherence_by_turn(metas, sampled)] == [1.0] * 5
    deployed = run_loop(dialogues, tok, adherence_prompts)
    assert [a.rate for a in adherence_by_turn(metas, deployed)] == [1.0, 0.0, 0.0, 0.0, 0.0]
    demos = gatt_demonstrations(dialogues, sampled)
    assert demos.num_rows == 6
    with pytest.raises(ValueError, match="several samples"):
        add_answers(dialogues, [[] for _ in dialogues],
                    pa.table({"prompt_id": [dialogues[0].id] * 2, "response": ["a", "b"]}))


def test_adherence_arithmetic(dialogues):
    ds = dialogues[:3]  # 3 to 5 turns each
    # Dialogue 3 stopped after turn 2 (an empty answer would do that): its later turns count as not adherent.
    answers = [adherent(ds[0]), adherent(ds[1], turns=[1]), adherent(ds[2], turns=[2])[:2]]
    result = adherence_by_turn([d.meta for d in ds], answers)
    longest = max(len(d.user_turns) for d in ds)
    assert [a.turn for a in result] == list(range(1, longest + 1))
    expected_1 = 2  # dialogues 1 and 2
    expected_2 = 2  # dialogues 1 and 3
    assert (result[0].dialogues, result[0].adherent) == (3, expected_1)
    assert (result[1].dialogues, result[1].adherent) == (3, expected_2)
    for a in result[2:]:
        assert a.dialogues == sum(len(d.user_turns) >= a.turn for d in ds)
        assert a.adherent == int(len(ds[0].user_turns) >= a.turn)
    assert result[0].rate == pytest.approx(2 / 3)
    # The metas may come as the JSON strings of a prompts table.
    assert adherence_by_turn([dump_meta(d.meta) for d in ds], answers) == result
    with pytest.raises(ValueError, match="answer lists for"):
        adherence_by_turn([ds[0].meta], [])


def test_adherence_table_sits_beside_the_papers_table_30():
    before = [TurnAdherence(t, 10, k) for t, k in ((1, 10), (2, 9), (4, 2), (20, 0))]
    after = [TurnAdherence(t, 10, 10) for t in (1, 2, 4, 20)]
    lines = adherence_table({"before GAtt": before, "GAtt": after}).splitlines()
    assert lines[0] == "| Turn | before GAtt | GAtt | paper baseline | paper GAtt |"
    assert lines[2] == "| 1 | 100.0 | 100.0 | - | - |"
    assert lines[3] == "| 2 | 90.0 | 100.0 | 100 | 100 |"
    assert lines[4] == "| 4 | 20.0 | 100.0 | 10 | 100 |"
    assert lines[5] == "| 20 | 0.0 | 100.0 | 0 | 100 |"
    assert TABLE30[6] == (0.0, 100.0)
