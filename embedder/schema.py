"""The output table: columns of ARCHITECTURE.md plus passthrough metadata, provenance in the schema.

Both sinks write exactly this schema, so the same job gives the same table in LanceDB and Parquet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.records import Chunk

PROVENANCE_KEY = b"embedder"
BASE_COLUMNS = ("id", "doc_id", "chunk_index", "text", "title", "content_hash", "shard_id", "vector")


def output_schema(dim: int, metadata_fields: Sequence[str] = (), provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The output schema for vectors of ``dim`` dimensions.

    The vector column's type follows ``provenance["vector_dtype"]`` (float32 when absent; see
    ``embedder.quantize``): ``float16``, ``int8``, or ``dim / 8`` bytes of packed bits for ``binary``.
    Passthrough metadata columns are stored as strings (JSON for non-string values), so a column's
    type never depends on which shard was written first.
    """
    from embedder.quantize import stored_width, value_type

    dtype = (provenance or {}).get("vector_dtype") or "float32"
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(value_type(dtype), stored_width(dim, dtype))),
    ]
    for name in metadata_fields:
        if name in BASE_COLUMNS:
            raise ValueError(f"metadata field {name!r} clashes with an output column; rename it")
        fields.append(pa.field(name, pa.string()))
    meta = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def with_vector_dtype(schema: pa.Schema, vector_dtype: str) -> pa.Schema:
    """``schema`` storing its vectors as ``vector_dtype``: the vector column's type, and the provenance's
    ``vector_dtype`` and ``quantization`` (the parameters queries and resumed runs must reuse).

    Raises:
        ConfigError: ``int8`` for a model that does not normalize its vectors (its fixed range
            [-1, 1] holds only unit vectors).
    """
    from embedder.config import ConfigError
    from embedder.quantize import quantization_params

    provenance = provenance_of(schema)
    if vector_dtype == "int8" and provenance.get("normalize") is False:
        raise ConfigError(
            f"output.vector_dtype int8 stores unit vectors in [-1, 1], but {provenance.get('model')!r} does not "
            "normalize its vectors; use output.vector_dtype float16 or binary"
        )
    # float32 is recorded by its absence (``FINGERPRINT_DEFAULTS``), so float32 outputs keep the
    # provenance they had before the option existed.
    for key in ("vector_dtype", "quantization"):
        provenance.pop(key, None)
    if vector_dtype != "float32":
        provenance["vector_dtype"] = vector_dtype
    if quantization_params(vector_dtype) is not None:
        provenance["quantization"] = quantization_params(vector_dtype)
    dim = int(provenance.get("dim") or schema.field("vector").type.list_size)
    metadata_fields = [f.name for f in schema if f.name not in BASE_COLUMNS]
    rebuilt = output_schema(dim, metadata_fields, provenance)
    extra = {k: v for k, v in (schema.metadata or {}).items() if k != PROVENANCE_KEY}
    return rebuilt.with_metadata({**extra, **rebuilt.metadata})


def vector_dtype_of(schema: pa.Schema) -> str:
    """How a schema stores its vectors (``float32`` for outputs written before the option existed)."""
    return str(provenance_of(schema).get("vector_dtype") or "float32")


def vector_dim_of(schema: pa.Schema) -> int:
    """The vectors' dimension (``dim`` of the provenance; for binary not the stored byte count)."""
    dim = provenance_of(schema).get("dim")
    if dim:
        return int(dim)
    width = schema.field("vector").type.list_size
    return 8 * width if vector_dtype_of(schema) == "binary" else width


def provenance_of(schema: pa.Schema) -> dict[str, Any]:
    """The provenance dict stored in a schema (empty when absent)."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


FINGERPRINT_KEYS = (
    "model",
    "weights_sha256",
    "pooling",
    "normalize",
    "document_prompt",
    "query_prompt",
    "max_seq_length",
    "dim",
    "truncate_dim",
    "vector_dtype",
    "chunking.max_tokens",
    "chunking.overlap_tokens",
    "chunking.context",
    "chunking.max_document_chars",
)
"""Provenance that decides a stored vector (or how the index is queried): rows of two jobs that differ
in any of these must never share an output. ``truncate_dim`` and ``vector_dtype`` (absent: the
model's full width in float32) are the output options.

The compute ``dtype`` is deliberately not here: fp32, fp16 and bf16 vectors of one model are all
within the fidelity bound of each other (cos >= 0.999 to fp32, ARCHITECTURE.md invariant 3), so a
job resumed on a GPU after a CPU start adds rows of the same index, like another kernel would. The
schema keeps the first pass's dtype and every run record its own."""

FINGERPRINT_DEFAULTS: dict[str, Any] = {"truncate_dim": None, "vector_dtype": "float32"}


def vector_fingerprint(provenance: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint keys of a provenance dict, flattened (``chunking.max_tokens``...)."""
    chunking = provenance.get("chunking") or {}
    out: dict[str, Any] = {}
    for key in FINGERPRINT_KEYS:
        if key.startswith("chunking."):
            value = chunking.get(key.removeprefix("chunking."))
        else:
            value = provenance.get(key, FINGERPRINT_DEFAULTS.get(key))
        out[key] = FINGERPRINT_DEFAULTS.get(key) if value is None and key in FINGERPRINT_DEFAULTS else value
    return out


def fingerprint_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, wanted value)`` for each fingerprint key two provenance dicts disagree on.

    A key the stored provenance lacks (an output written before the key existed) is not a difference
    unless this job sets it to something other than its default."""
    old, new = vector_fingerprint(stored), vector_fingerprint(wanted)
    chunking = stored.get("chunking") or {}
    differences = []
    for key in FINGERPRINT_KEYS:
        present = key.removeprefix("chunking.") in chunking if key.startswith("chunking.") else key in stored
        if not present and key not in FINGERPRINT_DEFAULTS:
            continue
        if old[key] != new[key]:
            differences.append((key, old[key], new[key]))
    return differences


def _metadata_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def chunks_to_table(chunks: Sequence[Chunk], vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Builds output rows for chunks and their vectors (``[n, dim]`` float32, same order), stored in
    the schema's vector dtype with the quantization its provenance records."""
    from embedder.quantize import quantize

    n = len(chunks)
    provenance = provenance_of(schema)
    dtype = str(provenance.get("vector_dtype") or "float32")
    vector_type = schema.field("vector").type
    width = vector_type.list_size
    if dtype == "float32":
        stored = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, width)
    else:
        dim = int(provenance.get("dim") or width)
        raw = np.asarray(vectors, dtype=np.float32).reshape(n, dim)
        stored = np.ascontiguousarray(quantize(raw, dtype, provenance.get("quantization")))
    columns: dict[str, pa.Array] = {
        "id": pa.array([c.id for c in chunks], pa.string()),
        "doc_id": pa.array([c.doc_id for c in chunks], pa.string()),
        "chunk_index": pa.array([c.chunk_index for c in chunks], pa.int32()),
        "text": pa.array([c.text for c in chunks], pa.string()),
        "title": pa.array([c.title for c in chunks], pa.string()),
        "content_hash": pa.array([c.content_hash for c in chunks], pa.string()),
        "shard_id": pa.array([c.shard_id for c in chunks], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), vector_type.value_type), width),
    }
    for field in schema:
        if field.name not in columns:
            columns[field.name] = pa.array([_metadata_value(c.metadata.get(field.name)) for c in chunks], pa.string())
    return pa.table([columns[f.name] for f in schema], schema=schema)
