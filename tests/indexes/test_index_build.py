"""Indexes built at the end of a LanceDB run: the vector index chosen by size, the full-text index,
and searches through them that still find what exact search finds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedder.chunking import content_hash
from embedder.config import OutputConfig
from embedder.records import Chunk
from embedder.schema import chunks_to_table, output_schema
from indexes.lance import (
    INDEX_MIN_ROWS,
    PQ_MIN_ROWS,
    TEXT_INDEX_NAME,
    VECTOR_INDEX_NAME,
    LanceSink,
    plan_vector_index,
    pq_sub_vectors,
)
from indexes.search import LanceIndex, open_index

DIM = 32
SCHEMA = output_schema(dim=DIM, metadata_fields=[], provenance={"model": "test/clustered", "normalize": True})
WORDS = ["river", "mountain", "violin", "comet", "harbor", "glacier", "lantern", "orchard"]


def clustered_rows(shard_id: str, n: int, seed: int, start: int = 0) -> tuple[pa.Table, np.ndarray]:
    """``n`` unit vectors around 40 cluster centres (embeddings cluster by topic), with texts."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(40, DIM))
    vectors = centres[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    chunks = []
    for i in range(start, start + n):
        text = f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} note {i}"
        chunks.append(Chunk(doc_id=f"d{i}", chunk_index=0, text=text, token_ids=np.zeros(0, np.int32),
                            content_hash=content_hash(text), shard_id=shard_id, title=f"T{i % 5}"))
    return chunks_to_table(chunks, vectors, SCHEMA), vectors


def write_shards(
    uri: str, shards: int, rows_per_shard: int, start_seed: int = 0, first_row: int = 0, **sink_options
) -> tuple[LanceSink, np.ndarray]:
    """Writes ``shards`` shards through the sink's commit protocol, then ``finish`` (as a run ends)."""
    sink = LanceSink(OutputConfig(uri=uri), SCHEMA, **sink_options)
    sink.open()
    all_vectors = []
    for s in range(shards):
        table, vectors = clustered_rows(f"shard-{start_seed + s}", rows_per_shard, start_seed + s,
                                        start=first_row + s * rows_per_shard)
        writer = sink.begin(f"shard-{start_seed + s}")
        writer.write(table)
        writer.commit()
        all_vectors.append(vectors)
    sink.finish()
    return sink, np.concatenate(all_vectors)


def no_model(query: str) -> np.ndarray:
    raise AssertionError("these tests search by vector or text")


def recall_at_10(index: LanceIndex, table: pa.Table, vectors: np.ndarray, queries: int = 25) -> float:
    """Share of the exact top-10 (numpy brute force) that the index returns, over perturbed stored vectors."""
    rng = np.random.default_rng(5)
    ids = np.array(table.column("id").to_pylist())
    stored = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    found = 0
    for row in rng.choice(len(ids), queries, replace=False):
        query = stored[row] + 0.05 * rng.normal(size=DIM).astype(np.float32)
        exact = set(ids[np.argsort(-(stored @ (query / np.linalg.norm(query))))[:10]])
        found += len(exact & {h.id for h in index.search_vector(query, k=10)})
    return found / (10 * queries)


def test_plan_is_none_for_small_tables_then_hnsw_then_pq() -> None:
    assert plan_vector_index(INDEX_MIN_ROWS - 1, 1024) is None
    hnsw = plan_vector_index(INDEX_MIN_ROWS, 1024)
    assert hnsw.kind == "IVF_HNSW_SQ" and hnsw.num_partitions == 1 and hnsw.nprobes == 1
    mid = plan_vector_index(PQ_MIN_ROWS - 1, 1024)
    assert mid.kind == "IVF_HNSW_SQ" and mid.nprobes == mid.num_partitions == 10  # every partition probed
    wiki = plan_vector_index(35_000_000, 1024)  # English Wikipedia at 512-token chunks
    assert wiki.kind == "IVF_PQ" and wiki.num_partitions == round(35_000_000**0.5)
    assert wiki.num_sub_vectors == 128 and 1024 % wiki.num_sub_vectors == 0
    assert 20 <= wiki.nprobes < wiki.num_partitions and wiki.refine_factor >= 5


@pytest.mark.parametrize("dim", [384, 768, 1024, 1536, 100, 90, 12, 7])
def test_pq_sub_vectors_divide_the_dimension(dim: int) -> None:
    subs = pq_sub_vectors(dim)
    assert dim % subs == 0
    assert dim // subs >= 8 or subs == 1  # at least 8 dimensions per sub-vector when possible


def test_thresholds_follow_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDER_INDEX_MIN_ROWS", "500")
    monkeypatch.setenv("EMBEDDER_PQ_MIN_ROWS", "1000")
    assert plan_vector_index(499, 64) is None
    assert plan_vector_index(500, 64).kind == "IVF_HNSW_SQ"
    assert plan_vector_index(1000, 64).kind == "IVF_PQ"
    monkeypatch.setenv("EMBEDDER_INDEX_MIN_ROWS", "many")
    with pytest.raises(Exception, match="EMBEDDER_INDEX_MIN_ROWS='many' is not an integer"):
        plan_vector_index(10, 64)


def test_small_table_gets_only_a_text_index(tmp_path) -> None:
    sink, _ = write_shards(str(tmp_path / "db"), shards=2, rows_per_shard=100)
    index = open_index(str(tmp_path / "db"), embed_query=no_model)
    assert {i.name for i in index.table.list_indices()} == {TEXT_INDEX_NAME}
    assert sink.index_report["text"] == "built" and "vector" not in sink.index_report
    hits = index.search("glacier", k=3, mode="fts")
    assert len(hits) == 3 and all("glacier" in h.text.split() for h in hits)


def test_large_enough_run_gets_an_hnsw_index_that_keeps_recall(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDER_INDEX_MIN_ROWS", "2000")  # the size rule, scaled down for a fast test
    sink, vectors = write_shards(str(tmp_path / "db"), shards=3, rows_per_shard=1000)
    index = open_index(str(tmp_path / "db"), embed_query=no_model)
    types = {i.name: i.index_type for i in index.table.list_indices()}
    assert types == {VECTOR_INDEX_NAME: "IvfHnswSq", TEXT_INDEX_NAME: "FTS"}, types
    stats = index.table.index_stats(VECTOR_INDEX_NAME)
    assert stats.num_indexed_rows == 3000 and stats.num_unindexed_rows == 0 and stats.distance_type == "cosine"
    assert index.vector_plan is not None and index.vector_plan.kind == "IVF_HNSW_SQ"
    table = index.table.to_arrow()
    assert recall_at_10(index, table, vectors) >= 0.9
    hits = index.search_vector(vectors[17], k=5, filter="title = 'T2'")
    assert len(hits) == 5 and all(h.title == "T2" for h in hits)


def test_pq_index_for_the_largest_tables_refines_to_good_recall(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDER_INDEX_MIN_ROWS", "1000")
    monkeypatch.setenv("EMBEDDER_PQ_MIN_ROWS", "2000")
    sink, vectors = write_shards(str(tmp_path / "db"), shards=3, rows_per_shard=1000)
    index = open_index(str(tmp_path / "db"), embed_query=no_model)
    assert {i.name: i.index_type for i in index.table.list_indices()}[VECTOR_INDEX_NAME] == "IvfPq"
    assert index.vector_plan.kind == "IVF_PQ" and index.vector_plan.refine_factor
    assert recall_at_10(index, index.table.to_arrow(), vectors) >= 0.8


def test_a_later_run_folds_new_rows_into_the_indexes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDDER_INDEX_MIN_ROWS", "2000")
    uri = str(tmp_path / "db")
    write_shards(uri, shards=2, rows_per_shard=1000)
    sink, _ = write_shards(uri, shards=1, rows_per_shard=500, start_seed=2, first_row=2000)  # a later run
    assert sink.index_report["vector"] == "updated IVF_HNSW_SQ" and sink.index_report["text"] == "updated"
    index = open_index(uri, embed_query=no_model)
    for name in (VECTOR_INDEX_NAME, TEXT_INDEX_NAME):
        stats = index.table.index_stats(name)
        assert stats.num_indexed_rows == 2500 and stats.num_unindexed_rows == 0, name
    # a row of the new shard is found through the index, by vector and by text
    new = index.table.to_lance().to_table(filter="shard_id = 'shard-2'", limit=1)
    vector = np.asarray(new.column("vector")[0].as_py(), dtype=np.float32)
    assert index.search_vector(vector, k=1)[0].id == new.column("id")[0].as_py()
    assert index.search("note 2100", k=1, mode="fts")[0].text.endswith("note 2100")


def test_text_index_can_be_turned_off(tmp_path) -> None:
    sink, _ = write_shards(str(tmp_path / "db"), shards=1, rows_per_shard=50, fts_index=False)
    index = open_index(str(tmp_path / "db"), embed_query=no_model)
    assert index.table.list_indices() == [] and not index.has_text_index
    assert index.search("note 7", k=1, mode="fts")[0].text.endswith("note 7")  # BM25 scan instead
