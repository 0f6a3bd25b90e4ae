"""Load the datasets users already have into our declared schemas; every bad row goes to a rejects table.

Formats, told apart by the path: Parquet, JSON (an array, or JSON lines as `datasets.to_json` writes them), JSONL,
CSV (conversational cells hold JSON text) and folders from `datasets.Dataset.save_to_disk`. Layouts (TRL / HF /
LLaMA-Factory), told apart by the columns: `messages`; ShareGPT `conversations` of {from, value}; `prompt` and
`prompt`/`completion`; `prompt`/`chosen`/`rejected`; implicit-prompt `chosen`/`rejected` conversations; LLaMA-Factory
`conversations` + `chosen`/`rejected` message dicts; Alpaca `instruction` (+ optional `input`) / `output`.

Arrow inputs (Parquet, `datasets`, JSON lines that pyarrow parses) whose columns have the plain types take a
vectorised path: pyarrow builds the canonical columns and `validate.screen` flags the rows that may be bad. Only
flagged rows, and every row of other inputs, take the per-row path (`validate.validate_row`), which alone decides
what is accepted and why not.
"""

from __future__ import annotations

from pipeline.data.readers.common import TABLE_KINDS, LoadResult, LoadSummary
from pipeline.data.readers.load import load
from pipeline.data.validate import DataError

__all__ = ["TABLE_KINDS", "DataError", "LoadResult", "LoadSummary", "load"]
