"""A reward model's calibration: the offset subtracted from its raw score before the sigmoid.

The ranking loss fixes only score differences, so a trained RM's absolute level is arbitrary; the paper's gate
(R_c = R_s when R_s < 0.15) reads absolute sigmoid scores. Measured here: without an offset the safety RM gave
every answer to a helpful prompt a sigmoid score below 0.15, so the gate handed all of them to the safety RM.
Centering each RM on the answers of its own held-out pairs puts an average answer at 0.5. The offset travels
with the checkpoint in `reward_calibration.json` (transformers and vLLM ignore the file).
"""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_FILE = "reward_calibration.json"


def write_calibration(folder: str | Path, offset: float, how: str) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset, "how": how}, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old file or the new one
    return path


def read_calibration(folder: str | Path) -> float:
    """The offset, or 0.0 for a checkpoint without one (e.g. a reward model trained elsewhere)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return 0.0
    offset = json.loads(path.read_text()).get("offset")
    if not isinstance(offset, (int, float)):
        raise ValueError(f"{path}: 'offset' must be a number, got {offset!r}")
    return float(offset)
