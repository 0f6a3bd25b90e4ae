"""Declared, versioned Arrow schemas for every dataset that moves between stages.

Each schema carries its kind and version in its metadata (actors.samples.arrow_schema), so a Parquet file says what
it holds. Token ids are list<int32>.
"""

from __future__ import annotations

import pyarrow as pa

# The samples' schema is the actors' output contract: it lives with them (actors.samples).
from actors.samples import SAMPLES, SCHEMA_VERSION  # noqa: F401  (re-exported)
from actors.samples import arrow_schema as _schema


# The paper's preference scale, best first (Table 8 column order). "unsure" shares the last margin bucket.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better", "unsure")
# Risk categories and attack vectors of the paper's safety section; "helpful" and "borderline" complete the set.
RISK_CATEGORIES = ("illicit_criminal", "hateful_harmful", "unqualified_advice")
ATTACK_VECTORS = ("direct", "authority", "false_premise", "misspelling", "metaphor", "role_play", "other_language")
PROMPT_CATEGORIES = ("helpful", "borderline", "dialogue", *RISK_CATEGORIES)
PREFERENCE_KINDS = ("helpfulness", "safety")
ROLES = ("system", "user", "assistant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)


PROMPTS = _schema("prompts", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("messages", MESSAGES, nullable=False),  # ends with a user turn
    pa.field("category", pa.string(), nullable=False),  # one of PROMPT_CATEGORIES
    pa.field("attack_vector", pa.string()),  # one of ATTACK_VECTORS for safety prompts, else null
    pa.field("is_safety", pa.bool_(), nullable=False),
    pa.field("meta", pa.string()),  # JSON: task answers for the oracle, GAtt instruction, ...
])

DEMONSTRATIONS = _schema("demonstrations", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("messages", MESSAGES, nullable=False),  # ends with an assistant turn
    pa.field("category", pa.string()),
    pa.field("source", pa.string()),
    pa.field("meta", pa.string()),
])

PREFERENCES = _schema("preferences", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("batch", pa.int32(), nullable=False),  # the "week" the comparison arrived in, from 1
    pa.field("prompt", MESSAGES, nullable=False),  # the dialogue so far, ending with a user turn
    pa.field("chosen", pa.string(), nullable=False),  # the preferred assistant answer
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("rating", pa.string(), nullable=False),  # one of RATINGS
    pa.field("margin", pa.float32()),  # an explicit margin from the input file; null: derived from rating
    pa.field("chosen_safe", pa.bool_()),  # null when the source has no safety label
    pa.field("rejected_safe", pa.bool_()),
    pa.field("kind", pa.string(), nullable=False),  # one of PREFERENCE_KINDS
    pa.field("source", pa.string()),
    pa.field("meta", pa.string()),
])

CORPUS = _schema("corpus", [  # pretraining documents; `text` is what is trained on
    pa.field("text", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # encyclopedia | qa | dialogue
    pa.field("category", pa.string()),
    pa.field("quality", pa.string()),
])

REJECTS = _schema("rejects", [
    pa.field("source", pa.string(), nullable=False),  # the input file
    pa.field("row", pa.int64(), nullable=False),  # 0-based row (line for JSONL, record for JSON) in that file
    pa.field("field", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string()),  # the row as JSON, so nothing is lost
])

INSTRUCTIONS = _schema("instructions", [  # Ghost Attention's instructions from a user's file
    pa.field("id", pa.string(), nullable=False),  # a hash of the text
    pa.field("text", pa.string(), nullable=False),
    pa.field("short", pa.string()),  # a shortened form ("Figure: Napoleon."), if the file gives one
])

SCHEMAS = {s.metadata[b"kind"].decode(): s
           for s in (PROMPTS, DEMONSTRATIONS, PREFERENCES, SAMPLES, CORPUS, REJECTS, INSTRUCTIONS)}


def schema_of(table: pa.Table) -> str | None:
    """The dataset kind a table's schema metadata declares, if any."""
    meta = table.schema.metadata or {}
    kind = meta.get(b"kind")
    return kind.decode() if kind else None
