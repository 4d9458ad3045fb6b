"""Bytes on disk of an output at each ``output.vector_dtype``, through the real sinks.

Writes ``--rows`` rows (default 1,000,000) of random unit vectors (384 and 1024 dims: MiniLM- and
BGE-large-sized) with typical text columns into a LanceDB and a Parquet output at each vector
dtype, with the same code a run uses (``embedder.schema.chunks_to_table`` quantizes, the sink
commits shard by shard, ``finish`` compacts), and prints the size of each output folder on disk.

Text columns: ids ``doc<i>#<j>``, a title per 8 chunks, and a chunk text of ~900 characters (about
200 tokens) of words drawn Zipf-like (a = 1.1) from a 20,000-word vocabulary: zstd compresses it
3.5×, about as it does English prose (~3×); the vector, not the text, is what each dtype changes.
Bytes per row do not depend on the row count beyond the first shards, so ``--rows 250000`` times 4
estimates a 1M-row output within a percent. Search indexes are
left out (``vector_index: none``, ``fts_index: false``): their size depends on the index chosen,
not on the stored dtype. It also prints the cosine of the stored vectors (dequantized) to the
float32 ones, and for binary the fraction of equal sign bits.

Usage (any machine, repository root; 1M rows need ~11 GB of free disk at the largest dtype)::

    PYTHONPATH=. python benchmarks/bench_vector_dtypes.py --rows 1000000 --dims 384,1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = ("float32", "float16", "int8", "binary")
SHARD_ROWS = 50_000


def folder_bytes(path: str) -> int:
    """Bytes of every file under ``path`` except embedder's own state (``_embedder/``)."""
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "_embedder"]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def make_chunks(start: int, count: int, words: np.ndarray, rng: np.random.Generator) -> list:
    from embedder.records import Chunk

    chunks = []
    picks = rng.zipf(1.1, size=(count, 150)) % len(words)
    for i in range(count):
        n = start + i
        text = " ".join(words[picks[i]])[:900]
        chunks.append(Chunk(doc_id=f"doc{n // 8}", chunk_index=n % 8, text=text, token_ids=np.zeros(0, np.int32),
                            content_hash=f"{n:016x}", title=f"Title of document {n // 8}", shard_id=f"shard-{start}"))
    return chunks


def write_output(sink_name: str, uri: str, dim: int, dtype: str, rows: int, seed: int) -> tuple[float, float]:
    """Writes the output; returns (seconds, agreement with float32 of a sample: cosine or equal bits)."""
    from embedder.config import OutputConfig
    from embedder.quantize import agreement
    from embedder.schema import chunks_to_table, output_schema
    from indexes.registry import SINKS

    provenance = {"model": "benchmark", "normalize": True, "dim": dim}
    config = OutputConfig(uri=uri, sink=sink_name, vector_dtype=dtype, vector_index="none", fts_index=False)
    sink = SINKS.get(sink_name)(config, output_schema(dim, [], provenance))
    sink.open()
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i:x}" + "abcdefghij"[: 1 + i % 9] for i in range(20_000)])
    started = time.perf_counter()
    worst = 1.0
    for start in range(0, rows, SHARD_ROWS):
        count = min(SHARD_ROWS, rows - start)
        chunks = make_chunks(start, count, words, rng)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = chunks_to_table(chunks, vectors, sink.schema)
        writer = sink.begin(chunks[0].shard_id)
        writer.write(table)
        writer.commit()
        if start == 0:
            column = table.column("vector").combine_chunks()
            stored = column.flatten().to_numpy(zero_copy_only=False).reshape(count, -1)[:2000]
            worst = float(agreement(stored, vectors[:2000], dtype).min())
    sink.finish()
    return time.perf_counter() - started, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", default="384,1024")
    parser.add_argument("--sinks", default="lance,parquet")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder, removed after)")
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="bench-dtypes-")
    print(f"{args.rows:,} rows, shards of {SHARD_ROWS:,}, under {base}", flush=True)
    results = []
    for dim in (int(d) for d in args.dims.split(",")):
        for sink_name in args.sinks.split(","):
            for dtype in args.dtypes.split(","):
                uri = os.path.join(base, f"{sink_name}-{dim}-{dtype}")
                seconds, worst = write_output(sink_name, uri, dim, dtype, args.rows, seed=dim)
                size = folder_bytes(uri)
                results.append((dim, sink_name, dtype, size, seconds, worst))
                print(f"  {sink_name:7s} dim {dim:4d} {dtype:7s}: {size / 1e9:7.3f} GB, "
                      f"{size / args.rows:7.1f} B/row, {seconds:6.1f} s, min agreement {worst:.5f}", flush=True)
                shutil.rmtree(uri, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print("| dim | sink | vector_dtype | vector bytes/row | on disk | bytes/row | vs float32 | min cos to float32 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for dim, sink_name, dtype, size, _seconds, worst in results:
        base_size = next(s for d, k, t, s, _, _ in results if d == dim and k == sink_name and t == "float32") or size
        vector_bytes = {"float32": 4 * dim, "float16": 2 * dim, "int8": dim, "binary": -(-dim // 8)}[dtype]
        measure = f"{worst:.4f}" + (" (equal bits)" if dtype == "binary" else "")
        print(f"| {dim} | {sink_name} | {dtype} | {vector_bytes:,} | {size / 1e9:.2f} GB | {size / args.rows:,.0f} | "
              f"{size / base_size:.2f}× | {measure} |")


if __name__ == "__main__":
    main()
