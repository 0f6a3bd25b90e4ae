"""The row format the generator pool writes and the scorer pool fills: the actors' output contract.

It lives with the actors, so they import nothing from pipeline/; pipeline.data.schemas declares every other
dataset with the same helper and lists this one beside them. Each schema carries its kind and version in its
metadata, so a Parquet file says what it holds; bump the version when a field changes meaning or type.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


def arrow_schema(kind: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"kind": kind.encode(), b"schema_version": str(SCHEMA_VERSION).encode()})


SAMPLES = arrow_schema("samples", [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),  # model name / checkpoint that produced it
    pa.field("temperature", pa.float32(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("is_safety", pa.bool_()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("response", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("logprobs", pa.list_(pa.float32())),  # sampler logprob of each response token
    pa.field("finish_reason", pa.string()),
    pa.field("r_help", pa.float32()),  # sigmoid scores in [0, 1]; null until scored
    pa.field("r_safe", pa.float32()),
    pa.field("r_combined", pa.float32()),
    pa.field("chosen", pa.bool_()),  # kept by rejection sampling
])
