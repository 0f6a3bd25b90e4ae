"""Pretrained tiny bases shipped with the world, so that a run aligns a pretrained model without pretraining it.

A shipped base is a finished pretrain stage's checkpoints with its identity: the digest of the corpus texts it read
(not of their Parquet file, whose bytes name the pyarrow version) and of the recipe it trained with. The pretrain
stage takes one only when both equal the run's own, so a changed world or recipe pretrains from scratch. Each file's
sha256 is kept, so a truncated or pointer file fails loudly.

    python -m pipeline.stages.pretrain_shipped --run runs/tiny --name tiny-seed0   # ship a run's bases
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.data.store import RunStore, digest_config, digest_file
from pipeline.stages.world import world_stage_name

SHIPPED_BASES = Path(__file__).resolve().parents[1] / "world" / "bases"
MANIFEST = "base.json"


def texts_digest(texts: list[str]) -> str:
    return digest_config(texts)


def find_shipped(folder: Path, texts: list[str], config_digest: str) -> Path | None:
    """The shipped base in `folder` pretrained on these corpus texts with this recipe, if there is one."""
    corpus = texts_digest(texts)
    for manifest in sorted(folder.glob(f"*/{MANIFEST}")):
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if meta["corpus_texts"] == corpus and meta["config_digest"] == config_digest:
            return manifest.parent
    return None


def copy_shipped(base: Path, checkpoints: Path) -> list[dict[str, Any]]:
    """Copy a shipped base's checkpoints into `checkpoints` after checking every file's digest; returns its models
    as the pretrain stage records them (checkpoint paths relative to the stage folder)."""
    meta = json.loads((base / MANIFEST).read_text(encoding="utf-8"))
    for name, digest in meta["files"].items():
        if not (base / name).is_file() or digest_file(base / name) != digest:
            raise ValueError(f"shipped base {base}: {name} is missing or not the file it shipped with (sha256 "
                             f"{digest[:12]}...); restore it (git checkout, or `git lfs pull` if it is a pointer)")
    for model in meta["models"]:
        shutil.copytree(base / model["size"], checkpoints / model["size"], dirs_exist_ok=True)
    return [{**m, "checkpoint": f"{checkpoints.name}/{m['size']}"} for m in meta["models"]]


def ship(run_dir: Path, dest: Path) -> Path:
    """Write a finished run's pretrain stage to `dest` as a shipped base."""
    store = RunStore(run_dir)
    stage = store.stage(0, "pretrain")
    manifest = stage.manifest()
    if manifest is None:
        raise ValueError(f"{stage.path}: no finished pretrain stage to ship")
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for model in manifest["extra"]["models"]:
        shutil.copytree(stage.path / model["checkpoint"], dest / model["size"], dirs_exist_ok=True)
        files.update({f"{model['size']}/{f.name}": digest_file(f) for f in sorted((dest / model["size"]).iterdir())})
    texts = store.stage(0, world_stage_name("corpus")).read().column("text").to_pylist()
    meta = {"corpus_texts": texts_digest(texts), "config_digest": manifest["config_digest"],
            "code_version": manifest["code_version"], "files": files,
            "models": [{k: v for k, v in m.items() if k != "checkpoint"} for m in manifest["extra"]["models"]]}
    (dest / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder whose pretrain stage finished")
    parser.add_argument("--name", required=True, help=f"the shipped base's folder under {SHIPPED_BASES}")
    args = parser.parse_args()
    print(ship(args.run, SHIPPED_BASES / args.name))


if __name__ == "__main__":
    main()
