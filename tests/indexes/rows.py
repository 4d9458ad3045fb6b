"""Rows the sink and search tests write: the output schema, awkward shard ids, random unit vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedder.chunking import content_hash
from embedder.records import Chunk
from embedder.schema import chunks_to_table, output_schema

DIM = 8
PROVENANCE = {"model": "test/model-a", "weights_sha256": "0" * 64, "normalize": True, "max_seq_length": 128}
SCHEMA = output_schema(dim=DIM, metadata_fields=["url"], provenance=PROVENANCE)
# Shard ids as connectors make them: slashes, '#', '@' and a quote that must survive SQL quoting.
SHARD_A = "s3://corpus/it's/a.jsonl#0@0-100"
SHARD_B = "s3://corpus/b.jsonl@100-200"


def rows(
    shard_id: str, n: int, seed: int, schema: pa.Schema = SCHEMA, start: int = 0, null_titles: bool = False
) -> pa.Table:
    """Rows ``start..start+n`` of a shard, with random unit vectors (deterministic per seed);
    ``null_titles`` leaves every fifth title empty."""
    rng = np.random.default_rng(seed)
    dim = schema.field("vector").type.list_size
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"chunk {i} of {shard_id}" for i in range(start, start + n)]
    chunks = [
        Chunk(
            doc_id=f"{shard_id}/doc{i // 3}",
            chunk_index=i % 3,
            text=text,
            token_ids=np.zeros(0, np.int32),
            content_hash=content_hash(text),
            shard_id=shard_id,
            title=None if null_titles and i % 5 == 4 else f"Title {i % 4}",
            metadata={"url": f"https://example.org/{seed}/{i}"},
        )
        for i, text in enumerate(texts, start)
    ]
    return chunks_to_table(chunks, vectors, schema)
