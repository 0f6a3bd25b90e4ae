"""Ghost Attention (docs/paper.md, "Ghost Attention"), the data side: pure functions, no Ray or vLLM.

The paper's instructions are a language ("Speak in French"), a public figure ("Act as Napoleon") and a hobby
("You enjoy tennis"), combined at random and half the time shortened ("Figure: Napoleon."). The world has exactly
these kinds (pipeline/world/dialogue.py `Instruction`), with `follows()` as the oracle's adherence check, so GAtt
uses them as they are.

Where the instruction goes. LLaMA-2's template folds a system prompt into the first user turn as
`<<SYS>>\\n{instruction}\\n<</SYS>>\\n\\n{user}`, so "the instruction in the first user turn" is a system message
(the form of the world's dialogue prompts and SFT demonstrations). For sampling, every later user turn carries the
instruction in that same form, as text of the user turn, so the first turn's tokens are identical in sampling,
training and evaluation, and training drops exactly what sampling added.

The driver's loop (generator pool for the answers, the oracle for Table 30):

    rng = random.Random(cfg.seed)
    dialogues = gatt_dialogues(world, "train", cfg.dialogues, cfg.turns, rng, cfg.short_prob)
    answers = [[] for _ in dialogues]
    while (table := gatt_sampling_prompts(dialogues, answers, tokenizer, max_prompt_tokens)).num_rows:
        add_answers(dialogues, answers, generate(table))             # one sample per row, latest policy
    demos = gatt_demonstrations(dialogues, answers)                  # instruction in the first turn only
    examples = gatt_examples(demos, tokenizer, seq_len)              # loss on the last answer only

    # Table 30: held-out dialogues of exactly cfg.turns turns, the instruction in the first turn only
    held = gatt_dialogues(world, "eval", cfg.eval_dialogues, cfg.turns, rng, cfg.short_prob, min_turns=cfg.turns)
    ... the same loop with adherence_prompts(...) ...
    adherence_table({"before GAtt": adherence_by_turn([d.meta for d in held], answers_before), "GAtt": ...})
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import pyarrow as pa

from model.chat_template import B_SYS, E_SYS, Message, encode_chat, encode_prompt
from model.packing import Example
from model.tokenizer import Tokenizer
from pipeline.data.schemas import DEMONSTRATIONS
from pipeline.stages.sft.algorithm import SFTConfig, check_positive, check_ratio
from pipeline.world import SPLITS, World, judge_dialogue
from pipeline.world.dialogue import Instruction, follows, instruction_from_key, instruction_keys, instruction_shape
from pipeline.world.seeding import split_keys
from pipeline.world.tables import dump_meta

GATT_SOURCE = "gatt"
# docs/paper.md, Table 30: share (%) of turns that follow the instruction, turn -> (baseline, GAtt).
TABLE30 = {2: (100.0, 100.0), 4: (10.0, 100.0), 6: (0.0, 100.0), 20: (0.0, 100.0)}

InstructionKey = tuple[str, str, str]


@dataclass
class GAttConfig:
    # From this round on (0: never): the paper applies GAtt after RLHF-V3.
    gatt_from: int = 4
    dialogues: int = 200  # synthetic training dialogues sampled per round
    eval_dialogues: int = 50  # held-out dialogues of `turns` turns each, for Table 30
    turns: int = 20  # training dialogues have 1..turns user turns; evaluation dialogues exactly `turns`
    short_prob: float = 0.5  # the paper shortens half the instructions ("Figure: Napoleon.")
    # The paper's recipe: one sample per turn, trained on as sampled. With `verify`, up to `samples_per_turn`
    # samples, the first that keeps the instruction used, and only dialogues whose last (trained) answer keeps it
    # trained on: the instructions are synthetic constraints with a rule-based check (`follows`), so this is
    # rejection sampling with a verifier. Not in the paper, whose 70B model follows an instruction it can see; the
    # tiny policies often drop it even then, and trained on unfiltered samples they kept dropping it
    # (docs/results.md).
    samples_per_turn: int = 1
    verify: bool = False
    # Train on every answered prefix of a sampled dialogue (turns 1..t, the loss on answer t), not only on the
    # whole dialogue: the same samples give about turns / 2 times the training answers, at every turn position.
    # Not in the paper (one sample per dialogue), whose 70B model needs less data to keep an instruction.
    # Measured on the large tiny policy, with tiny-full's GAtt `sft`: adherence at turns 4 / 6 / 20 96 / 98 / 98%,
    # against 62 / 54 / 54% trained on the whole dialogues only for 2 epochs (docs/results.md).
    prefixes: bool = False
    # Smaller sizes train on the largest policy's GAtt samples, as rejection sampling distils the largest
    # policy's samples into them (false: each size samples its own). Measured on the small tiny policy (0.87M),
    # which keeps an instruction in 10% of its answers even where it sees it: docs/results.md.
    distil: bool = True
    # GAtt's own fine-tuning settings: the paper gives none, so SFT's.
    sft: SFTConfig = field(default_factory=SFTConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        errors = [] if self.gatt_from >= 0 else [f"rounds.gatt.gatt_from = {self.gatt_from}: must be >= 0 (0: never)"]
        errors += check_positive(self, "rounds.gatt", ("dialogues", "eval_dialogues", "turns", "samples_per_turn"))
        errors += check_ratio(self, "rounds.gatt", ("short_prob",))
        if errors:
            raise ValueError("\n".join(errors))


# --- instructions and dialogues -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GAttInstruction:
    instruction: Instruction | None  # what follows() checks; None for a user's instruction (no checker)
    short: bool
    text: str  # what the model reads

    def to_meta(self) -> dict[str, Any]:
        """The layout of the world's dialogue meta["instruction"], which the oracle reads."""
        return {**(self.instruction.to_meta() if self.instruction else {}), "short": self.short, "text": self.text}


def split_instruction_keys(split: str, eval_fraction: float) -> list[InstructionKey]:
    """A split's instruction keys, held out exactly as World holds them out (same keys, fraction and strata)."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown {split!r}, expected one of {SPLITS}")
    return split_keys(instruction_keys(), eval_fraction, instruction_shape)[SPLITS.index(split)]


def sample_instruction(rng: random.Random, keys: Sequence[InstructionKey] | None = None,
                       short_prob: float = 0.5) -> GAttInstruction:
    """A random instruction: a shape (which of language, figure, hobby) first, so single instructions are as
    frequent as combined ones (as World.dialogue draws them), then one key of that shape; short with
    probability `short_prob`. `keys` defaults to every key; pass `split_instruction_keys("train", ...)` for data
    that must not touch evaluation instructions."""
    keys = instruction_keys() if keys is None else list(keys)
    if not keys:
        raise ValueError("sample_instruction: no instruction keys")
    shape = rng.choice(sorted({instruction_shape(k) for k in keys}))
    instruction = instruction_from_key(rng.choice([k for k in keys if instruction_shape(k) == shape]))
    short = rng.random() < short_prob
    return GAttInstruction(instruction, short, instruction.text(short, rng))


@dataclass(frozen=True)
class GAttDialogue:
    id: str
    instruction: GAttInstruction
    user_turns: tuple[str, ...]
    turn_metas: tuple[dict[str, Any], ...]  # each user turn's task meta, for the oracle

    @property
    def meta(self) -> dict[str, Any]:
        """judge_dialogue's layout (that of the world's dialogue prompts)."""
        return {"task": "gatt", "instruction": self.instruction.to_meta(), "turns": list(self.turn_metas)}

    def prefix(self, turns: int) -> GAttDialogue:
        """The dialogue's first `turns` user turns, under an id of its own."""
        return replace(self, id=f"{self.id}-t{turns:02d}", user_turns=self.user_turns[:turns],
                       turn_metas=self.turn_metas[:turns])


def gatt_dialogues(world: World, split: str, count: int, turns: int, rng: random.Random,
                   short_prob: float = 0.5, min_turns: int = 1) -> list[GAttDialogue]:
    """`count` dialogues of min_turns..turns helpful tasks from `split`, each under an instruction from the same
    split. Training uses random lengths, so the one trained answer (the last) falls on every turn position;
    evaluation passes min_turns=turns."""
    if not 1 <= min_turns <= turns:
        raise ValueError(f"gatt_dialogues: need 1 <= min_turns <= turns, got {min_turns} and {turns}")
    keys = split_instruction_keys(split, world.config.eval_fraction)
    out = []
    for i in range(count):
        instruction = sample_instruction(rng, keys, short_prob)
        tasks = [world.helpful_task(split, rng, formats=False) for _ in range(rng.randint(min_turns, turns))]
        out.append(GAttDialogue(f"gatt-{split}-{i:05d}", instruction, tuple(t.question for t in tasks),
                                tuple(t.meta for t in tasks)))
    return out


# --- messages ------------------------------------------------------------------------------------------------

def with_instruction(user: str, text: str, own_template: bool = False) -> str:
    """A user turn carrying the instruction in the form the chat template gives a system prompt in turn one:
    LLaMA-2's <<SYS>> block, or a paragraph before the turn for a checkpoint with its own template (ChatML has a
    system role but no form for a system text inside a user turn)."""
    return f"{text}\n\n{user}" if own_template else f"{B_SYS}{text}{E_SYS}{user}"


def _check_turns(user_turns: Sequence[str], answers: Sequence[str], complete: bool) -> None:
    ok = len(answers) == len(user_turns) if complete else len(answers) < len(user_turns)
    if not ok:
        wanted = "as many answers as" if complete else "fewer answers than"
        raise ValueError(f"{len(answers)} answer(s) for {len(user_turns)} user turn(s): need {wanted} user turns")


def _messages(user_turns: Sequence[str], answers: Sequence[str], text: str, every_turn: bool,
              own_template: bool = False) -> list[Message]:
    """The dialogue up to the last answer plus, if there is one, the next user turn. The instruction is on every
    user turn (sampling) or only in the first, as the system prompt (training, evaluation)."""
    messages: list[Message] = [] if every_turn else [{"role": "system", "content": text}]
    for i, user in enumerate(user_turns[:len(answers) + 1]):
        messages.append({"role": "user", "content": with_instruction(user, text, own_template) if every_turn
                         else user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def gatt_sampling_prompt(user_turns: Sequence[str], answers: Sequence[str], instruction: GAttInstruction,
                         own_template: bool = False) -> list[Message]:
    """The prompt for the answer to turn len(answers) + 1: the instruction concatenated to EVERY user turn."""
    _check_turns(user_turns, answers, complete=False)
    return _messages(user_turns, answers, instruction.text, every_turn=True, own_template=own_template)


def gatt_eval_prompt(user_turns: Sequence[str], answers: Sequence[str],
                     instruction: GAttInstruction) -> list[Message]:
    """The prompt for the answer to turn len(answers) + 1 as deployed: the instruction in the first turn only."""
    _check_turns(user_turns, answers, complete=False)
    return _messages(user_turns, answers, instruction.text, every_turn=False)


def gatt_training_messages(user_turns: Sequence[str], answers: Sequence[str],
                           instruction: GAttInstruction) -> list[Message]:
    """The finished dialogue with the instruction kept only in the first user turn (as the system prompt)."""
    _check_turns(user_turns, answers, complete=True)
    return _messages(user_turns, answers, instruction.text, every_turn=False)


def fit_history(messages: Sequence[Message], tokenizer: Tokenizer, max_tokens: int) -> list[Message]:
    """Drop the oldest (user, assistant) pairs after the first turn until the encoded dialogue fits `max_tokens`.

    The first turn holds the instruction and the last turn is what is sampled or trained, so both stay; a small
    policy's context (256 tokens for the tiny ones) holds about three turns of the world's dialogues. Each pair
    is its own [bos] ... [eos] sequence in the template, so lengths add up per pair.
    """
    head = 1 if messages and messages[0]["role"] == "system" else 0
    pairs = [list(messages[i:i + 2]) for i in range(head, len(messages), 2)]
    lengths = [len(encode_chat(tokenizer, [*messages[:head], *pairs[0]]).input_ids)]
    lengths += [len(encode_chat(tokenizer, pair).input_ids) for pair in pairs[1:]]
    while sum(lengths) > max_tokens and len(pairs) > 2:
        del pairs[1], lengths[1]
    if sum(lengths) > max_tokens:
        raise ValueError(f"dialogue: {sum(lengths)} tokens in its first and last turns alone, more than "
                         f"max_tokens={max_tokens}")
    return [*messages[:head], *(m for pair in pairs for m in pair)]


# --- sampling on the generator pool ------------------------------------------------------------------------

def _next_turn_table(dialogues: Sequence[GAttDialogue], answers: Sequence[Sequence[str]], tokenizer: Tokenizer,
                     max_prompt_tokens: int, every_turn: bool) -> pa.Table:
    """Generator input (id, prompt_token_ids, is_safety) for the next turn of each unfinished dialogue: fewer
    answers than user turns and no empty answer (an empty answer cannot be shown in the chat format, so it ends
    its dialogue). A dialogue whose first and latest turns no longer fit `max_prompt_tokens` ends too: training
    leaves it out, Table 30 counts its remaining turns as not followed."""
    if len(dialogues) != len(answers):
        raise ValueError(f"{len(answers)} answer lists for {len(dialogues)} dialogues")
    own_template = tokenizer.chat_template is not None
    prompt = partial(gatt_sampling_prompt, own_template=own_template) if every_turn else gatt_eval_prompt
    ids, prompt_ids = [], []
    for d, done in zip(dialogues, answers):
        if len(done) < len(d.user_turns) and all(a.strip() for a in done):
            try:
                messages = fit_history(prompt(d.user_turns, done, d.instruction), tokenizer, max_prompt_tokens)
            except ValueError:  # its first and latest turns alone overflow the context: it ends here, unfinished
                continue
            ids.append(d.id)
            prompt_ids.append(encode_prompt(tokenizer, messages))
    return pa.table({"id": pa.array(ids, pa.string()), "prompt_token_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
                     "is_safety": pa.array([False] * len(ids), pa.bool_())})


def gatt_sampling_prompts(dialogues: Sequence[GAttDialogue], answers: Sequence[Sequence[str]],
                          tokenizer: Tokenizer, max_prompt_tokens: int) -> pa.Table:
    """Generator input for the next turn of every unfinished dialogue, instruction on every user turn (GAtt's
    sampling). Empty when every dialogue is finished."""
    return _next_turn_table(dialogues, answers, tokenizer, max_prompt_tokens, every_turn=True)


def adherence_prompts(dialogues: Sequence[GAttDialogue], answers: Sequence[Sequence[str]],
                      tokenizer: Tokenizer, max_prompt_tokens: int) -> pa.Table:
    """Generator input for the next turn, instruction in the first turn only: what Table 30 measures."""
    return _next_turn_table(dialogues, answers, tokenizer, max_prompt_tokens, every_turn=False)


def checker(dialogue: GAttDialogue) -> Instruction:
    """The instruction `follows()` checks; a user's instruction from a file has none to verify samples with."""
    if dialogue.instruction.instruction is None:
        raise ValueError(f"dialogue {dialogue.id!r}: its instruction has no checker, so samples cannot be verified; "
                         "sample one answer per turn (rounds.gatt.verify=false)")
    return dialogue.instruction.instruction


def first_adherent(dialogues: Sequence[GAttDialogue], samples: pa.Table) -> pa.Table:
    """One SAMPLES row per prompt: the first sample that keeps its dialogue's instruction, else the first."""
    instruction = {d.id: checker(d) for d in dialogues}
    chosen: dict[str, tuple[int, bool]] = {}  # prompt -> (row, keeps the instruction)
    for row, (pid, response) in enumerate(zip(samples.column("prompt_id").to_pylist(),
                                               samples.column("response").to_pylist())):
        if pid not in chosen or not chosen[pid][1]:
            keeps = follows(instruction[pid], response or "")
            if pid not in chosen or keeps:
                chosen[pid] = (row, keeps)
    return samples.take(pa.array(sorted(row for row, _ in chosen.values()), pa.int64()))


def add_answers(dialogues: Sequence[GAttDialogue], answers: list[list[str]], samples: pa.Table) -> None:
    """Append each sampled response (one SAMPLES row per prompt_id) to its dialogue's answers, stripped."""
    index = {d.id: i for i, d in enumerate(dialogues)}
    pids = samples.column("prompt_id").to_pylist()
    repeated = next((pid for pid, n in Counter(pids).items() if n > 1), None)
    if repeated is not None:
        raise ValueError(f"samples: prompt {repeated!r} has several samples; sample one answer per turn")
    for pid, response in zip(pids, samples.column("response").to_pylist()):
        if pid not in index:
            raise ValueError(f"samples: prompt {pid!r} is not one of the dialogues")
        answers[index[pid]].append((response or "").strip())


# --- training data -----------------------------------------------------------------------------------------

def gatt_demonstrations(dialogues: Sequence[GAttDialogue], answers: Sequence[Sequence[str]],
                        verify: bool = False, prefixes: bool = False) -> pa.Table:
    """A DEMONSTRATIONS table of the finished dialogues, in training form (instruction in the first turn only).
    Dialogues cut short by an empty answer are left out, and with `verify` those whose last answer breaks the
    instruction. With `prefixes`, every answered prefix (turns 1..t, ids "<id>-tNN") is a demonstration of its
    own, cut-short dialogues' included, under the same rules. Train on it with mode "last" (gatt_examples), not
    with sft_examples, which trains on every answer."""
    rows = []
    for d, done in zip(dialogues, answers, strict=True):
        answered = next((i for i, a in enumerate(done) if not a.strip()), len(done))  # an empty answer ends it
        ends = range(1, answered + 1) if prefixes else [answered] if answered == len(d.user_turns) else []
        for t in ends:
            if verify and not follows(checker(d), done[t - 1]):
                continue
            demo = d.prefix(t) if prefixes else d
            rows.append({"id": demo.id, "category": "dialogue", "source": GATT_SOURCE, "meta": dump_meta(demo.meta),
                         "messages": gatt_training_messages(demo.user_turns, done[:t], d.instruction)})
    return pa.Table.from_pylist(rows, schema=DEMONSTRATIONS)


def gatt_examples(demonstrations: pa.Table, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    """(ids, loss mask) per GAtt demonstration, loss on the last answer only, middle turns dropped to fit."""
    examples: list[Example] = []
    for row_id, messages in zip(demonstrations.column("id").to_pylist(),
                                demonstrations.column("messages").to_pylist()):
        try:
            encoded = encode_chat(tokenizer, fit_history(messages, tokenizer, seq_len), mode="last")
        except ValueError as err:
            raise ValueError(f"demonstration {row_id}: {err}") from err
        examples.append((encoded.input_ids, encoded.loss_mask))
    return examples


# --- adherence per turn (Table 30) -------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnAdherence:
    turn: int  # 1-based
    dialogues: int  # dialogues long enough to have this turn
    adherent: int

    @property
    def rate(self) -> float:
        return self.adherent / self.dialogues


def adherence_by_turn(meta_list: Sequence[Mapping[str, Any] | str],
                      assistant_turns_list: Sequence[Sequence[str]]) -> list[TurnAdherence]:
    """Share of dialogues whose answer at turn t follows the instruction (the oracle's judge_dialogue), for every
    turn t a dialogue's meta has. A dialogue cut short (an empty answer ends it) counts as not following on the
    turns it never reached, so stopping early cannot raise the later turns' rates."""
    if len(meta_list) != len(assistant_turns_list):
        raise ValueError(f"{len(assistant_turns_list)} answer lists for {len(meta_list)} dialogues")
    counts: dict[int, list[int]] = {}
    for meta, answers in zip(meta_list, assistant_turns_list):
        meta = json.loads(meta) if isinstance(meta, str) else meta
        verdicts = judge_dialogue(meta, answers)
        for t in range(1, len(meta["turns"]) + 1):
            seen = counts.setdefault(t, [0, 0])
            seen[0] += 1
            seen[1] += t <= len(verdicts) and bool(verdicts[t - 1].adherent)
    return [TurnAdherence(t, n, k) for t, (n, k) in sorted(counts.items())]


def adherence_table(measured: Mapping[str, Sequence[TurnAdherence]]) -> str:
    """Markdown: adherence (%) per turn for each labelled model (e.g. {"before GAtt": ..., "GAtt": ...}) beside
    the paper's Table 30 baseline and GAtt columns ("-" where the paper has no number)."""
    by_label = {label: {a.turn: a for a in rows} for label, rows in measured.items()}
    turns = sorted({t for rows in by_label.values() for t in rows})
    head = ["Turn", *measured, "paper baseline", "paper GAtt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in turns:
        ours = [f"{100 * rows[t].rate:.1f}" if t in rows else "-" for rows in by_label.values()]
        paper = [f"{v:.0f}" for v in TABLE30[t]] if t in TABLE30 else ["-", "-"]
        lines.append("| " + " | ".join([str(t), *ours, *paper]) + " |")
    return "\n".join(lines)
