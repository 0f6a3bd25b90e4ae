"""Where Ghost Attention's instructions and dialogues come from, and what measures adherence (Table 30).

- `WorldDialogues`: the world's instructions (a language, a figure, a hobby) over its helpful tasks; the oracle's
  `follows()` checks every answer, so samples can be verified and adherence is exact.
- `FileDialogues`: a user's own files (`data.gatt`): a list of instructions and multi-turn chats whose user turns
  are the dialogues (any chat layout the SFT loader reads; the files' answers are not used, the policy writes its
  own). A free-text instruction has no rule to check it, so samples are not verified and the LLM judge measures
  adherence, one Yes/No question per answered turn (pipeline/evaluation/judge.py); its position-swap consistency
  on the round's win rates says how far to trust it.
Both hold instructions and dialogues out by hash (the world by its own split, files by `heldout_share`), so
adherence is measured on instructions and dialogues GAtt never trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from model.chat_template import Message
from pipeline.data.schemas import INSTRUCTIONS, REJECTS
from pipeline.data.store import digest_config, write_table_atomic
from pipeline.evaluation.judge import ADHERENCE_PREFIX, adherence_messages, parse_yes_no
from pipeline.stages.context import StageContext, Table
from pipeline.stages.evaluation.llm_judge import JudgeConfig, ask_judge, judge_digest
from pipeline.stages.gatt.algorithm import (GAttDialogue, GAttInstruction, TurnAdherence, adherence_by_turn,
                                            gatt_dialogues)
from pipeline.stages.reward_model.algorithm import id_rank
from pipeline.world import SPLITS, World

class DialogueSource(Protocol):
    digest: str  # what identifies the source in stage digests beyond GAtt's own config ("" for the world)

    def dialogues(self, split: str, count: int, turns: int, rng: random.Random, short_prob: float,
                  min_turns: int = 1) -> list[GAttDialogue]: ...

    def adherence(self, ctx: StageContext, dialogues: list[GAttDialogue], answers: list[list[str]],
                  stage: str) -> tuple[list[TurnAdherence], dict[str, Any]]: ...


@dataclass
class WorldDialogues:
    world: World
    digest: str = ""  # the world's dialogues follow from the world config, already in every stage's inputs

    def dialogues(self, split: str, count: int, turns: int, rng: random.Random, short_prob: float,
                  min_turns: int = 1) -> list[GAttDialogue]:
        return gatt_dialogues(self.world, split, count, turns, rng, short_prob, min_turns)

    def adherence(self, ctx: StageContext, dialogues: list[GAttDialogue], answers: list[list[str]],
                  stage: str) -> tuple[list[TurnAdherence], dict[str, Any]]:
        return adherence_by_turn([d.meta for d in dialogues], answers), {}


# --- the user's files ----------------------------------------------------------------------------------------

@dataclass
class GAttFiles:
    """`data.gatt`: GAtt's inputs for a run from files (both or neither)."""

    # .txt: one instruction per line; .json / .jsonl: rows with `instruction` and an optional `short` form.
    instructions: str | None = None
    # Multi-turn chats in any layout `data.sft` files may have; only their user turns are used.
    dialogues: str | None = None
    heldout_share: float = 0.25  # of the instructions and of the dialogues, kept for measuring adherence only

    def __post_init__(self) -> None:
        errors = []
        if (self.instructions is None) != (self.dialogues is None):
            missing = "instructions" if self.instructions is None else "dialogues"
            errors.append(f"data.gatt.{missing}: not set; GAtt from files needs both an instruction list and "
                          "dialogues")
        if not 0 < self.heldout_share < 1:
            errors.append(f"data.gatt.heldout_share = {self.heldout_share}: must be in (0, 1)")
        if errors:
            raise ValueError("\n".join(errors))

    @property
    def enabled(self) -> bool:
        return self.instructions is not None


def _instruction_row(record: Any) -> dict[str, Any]:
    """One instruction row, or ValueError(field: reason)."""
    if isinstance(record, str):
        record = {"instruction": record}
    if not isinstance(record, dict):
        raise ValueError(f"instruction: expected a text or an object, got {type(record).__name__}")
    text, short = record.get("instruction"), record.get("short")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("instruction: missing or empty")
    if short is not None and (not isinstance(short, str) or not short.strip()):
        raise ValueError("short: must be a non-empty text when given")
    return {"id": hashlib.sha256(text.strip().encode()).hexdigest()[:16], "text": text.strip(),
            "short": short.strip() if short else None}


def _records(path: Path) -> list[tuple[Any, str]]:
    """(record, raw text) per row: a line of .txt / .jsonl, an element of a .json array."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of instructions")
        return [(r, json.dumps(r, ensure_ascii=False)) for r in data]
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rows.append((json.loads(line), line))
            except json.JSONDecodeError as err:
                rows.append((err, line))
        else:
            rows.append((line, line))
    return rows


def load_instructions(path: str | Path, rejects_path: Path,
                      max_reject_share: float) -> tuple[pa.Table, pa.Table]:
    """The instruction list as an INSTRUCTIONS table, and its REJECTS: rows that cannot be used (not JSON, no
    `instruction`, a duplicate), also written to `rejects_path` with file, row, field and reason. More than
    `max_reject_share` of them stops the run, naming the first."""
    path = Path(path)
    rows, rejects, seen = [], [], set()
    for i, (record, raw) in enumerate(_records(path)):
        try:
            if isinstance(record, json.JSONDecodeError):
                raise ValueError(f"row: not JSON ({record.msg})")
            row = _instruction_row(record)
            if row["id"] in seen:
                raise ValueError("instruction: duplicate of an earlier row")
        except ValueError as err:
            field, _, reason = str(err).partition(": ")
            rejects.append({"source": str(path), "row": i, "field": field, "reason": reason, "raw": raw})
            continue
        seen.add(row["id"])
        rows.append(row)
    rejected = pa.Table.from_pylist(rejects, schema=REJECTS)
    if rejects:
        write_table_atomic(rejected, rejects_path)
    total = len(rows) + len(rejects)
    if not rows or len(rejects) > max_reject_share * total:
        first = rejects[0] if rejects else None
        where = f"; first: row {first['row']}, field {first['field']}: {first['reason']}" if first else ""
        raise ValueError(f"{path}: {len(rejects)} of {total} instruction rows rejected (max_reject_share "
                         f"{max_reject_share}; all in {rejects_path}){where}")
    return pa.Table.from_pylist(rows, schema=INSTRUCTIONS), rejected


def heldout_split(ids: Sequence[str], share: float, salt: str) -> dict[str, list[int]]:
    """Row indices per split ("train", "eval"): `share` of the rows (at least one) drawn by id hash for "eval"."""
    if len(ids) < 2:
        raise ValueError(f"{salt}: {len(ids)} row(s); need at least 2 to hold some out")
    order = id_rank(list(ids), f"gatt-{salt}")
    held = max(1, min(len(ids) - 1, round(share * len(ids))))
    return {"train": sorted(order[held:]), "eval": sorted(order[:held])}


@dataclass
class FileDialogues:
    """GAtt's dialogues from the user's instruction list and chats; adherence asked of the LLM judge."""

    instructions: dict[str, list[tuple[str, str | None]]]  # split -> (text, short form)
    user_turns: dict[str, list[list[str]]]  # split -> each chat's user turns
    judge: tuple[JudgeConfig, Path]  # the LLM judge's config and checkpoint folder
    digest: str

    @classmethod
    def from_tables(cls, instructions: pa.Table, chats: pa.Table, share: float, judge: tuple[JudgeConfig, Path],
                    digest: str) -> FileDialogues:
        """From the `gatt_instructions` and `gatt_dialogues` tables of a run from files."""
        texts = list(zip(instructions.column("text").to_pylist(), instructions.column("short").to_pylist()))
        turns = [[m["content"] for m in messages if m["role"] == "user"]
                 for messages in chats.column("messages").to_pylist()]
        ids = [i for i, t in zip(chats.column("id").to_pylist(), turns) if t]
        turns = [t for t in turns if t]
        by_instruction = heldout_split(instructions.column("id").to_pylist(), share, "instructions")
        by_chat = heldout_split(ids, share, "dialogues")
        return cls({s: [texts[i] for i in by_instruction[s]] for s in SPLITS},
                   {s: [turns[i] for i in by_chat[s]] for s in SPLITS}, judge, digest)

    def dialogues(self, split: str, count: int, turns: int, rng: random.Random, short_prob: float,
                  min_turns: int = 1) -> list[GAttDialogue]:
        """`count` dialogues of min_turns..turns user turns: one chat's user turns, continued with the next chats'
        when it is shorter, under an instruction of the same split (its short form with probability
        `short_prob`, when it has one)."""
        chats = self.user_turns[split]
        out = []
        for i in range(count):
            text, short_text = rng.choice(self.instructions[split])
            short = short_text is not None and rng.random() < short_prob
            length, at, user = rng.randint(min_turns, turns), rng.randrange(len(chats)), []
            while len(user) < length:
                user += chats[at % len(chats)]
                at += 1
            user = user[:length]
            instruction = GAttInstruction(None, short, short_text if short else text)
            out.append(GAttDialogue(f"gatt-{split}-{i:05d}", instruction, tuple(user), tuple({} for _ in user)))
        return out

    def adherence(self, ctx: StageContext, dialogues: list[GAttDialogue], answers: list[list[str]],
                  stage: str) -> tuple[list[TurnAdherence], dict[str, Any]]:
        config, folder = self.judge

        def ask(requests: list[tuple[str, list[Message]]]) -> dict[str, str]:
            pool = ctx.pools.generator("judge", folder, config.context)
            return ask_judge(requests, folder, config, pool, ctx.round, stage,
                             ADHERENCE_PREFIX if config.style == "direct" else "")

        return judged_adherence(dialogues, answers, ask)


def judged_adherence(dialogues: Sequence[GAttDialogue], answers: Sequence[Sequence[str]],
                     ask: Callable[[list[tuple[str, list[Message]]]], dict[str, str]]
                     ) -> tuple[list[TurnAdherence], dict[str, Any]]:
    """Adherence per turn as the judge sees it: one Yes/No request per answered turn (`<dialogue id>|<turn>`); a
    turn never reached (an empty answer ends a dialogue) or a reply with no Yes/No counts as not following, as
    `adherence_by_turn` counts them. Also returns how many replies had no verdict."""
    if len(dialogues) != len(answers):
        raise ValueError(f"{len(answers)} answer lists for {len(dialogues)} dialogues")
    requests = [(f"{d.id}|{t}", adherence_messages(d.instruction.text, d.user_turns[t - 1], answer))
                for d, done in zip(dialogues, answers) for t, answer in enumerate(done, 1) if answer.strip()]
    verdicts = {key: parse_yes_no(reply) for key, reply in (ask(requests) if requests else {}).items()}
    counts: dict[int, list[int]] = {}
    for d in dialogues:
        for t in range(1, len(d.user_turns) + 1):
            seen = counts.setdefault(t, [0, 0])
            seen[0] += 1
            seen[1] += verdicts.get(f"{d.id}|{t}") is True
    unparsed = sum(verdicts.get(key) is None for key, _ in requests)
    rows = [TurnAdherence(t, n, k) for t, (n, k) in sorted(counts.items())]
    return rows, {"judge_unparsed": unparsed, "judge_requests": len(requests)}


def dialogue_source(tables: dict[str, Table], world: World | None, heldout_share: float,
                    judge: tuple[JudgeConfig, Path] | None) -> DialogueSource | None:
    """GAtt's instructions and dialogues: the world's, or data.gatt's files (`heldout_share` of them held out) with
    the LLM judge measuring adherence; None for a run from files without them (the config then refuses GAtt)."""
    if world is not None:
        return WorldDialogues(world)
    if "gatt_instructions" not in tables or judge is None:
        return None
    config, folder = judge
    files = digest_config({"instructions": tables["gatt_instructions"].digest,
                           "dialogues": tables["gatt_dialogues"].digest, "heldout_share": heldout_share,
                           "judge": judge_digest(folder), "judge_config": dataclasses.asdict(config)})
    return FileDialogues.from_tables(tables["gatt_instructions"].rows, tables["gatt_dialogues"].rows, heldout_share,
                                     judge, files)
