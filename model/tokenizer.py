"""Tokenizers behind one interface: LLaMA-2's SentencePiece model and HF `tokenizer.json` files.

Both report per-token character offsets so that chat templates can compute loss masks from
character spans instead of encoding prompt and answer separately (which changes the tokens).
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_pb2

Offsets = list[tuple[int, int]]

SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.47 keeps the template here, not in the config


class Tokenizer(ABC):
    """Text <-> ids. `encode` never adds bos/eos: callers (chat templates) place them as ids."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def _own_pad_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else eos (LLaMA-2 has no pad; padded positions are masked anyway)."""
        pad = self._own_pad_id if self._own_pad_id is not None else self.eos_id
        if pad is None:
            raise ValueError(f"{type(self).__name__} has neither a pad nor an eos token")
        return pad

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, when it ships one (HF checkpoints); None: LLaMA-2's format."""
        return None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Ids plus, per token, the [start, end) character (str index) span of `text` it covers."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    def decode_special(self, token_id: int) -> str:
        """The text of one token, special tokens included (chat templates name bos/eos as text)."""
        return self._decode([token_id])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping bos/eos/pad."""
        skip = {self.bos_id, self.eos_id, self._own_pad_id}
        return self._decode([int(i) for i in ids if int(i) not in skip])

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write this tokenizer's files into `directory` (created if needed) for `load_tokenizer`."""


def _char_of_byte(text: str) -> list[int]:
    """Index of the character each UTF-8 byte of `text` belongs to, plus len(text) for the end."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    char_of_byte.append(len(text))
    return char_of_byte


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, e.g. LLaMA-2's `tokenizer.model` (unk=0, bos=1, eos=2, no pad)."""

    def __init__(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, **trainer_options: Any
    ) -> SentencePieceTokenizer:
        """Train a byte-fallback BPE in memory with LLaMA-2's settings (`trainer_options` override them)."""
        options: dict[str, Any] = dict(
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            character_coverage=1.0,
            allow_whitespace_only_pieces=True,
            # Same texts -> same model: every sentence, in order, on one thread.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
        options.update(trainer_options)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, **options
            )
        except RuntimeError as err:
            # SentencePiece's own message says which bound was hit (required chars / max pieces).
            raise ValueError(
                f"cannot train a SentencePiece BPE with vocab_size={vocab_size} on these texts: {err}"
            ) from err
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def unk_id(self) -> int | None:
        return _optional_id(self._sp.unk_id())

    @property
    def _own_pad_id(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        # Pieces carry UTF-8 byte spans. `immutable_proto` is gone in sentencepiece 0.2.3, while
        # `serialized_proto` is accepted across 0.2.x, so parse that.
        proto = sentencepiece_pb2.SentencePieceText.FromString(
            self._sp.encode(text, out_type="serialized_proto")
        )
        char_of_byte = _char_of_byte(text)
        ids, offsets = [], []
        for piece in proto.pieces:
            start = char_of_byte[piece.begin]
            if piece.end > piece.begin:
                end = char_of_byte[piece.end - 1] + 1
            else:
                # All byte-fallback pieces of a char but its last get an empty span at the char's
                # first byte: they still cover that char. (The dummy-prefix "▁" stays empty.)
                end = start + 1 if self._sp.is_byte(piece.id) else start
            ids.append(piece.id)
            offsets.append((start, end))
        return ids, offsets

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SP_MODEL_FILE).write_bytes(self._sp.serialized_model_proto())


def _optional_id(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def _default_template(value: str | list[dict[str, str]] | None) -> str | None:
    """tokenizer_config.json's chat_template: one template, or named ones of which "default" is used."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    """A special token as written in HF configs: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value["content"]
    return value


class HFTokenizer(Tokenizer):
    """A HF fast tokenizer (`tokenizer.json`) run by the `tokenizers` library, without transformers."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self._chat_template = chat_template or _default_template((config or {}).get("chat_template"))
        # Kept so that `save` round-trips fields we do not use (chat_template, model_max_length, ...).
        self._config = dict(config or {})
        self._bos_id = self._token_id("bos_token", bos_token)
        self._eos_id = self._token_id("eos_token", eos_token)
        self._pad_id = self._token_id("pad_token", pad_token)

    def _token_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load `tokenizer.json`, with special tokens from `tokenizer_config.json` /
        `special_tokens_map.json` beside it (the config wins where both name a token)."""
        path = Path(path)
        directory = path.parent
        config: dict[str, Any] = {}
        if (directory / HF_CONFIG_FILE).is_file():
            config = json.loads((directory / HF_CONFIG_FILE).read_text(encoding="utf-8"))
        tokens: dict[str, Any] = {}
        if (directory / HF_SPECIAL_TOKENS_FILE).is_file():
            tokens = json.loads((directory / HF_SPECIAL_TOKENS_FILE).read_text(encoding="utf-8"))
        tokens.update({k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token")})
        template = directory / HF_CHAT_TEMPLATE_FILE
        return cls(
            tokenizers.Tokenizer.from_file(str(path)),
            bos_token=_token_content(tokens.get("bos_token")),
            eos_token=_token_content(tokens.get("eos_token")),
            pad_token=_token_content(tokens.get("pad_token")),
            config=config,
            chat_template=template.read_text(encoding="utf-8") if template.is_file() else None,
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def _own_pad_id(self) -> int | None:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def _decode(self, ids: list[int]) -> str:
        # bos/eos/pad are already dropped; other special tokens are kept as the text they are.
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_TOKENIZER_FILE))
        config = dict(self._config)
        specials = {"bos_token": self._bos_id, "eos_token": self._eos_id, "pad_token": self._pad_id}
        for name, token_id in specials.items():
            config[name] = None if token_id is None else self._tok.id_to_token(token_id)
        (directory / HF_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        if self._chat_template and "chat_template" not in config:
            (directory / HF_CHAT_TEMPLATE_FILE).write_text(self._chat_template, encoding="utf-8")


def load_tokenizer(directory_or_file: str | Path) -> Tokenizer:
    """`tokenizer.json` (preferred) or `tokenizer.model` in a folder, or either file itself."""
    path = Path(directory_or_file)
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer.from_file(path)
        return SentencePieceTokenizer.from_file(path)
    if (path / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer.from_file(path / HF_TOKENIZER_FILE)
    if (path / SP_MODEL_FILE).is_file():
        return SentencePieceTokenizer.from_file(path / SP_MODEL_FILE)
    raise FileNotFoundError(
        f"no tokenizer in {path}: looked for {HF_TOKENIZER_FILE} and {SP_MODEL_FILE}"
    )
