"""Real SentencePiece and HF tokenizers trained on generated text (no hub, no mocks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

WORDS = (
    "the a cat dog sat on mat and ran to park in morning evening with friend small big red blue "
    "house tree river city they we saw many birds over hill café 日本 tea coffee year day"
).split()

ROUND_TRIP = [
    "the cat sat on the mat",
    " leading space",
    "   three leading spaces and  double   gaps ",
    "café au lait in 日本 2024",
    "unseen chars: ü€😀 Ωmega",  # not in the training text: byte fallback / raw bytes
    "tabs\tand\nnewlines",
    "year 1999 and 42 birds",
]


def corpus(n_lines: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 99999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return lines


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(corpus(), vocab_size=400)


def train_hf(lines: list[str], vocab_size: int = 400) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE with LLaMA's special token strings."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    train_hf(corpus()).save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "lstrip": False, "rstrip": False, "special": True},
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 4096,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def covered_text(text: str, offsets: list[tuple[int, int]]) -> str:
    """The text the tokens cover, each char once (byte pieces of one char share its span)."""
    out, last = [], (-1, -1)
    for span in offsets:
        if span != last:
            out.append(text[span[0] : span[1]])
        last = span
    return "".join(out)


# --- SentencePiece -------------------------------------------------------------------------------


def test_sp_special_ids_match_llama2(sp_tok: SentencePieceTokenizer) -> None:
    assert (sp_tok.unk_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2)
    assert [sp_tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp_tok.pad_id == sp_tok.eos_id  # LLaMA-2 has no pad token
    assert sp_tok.vocab_size == 400
    assert sp_tok.id_to_piece(3) == "<0x00>"  # byte-fallback pieces right after the specials


def test_sp_encode_adds_no_specials_and_decode_skips_them(sp_tok: SentencePieceTokenizer) -> None:
    ids = sp_tok.encode("the cat")
    assert sp_tok.bos_id not in ids and sp_tok.eos_id not in ids
    assert sp_tok.decode([sp_tok.bos_id, *ids, sp_tok.eos_id, sp_tok.pad_id]) == "the cat"


def test_sp_splits_digits_one_per_token(sp_tok: SentencePieceTokenizer) -> None:
    text = "year 20245 and 7"
    ids, offsets = sp_tok.encode_with_offsets(text)
    digit_tokens = [text[s:e] for s, e in offsets if any(c.isdigit() for c in text[s:e])]
    assert digit_tokens == list("202457")
    pieces = [sp_tok.id_to_piece(i) for i in ids]
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sp_round_trip(sp_tok: SentencePieceTokenizer, text: str) -> None:
    assert sp_tok.decode(sp_tok.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sp_offsets_cover_each_char_in_order(sp_tok: SentencePieceTokenizer, text: str) -> None:
    ids, offsets = sp_tok.encode_with_offsets(text)
    assert ids == sp_tok.encode(text)
    assert covered_text(text, offsets) == text
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)


def test_sp_offsets_are_character_spans_of_each_piece(sp_tok: SentencePieceTokenizer) -> None:
    text = "café 日本 ü"
    ids, offsets = sp_tok.encode_with_offsets(text)
    pieces = [sp_tok.id_to_piece(i) for i in ids]
    # The first piece starts with the dummy-prefix "▁", which is not in the text.
    assert pieces[0].startswith("▁")
    pieces[0] = pieces[0][1:]
    for piece, (s, e) in zip(pieces, offsets):
        if piece.startswith("<0x"):
            # "ü" is unseen: both of its byte-fallback pieces map onto the whole char.
            assert text[s:e] == "ü"
        else:
            # "é" (2 UTF-8 bytes) and "日" (3) are one char each in the spans.
            assert text[s:e] == piece.replace("▁", " ")
    assert sum(p.startswith("<0x") for p in pieces) == 2


def test_sp_save_load_identical(sp_tok: SentencePieceTokenizer, tmp_path: Path) -> None:
    sp_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(tmp_path / "tokenizer.model")):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.vocab_size == sp_tok.vocab_size
        for text in ROUND_TRIP:
            assert loaded.encode_with_offsets(text) == sp_tok.encode_with_offsets(text)
    # The saved file is a plain SentencePiece model, as LLaMA-2 ships it.
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert raw.encode(ROUND_TRIP[0]) == sp_tok.encode(ROUND_TRIP[0])


def test_sp_training_is_deterministic(sp_tok: SentencePieceTokenizer) -> None:
    again = SentencePieceTokenizer.train(corpus(), vocab_size=400)
    assert [again.id_to_piece(i) for i in range(400)] == [sp_tok.id_to_piece(i) for i in range(400)]
    for text in ROUND_TRIP:
        assert again.encode(text) == sp_tok.encode(text)


@pytest.mark.parametrize("vocab_size", [100, 100_000])
def test_sp_bad_vocab_size_is_a_clear_error(vocab_size: int) -> None:
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        SentencePieceTokenizer.train(corpus(50), vocab_size=vocab_size)


# --- HF tokenizer.json ---------------------------------------------------------------------------


def test_hf_loads_with_special_tokens_from_config(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_hf_round_trip_and_offsets(hf_dir: Path, text: str) -> None:
    tok = load_tokenizer(hf_dir)
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert covered_text(text, offsets) == text


def test_hf_offsets_are_character_spans(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    text = "café 日本 😀"
    ids, offsets = tok.encode_with_offsets(text)
    for token_id, (s, e) in zip(ids, offsets):
        piece = raw.decode([token_id])
        if "\ufffd" in piece:  # a byte of the unseen emoji: maps onto the whole char
            assert text[s:e] == "😀"
        else:
            assert text[s:e] == piece


def test_hf_special_tokens_map_and_eos_as_pad(tmp_path: Path) -> None:
    train_hf(corpus(50), vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)


def test_hf_unknown_special_token_is_an_error(tmp_path: Path) -> None:
    train_hf(corpus(50), vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(tmp_path)


def test_hf_save_load_identical(hf_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(hf_dir)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 4096  # unrelated fields survive
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in ROUND_TRIP:
        assert loaded.encode_with_offsets(text) == tok.encode_with_offsets(text)


# --- load_tokenizer ------------------------------------------------------------------------------


def test_load_prefers_tokenizer_json(hf_dir: Path, sp_tok: SentencePieceTokenizer, tmp_path: Path) -> None:
    load_tokenizer(hf_dir).save(tmp_path)
    sp_tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_load_missing_names_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
