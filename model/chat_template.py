"""Chat formats with per-token loss masks: the model's own template when its tokenizer ships one, else LLaMA-2's.

LLaMA-2 (Meta's llama/generation.py `chat_completion`): each (user, assistant) pair is one
`[bos] "[INST] user [/INST] answer " [eos]` sequence; a trailing user turn becomes the generation prompt
`[bos] "[INST] user [/INST]"`. A system message is folded into the first user turn. bos/eos are always ids.

A HF checkpoint's Jinja template (e.g. SmolLM2's ChatML) is rendered as transformers renders it; an answer's span is
where the dialogue rendered up to it with the generation prompt ends and the dialogue rendered through it ends (its
end-of-turn token included, trailing whitespace not), and the whole text is tokenized once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")
MODES = ("all", "last")

Message = dict[str, str]


@dataclass
class EncodedChat:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on (answer tokens and their eos)


def _validate(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}]: expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role: unknown role {role!r}, expected one of {ROLES}")
        if role == "system" and index != 0:
            raise ValueError(f"messages[{index}].role: a system message is only allowed at index 0")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{index}].content: must be a non-empty string, got {content!r}")
    first_turn = 1 if messages[0]["role"] == "system" else 0
    if first_turn == len(messages):
        raise ValueError("messages[0].role: a system message must be followed by a user message")
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if messages[index]["role"] != expected:
            raise ValueError(
                f"messages[{index}].role: expected {expected!r}, got {messages[index]['role']!r}; "
                "turns alternate user/assistant starting with user"
            )


def _turns(messages: Sequence[Message]) -> list[tuple[str, str | None]]:
    """(user, answer) pairs, the system message merged into the first user turn as Meta does;
    the answer is None for a trailing user turn."""
    contents = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1], *contents[2:]]
    users, answers = contents[::2], contents[1::2]
    return [(user, answers[i] if i < len(answers) else None) for i, user in enumerate(users)]


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError("the LLaMA-2 chat format needs a tokenizer with both bos and eos tokens")
    return tokenizer.bos_id, tokenizer.eos_id


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], mode: Literal["all", "last"] = "all"
) -> EncodedChat:
    """Ids and loss mask of a dialogue. mode "all" trains on every answer, "last" only on the last
    one (Ghost Attention). A trailing user turn is encoded as the generation prompt, untrained."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    _validate(messages)
    if tokenizer.chat_template is not None:
        return _encode_with_template(tokenizer, messages, mode)
    bos, eos = _special_ids(tokenizer)
    turns = _turns(messages)
    answered = [i for i, (_, answer) in enumerate(turns) if answer is not None]
    if mode == "last" and not answered:
        raise ValueError('mode "last" needs at least one assistant message to train on')

    input_ids: list[int] = []
    loss_mask: list[int] = []
    for i, (user, answer) in enumerate(turns):
        if answer is None:
            prompt = tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}")
            input_ids += [bos, *prompt]
            loss_mask += [0] * (len(prompt) + 1)
            continue
        prompt = f"{B_INST} {user.strip()} {E_INST}"
        text = f"{prompt} {answer.strip()} "
        # One encode call per pair, as Meta does; encoding prompt and answer apart would change
        # the tokens at the seam. Every token reaching past the prompt text is answer: that includes
        # the space after [/INST], which the sampler must generate since its prompt ends at [/INST].
        ids, offsets = tokenizer.encode_with_offsets(text)
        trained = mode == "all" or i == answered[-1]
        input_ids += [bos, *ids, eos]
        loss_mask += [0, *(int(trained and end > len(prompt)) for _, end in offsets), int(trained)]
    return EncodedChat(input_ids=input_ids, loss_mask=loss_mask)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids to feed a sampler: the dialogue so far, ending with the user turn to answer."""
    if messages and messages[-1].get("role") != "user":
        raise ValueError(
            f"messages[{len(messages) - 1}].role: a prompt must end with a user message, "
            f"got {messages[-1].get('role')!r}"
        )
    return encode_chat(tokenizer, messages).input_ids


# --- the model's own template -------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    # transformers' settings: a sandbox, trim_blocks/lstrip_blocks, loop controls and raise_exception.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_template(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The dialogue as text in the tokenizer's own chat template."""
    specials: dict[str, Any] = {name: tokenizer.decode_special(token_id) for name, token_id in
                                (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
                                if token_id is not None}
    return _compiled(tokenizer.chat_template).render(messages=[dict(m) for m in messages],
                                                     add_generation_prompt=add_generation_prompt, **specials)


def _encode_with_template(tokenizer: Tokenizer, messages: Sequence[Message], mode: str) -> EncodedChat:
    ends_with_user = messages[-1]["role"] == "user"
    text = render_template(tokenizer, messages, add_generation_prompt=ends_with_user)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mode == "last":
        if not answers:
            raise ValueError('mode "last" needs at least one assistant message to train on')
        answers = answers[-1:]
    spans = []
    for i in answers:
        start = len(render_template(tokenizer, messages[:i], add_generation_prompt=True))
        through = render_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(through) or len(through) <= start:
            raise ValueError(f"messages[{i}]: the tokenizer's chat template does not render the dialogue up to this "
                             "answer as a prefix of the whole; loss masks cannot be placed")
        spans.append((start, len(through.rstrip())))
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(end > lo and start < hi for lo, hi in spans)) for start, end in offsets]
    return EncodedChat(input_ids=ids, loss_mask=mask)
