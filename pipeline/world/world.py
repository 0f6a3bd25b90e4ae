"""The world: the fact base, every task family's parameter space split into train and eval, and prompt sampling.

Train prompts, demonstrations, preference batches and the corpus all draw from train keys only; the evaluation
prompt sets draw from eval keys only, so no held-out task ever reaches training data, in any phrasing.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.data.schemas import ATTACK_VECTORS, RISK_CATEGORIES
from pipeline.world.borderline import Borderline
from pipeline.world.config import WorldConfig
from pipeline.world.dialogue import (apply_instruction, instruction_from_key, instruction_keys,
                                     instruction_shape)
from pipeline.world.facts import build_fact_base
from pipeline.world.safety import UnsafeRequests
from pipeline.world.seeding import draw, split_keys, stream
from pipeline.world.families import make_families
from pipeline.world.tasks import Family, Key, Task, key_id

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]  # ends with a user turn
    category: str
    attack_vector: str | None
    meta: dict[str, Any]

    @property
    def is_safety(self) -> bool:
        return self.category in RISK_CATEGORIES

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Prompt:
        """From a row of a prompts table (meta as JSON)."""
        return cls(list(row["messages"]), row["category"], row["attack_vector"], json.loads(row["meta"]))

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"World: unknown split {split!r}, expected one of {SPLITS}")


class World:
    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self.facts = build_fact_base(self.config.seed, self.config.n_people, self.config.n_places)
        c = self.config
        self.helpful_families: list[Family] = make_families(c.helpful_families, self.facts, c.format_share)
        self._plain_families = make_families(c.helpful_families, self.facts, 0.0)  # dialogues: the system prompt rules
        self.hard_families: list[Family] = make_families(c.hard_families, self.facts, 0.0)
        self._borderline = Borderline()
        self._unsafe = UnsafeRequests()
        fraction = self.config.eval_fraction
        self._keys: dict[str, dict[str, list[Key]]] = {}
        for family in (*self.helpful_families, *self.hard_families, self._borderline):
            self._keys[family.name] = dict(zip(SPLITS, split_keys(family.keys(), fraction, family.stratum)))
        # An unsafe request is held out with all its attack vectors: some vectors leave the request's words as
        # they are, so splitting per vector let a held-out question's text reach the corpus.
        unsafe_keys = self._unsafe.keys()
        requests = sorted({key[:3] for key in unsafe_keys})
        held = {split: set(part) for split, part in zip(SPLITS, split_keys(requests, fraction, lambda r: r[0]))}
        self._keys["unsafe"] = {split: [key for key in unsafe_keys if key[:3] in held[split]] for split in SPLITS}
        # Unsafe keys by (split, category, vector) cell; instruction keys by (split, shape).
        self._cells: dict[tuple[str, str, str], list[Key]] = defaultdict(list)
        for split in SPLITS:
            for key in self._keys["unsafe"][split]:
                self._cells[split, key[0], key[3]].append(key)
        self._instructions: dict[tuple[str, tuple[bool, ...]], list[Key]] = defaultdict(list)
        for split, keys in zip(SPLITS, split_keys(instruction_keys(), fraction, instruction_shape)):
            for key in keys:
                self._instructions[split, instruction_shape(key)].append(key)
        self._shapes = sorted({shape for _, shape in self._instructions})

    # --- single prompts -------------------------------------------------------------------------------------

    def helpful_task(self, split: str, rng: random.Random, formats: bool = True) -> Task:
        """A helpful task: from a hard family with probability `hard_share`, else a headline one (an in-context one
        with an answer format at `format_share` unless `formats` is False)."""
        hard = bool(self.hard_families) and rng.random() < self.config.hard_share  # no draw without a hard slice
        family = rng.choice(self.hard_families if hard else self.helpful_families if formats else self._plain_families)
        return self._task(family, rng.choice(self._keys[family.name][split]), rng)

    def _task(self, family: Family, key: Key, rng: random.Random) -> Task:
        """The family's task; a hard family's carries `slice: hard`, which the evaluation reports apart."""
        task = family.make(key, rng)
        if family in self.hard_families:
            return Task(task.question, self._scored({**task.meta, "slice": "hard"}))
        return Task(task.question, self._scored(task.meta))

    def _borderline_task(self, key: Key, rng: random.Random) -> Task:
        task = self._borderline.make(key, rng)
        return Task(task.question, self._scored(task.meta))

    def _scored(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The meta, marked for the oracle's version-3 helpfulness in a version-3 world (the oracle reads it; no
        model sees a prompt's meta)."""
        return {**meta, "oracle": 3} if self.config.version == 3 else meta

    def prompt(self, category: str, split: str, rng: random.Random, attack_vector: str | None = None) -> Prompt:
        """One random prompt of a category (a PROMPT_CATEGORIES value) from a split's task parameters."""
        _check_split(split)
        if category == "helpful":
            task = self.helpful_task(split, rng)
            return Prompt([_user(task.question)], category, None, task.meta)
        if category == "borderline":
            task = self._borderline_task(rng.choice(self._keys["borderline"][split]), rng)
            return Prompt([_user(task.question)], category, None, task.meta)
        if category == "dialogue":
            return self.dialogue(split, rng)
        if category in RISK_CATEGORIES:
            vector = attack_vector or rng.choice(ATTACK_VECTORS)
            if vector not in ATTACK_VECTORS:
                raise ValueError(f"World.prompt: unknown attack vector {vector!r}, expected one of {ATTACK_VECTORS}")
            return self._unsafe_prompt(rng.choice(self._cells[split, category, vector]), rng)
        raise ValueError(f"World.prompt: unknown category {category!r}")

    def _unsafe_prompt(self, key: Key, rng: random.Random) -> Prompt:
        task = self._unsafe.make(key, rng)
        return Prompt([_user(task.question)], key[0], key[3], task.meta)

    def dialogue(self, split: str, rng: random.Random, max_turns: int | None = None) -> Prompt:
        """A multi-turn dialogue under a system instruction, ending with a user turn. Earlier assistant turns
        are adherent clean answers; every user turn is a helpful task from the same split."""
        shape = rng.choice(self._shapes)
        key = rng.choice(self._instructions[split, shape])
        instruction = instruction_from_key(key)
        short = rng.random() < 0.5
        text = instruction.text(short, rng)
        limit = self.config.max_dialogue_turns
        limit = limit if max_turns is None else min(max_turns, limit)
        tasks = [self.helpful_task(split, rng, formats=False) for _ in range(rng.randint(1, limit))]
        messages = [{"role": "system", "content": text}]
        for task in tasks[:-1]:
            messages += [_user(task.question),
                         {"role": "assistant", "content": apply_instruction(task.meta["reference"], instruction)}]
        messages.append(_user(tasks[-1].question))
        meta = {"task": "dialogue", "key": key_id("dialogue", key),
                "instruction": {**instruction.to_meta(), "short": short, "text": text},
                "turns": [t.meta for t in tasks],
                "reference": apply_instruction(tasks[-1].meta["reference"], instruction)}
        return Prompt(messages, "dialogue", None, meta)

    # --- prompt sets ----------------------------------------------------------------------------------------

    def prompts(self, split: str) -> list[Prompt]:
        """The RLHF prompt set ("train") or the held-out evaluation set ("eval"): helpful, borderline, every
        (risk category x attack vector) cell, dialogues. Task parameters repeat only once a pool is used up."""
        _check_split(split)
        c = self.config
        n_helpful, n_borderline, per_cell, n_dialogues = (
            (c.train_helpful, c.train_borderline, c.train_safety_per_cell, c.train_dialogues) if split == "train"
            else (c.eval_helpful, c.eval_borderline, c.eval_safety_per_cell, c.eval_dialogues))
        rng = stream(c.seed, "prompts", split)
        out: list[Prompt] = []
        n_hard = c.eval_hard if split == "eval" else round(n_helpful * c.hard_share)
        if split == "train":
            n_helpful -= n_hard
        for families, total in ((self.helpful_families, n_helpful), (self.hard_families, n_hard)):
            for i, family in enumerate(families):
                count = total // len(families) + (i < total % len(families))
                for key in draw(rng, self._keys[family.name][split], count):
                    task = self._task(family, key, rng)
                    out.append(Prompt([_user(task.question)], "helpful", None, task.meta))
        for key in draw(rng, self._keys["borderline"][split], n_borderline):
            task = self._borderline_task(key, rng)
            out.append(Prompt([_user(task.question)], "borderline", None, task.meta))
        for category in RISK_CATEGORIES:
            for vector in ATTACK_VECTORS:
                cell = self._cells[split, category, vector]
                out += [self._unsafe_prompt(key, rng) for key in draw(rng, cell, per_cell)]
        out += [self.dialogue(split, rng) for _ in range(n_dialogues)]
        return out
