"""LLaMA-2 chat format and loss masks, token by token, with real SentencePiece and byte-level BPE."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.chat_template import encode_chat, encode_prompt
from model.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

SYSTEM = "You are a helpful assistant."
DIALOGUE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Japan? "},  # stripped, as Meta does
    # starts with a digit: SentencePiece's split_digits makes the separating space a piece of its own
    {"role": "assistant", "content": " 14 million people live in Tokyo, the capital of Japan."},
    {"role": "user", "content": "Name a river there."},
    {"role": "assistant", "content": "The Sumida river flows through Tokyo, café 日本."},
]
# Meta's chat_completion texts for DIALOGUE, written out by hand: (prompt, answer) per pair.
PAIRS = [
    (
        "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST]",
        " The capital of France is Paris. ",
    ),
    ("[INST] And of Japan? [/INST]", " 14 million people live in Tokyo, the capital of Japan. "),
    ("[INST] Name a river there. [/INST]", " The Sumida river flows through Tokyo, café 日本. "),
]
NEXT_USER = {"role": "user", "content": "Thanks!"}
NEXT_PROMPT = "[INST] Thanks! [/INST]"


def corpus() -> list[str]:
    """Lines from the dialogue's words, so that BPE learns whole words like "▁The" / " The"."""
    words = " ".join(m["content"] for m in DIALOGUE).split()
    rng = random.Random(0)
    lines = [m["content"] for m in DIALOGUE] * 20
    lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(200)]
    return lines


@dataclass
class Case:
    """A tokenizer under test plus an independent way to get the reference ids and token texts."""

    tok: Tokenizer
    encode: Callable[[str], list[int]]  # the raw library's encode, no specials
    token_text: Callable[[list[int]], str]  # the exact text a run of tokens spells
    bos: int
    eos: int
    dummy_prefix: str  # what SentencePiece prepends to every encoded text


def sp_case(directory: Path) -> Case:
    SentencePieceTokenizer.train(corpus(), vocab_size=420).save(directory)
    raw = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))

    def token_text(ids: list[int]) -> str:
        pieces = (
            bytes([int(raw.id_to_piece(i)[3:5], 16)]) if raw.is_byte(i) else raw.id_to_piece(i).encode()
            for i in ids
        )
        return b"".join(pieces).decode().replace("▁", " ")

    return Case(load_tokenizer(directory), raw.encode, token_text, raw.bos_id(), raw.eos_id(), " ")


def hf_case(directory: Path) -> Case:
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}'
    )
    return Case(
        load_tokenizer(directory),
        lambda text: raw.encode(text, add_special_tokens=False).ids,
        raw.decode,
        raw.token_to_id("<s>"),
        raw.token_to_id("</s>"),
        "",
    )


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    build = sp_case if request.param == "sentencepiece" else hf_case
    return build(tmp_path_factory.mktemp(request.param))


def expected_ids(case: Case, with_next_prompt: bool = False) -> list[list[int]]:
    """Meta's encoding, per segment: [bos] + encode(prompt + answer) + [eos] per pair."""
    segments = [[case.bos, *case.encode(prompt + answer), case.eos] for prompt, answer in PAIRS]
    if with_next_prompt:
        segments.append([case.bos, *case.encode(NEXT_PROMPT)])
    return segments


def split(values: list[int], segments: list[list[int]]) -> list[list[int]]:
    out, start = [], 0
    for segment in segments:
        out.append(values[start : start + len(segment)])
        start += len(segment)
    assert start == len(values)
    return out


def test_ids_match_meta_format(case: Case) -> None:
    encoded = encode_chat(case.tok, DIALOGUE)
    assert encoded.input_ids == sum(expected_ids(case), [])
    assert len(encoded.loss_mask) == len(encoded.input_ids)


def test_mask_all_covers_each_answer_and_its_eos(case: Case) -> None:
    encoded = encode_chat(case.tok, DIALOGUE, mode="all")
    segments = expected_ids(case)
    for (prompt, answer), ids, mask in zip(PAIRS, segments, split(encoded.loss_mask, segments)):
        assert ids[0] == case.bos and mask[0] == 0
        assert ids[-1] == case.eos and mask[-1] == 1
        body, body_mask = ids[1:-1], mask[1:-1]
        # Token by token: prompt tokens then answer tokens, one contiguous run each.
        n_prompt = body_mask.index(1)
        assert body_mask == [0] * n_prompt + [1] * (len(body) - n_prompt)
        assert case.token_text(body[:n_prompt]) == case.dummy_prefix + prompt
        assert case.token_text(body[n_prompt:]) == answer
        # The untrained part is exactly what a sampler is given for this turn, so the model is trained to
        # produce every token that follows its generation prompt, the space after [/INST] included.
        assert body[:n_prompt] == case.encode(prompt)


def test_mask_last_covers_only_the_last_answer(case: Case) -> None:
    all_mode = encode_chat(case.tok, DIALOGUE, mode="all")
    last_mode = encode_chat(case.tok, DIALOGUE, mode="last")
    assert last_mode.input_ids == all_mode.input_ids
    segments = expected_ids(case)
    masks_all = split(all_mode.loss_mask, segments)
    masks_last = split(last_mode.loss_mask, segments)
    assert masks_last[:-1] == [[0] * len(m) for m in masks_all[:-1]]
    assert masks_last[-1] == masks_all[-1] and any(masks_last[-1])


@pytest.mark.parametrize("mode", ["all", "last"])
def test_trailing_user_turn_is_the_untrained_generation_prompt(case: Case, mode: str) -> None:
    messages = [*DIALOGUE, NEXT_USER]
    encoded = encode_chat(case.tok, messages, mode=mode)
    segments = expected_ids(case, with_next_prompt=True)
    assert encoded.input_ids == sum(segments, [])
    assert encoded.input_ids == encode_prompt(case.tok, messages)
    assert split(encoded.loss_mask, segments)[-1] == [0] * len(segments[-1])
    assert encoded.loss_mask[: -len(segments[-1])] == encode_chat(case.tok, DIALOGUE, mode=mode).loss_mask


def test_prompt_without_history(case: Case) -> None:
    ids = encode_prompt(case.tok, [{"role": "system", "content": SYSTEM}, NEXT_USER])
    text = f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nThanks! [/INST]"
    assert ids == [case.bos, *case.encode(text)]
    assert encode_chat(case.tok, [NEXT_USER]).loss_mask == [0] * (1 + len(case.encode(NEXT_PROMPT)))


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("messages", "mode", "match"),
    [
        ([], "all", "empty"),
        ([USER, ASSISTANT, {"role": "system", "content": "x"}], "all", r"messages\[2\]\.role"),
        ([{"role": "system", "content": "x"}], "all", r"messages\[0\]\.role"),
        ([ASSISTANT, USER], "all", r"messages\[0\]\.role"),
        ([USER, USER], "all", r"messages\[1\]\.role"),
        ([USER, ASSISTANT, ASSISTANT], "all", r"messages\[2\]\.role"),
        ([USER, {"role": "bot", "content": "x"}], "all", r"messages\[1\]\.role.*unknown role"),
        ([USER, {"role": "assistant", "content": ""}], "all", r"messages\[1\]\.content"),
        ([USER, {"role": "assistant", "content": "   "}], "all", r"messages\[1\]\.content"),
        ([{"role": "user", "content": None}], "all", r"messages\[0\]\.content"),
        ([{"role": "user"}], "all", r"messages\[0\]\.content"),
        ([USER, ASSISTANT], "first", "mode"),
        ([USER], "last", "last"),
    ],
)
def test_invalid_chats_raise(case: Case, messages: list[dict], mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_chat(case.tok, messages, mode=mode)


def test_prompt_must_end_with_user(case: Case) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        encode_prompt(case.tok, [USER, ASSISTANT])
