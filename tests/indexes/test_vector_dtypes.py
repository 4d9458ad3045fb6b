"""``output.vector_dtype`` as a user meets it: the real Wikipedia sample embedded by real runs with the
bundled model, stored as float16, int8 and binary (int8 also Matryoshka-truncated to 128 dims), on
both sinks; the stored vectors agree with sentence-transformers, questions find their article in
the top 5, ``embedder validate`` passes, and plain LanceDB embeds a text query itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedder import open_index, run
from embedder.cli_ops import validate_output
from embedder.config import OutputConfig, build_job
from embedder.quantize import dequantize, quantize, similarity
from embedder.schema import provenance_of
from indexes.lance import LanceSink, build_indexes, connect_database, plan_vector_index
from indexes.parquet import ParquetSink
from indexes.search import Index, LanceIndex, ParquetIndex

QUESTIONS = [
    ("What does albedo measure?", "Albedo"),
    ("Who was the 16th president of the United States?", "Abraham Lincoln"),
    ("Which Greek hero fought in the Trojan War?", "Achilles"),
    ("What is the capital city of Algeria?", "Algeria"),
    ("turning lead into gold", "Alchemy"),
]

RUNS = {  # name: (sink, vector_dtype, truncate_dim)
    "float16": ("lance", "float16", None),
    "binary": ("lance", "binary", None),
    "int8-128": ("parquet", "int8", 128),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, wiki_sample) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for name, (sink, dtype, truncate_dim) in RUNS.items():
        out[name] = str(root / name)
        result = run(build_job({
            "source": {"uri": str(wiki_sample), "format": "wikipedia", "metadata_fields": ["url"]},
            "output": {"uri": out[name], "sink": sink, "vector_dtype": dtype},
            "model": {"name": "all-MiniLM-L6-v2", "device": "cpu", "truncate_dim": truncate_dim},
            "chunking": {"max_tokens": 128, "max_document_chars": 1500},
            "runner": {"workers": 1, "show_progress": False},
            "validation": {"canary_samples": 4},
        }))
        assert result.state == "done" and result.documents == 106, name
        assert result.canary["min_cosine"] >= 0.9999  # truncated canaries compared with a truncated reference
    return out


def _copy(index: Index, sink_class: type, uri: str) -> Index:
    """The output's rows, as stored, written through the other sink (no re-embedding)."""
    table = _table(index)
    config = OutputConfig(uri=uri, vector_dtype=index.vector_dtype)
    sink = sink_class(config, index.schema)
    sink.open()
    for shard_id in sorted(set(table.column("shard_id").to_pylist())):
        writer = sink.begin(shard_id)
        mask = table.column("shard_id").to_numpy(zero_copy_only=False) == shard_id
        writer.write(table.filter(mask).select(sink.schema.names).cast(sink.schema))
        writer.commit()
    sink.finish()
    return open_index(uri)


@pytest.fixture(scope="module")
def indexes(outputs, tmp_path_factory) -> dict[tuple[str, str], Index]:
    """Each run's output, and its rows copied into the other sink."""
    root = tmp_path_factory.mktemp("copies")
    found: dict[tuple[str, str], Index] = {}
    for name, (sink, _, _) in RUNS.items():
        index = open_index(outputs[name])
        found[(name, sink)] = index
        other = "parquet" if sink == "lance" else "lance"
        target = str(root / f"{name}-{other}")
        found[(name, other)] = _copy(index, ParquetSink if other == "parquet" else LanceSink, target)
    return found


def _table(index: Index) -> pa.Table:
    if isinstance(index, LanceIndex):
        return index.table.to_arrow()
    from indexes.parquet import open_dataset

    assert isinstance(index, ParquetIndex)
    return open_dataset(index.fs, index.root).to_table()


def _stored(index: Index) -> tuple[list[str], list[str], np.ndarray]:
    table = _table(index)
    column = table.column("vector").combine_chunks()
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return table.column("id").to_pylist(), table.column("text").to_pylist(), matrix


def test_each_dtype_is_stored_as_its_arrow_type(indexes) -> None:
    expected = {
        "float16": pa.list_(pa.float16(), 384), "binary": pa.list_(pa.uint8(), 48), "int8-128": pa.list_(pa.int8(), 128),
    }
    for (name, _sink), index in indexes.items():
        assert index.schema.field("vector").type == expected[name], (name, _sink)
        provenance = provenance_of(index.schema)
        assert provenance["vector_dtype"] == RUNS[name][1] and provenance.get("truncate_dim") == RUNS[name][2]
        assert index.dim == provenance["dim"] == (RUNS[name][2] or 384)
    assert provenance_of(indexes[("int8-128", "parquet")].schema)["quantization"] == {
        "int8": {"scale": 127.0, "range": [-1.0, 1.0]}
    }


def test_stored_vectors_agree_with_sentence_transformers(indexes, minilm, minilm_path: str) -> None:
    """float16 within cos 0.999 of float32 (measured: > 0.99999); int8 cos > 0.99; binary: the sign
    bits of the reference; truncate_dim=128 is SentenceTransformer(truncate_dim=128) then normalized."""
    from sentence_transformers import SentenceTransformer

    for name in RUNS:
        ids, texts, stored = _stored(indexes[(name, RUNS[name][0])])
        picks = np.random.default_rng(0).choice(len(ids), size=48, replace=False)
        sample = [texts[i] for i in picks]
        if RUNS[name][2]:
            truncated = SentenceTransformer(minilm_path, device="cpu", truncate_dim=128)
            reference = truncated.encode(sample, normalize_embeddings=True)
        else:
            reference = minilm.encode(sample, normalize_embeddings=True)
        rows = stored[picks]
        if name == "binary":  # ubinary: sign bits packed big-endian; only near-zero components may differ
            assert np.mean(rows == quantize(reference, "binary")) > 0.95
            assert np.mean(np.unpackbits(rows, axis=1) == (reference > 0)) > 0.999
            continue
        vectors = dequantize(rows, RUNS[name][1], reference.shape[1])
        cos = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1)
        assert cos.min() >= (0.999 if name == "float16" else 0.99), (name, cos.min())


@pytest.mark.parametrize("sink", ["lance", "parquet"])
@pytest.mark.parametrize("name", list(RUNS))
def test_questions_find_their_article_in_the_top_5(indexes, name: str, sink: str) -> None:
    index = indexes[(name, sink)]
    for question, title in QUESTIONS:
        hits = index.search(question, k=5)
        assert title in [h.title for h in hits], (name, sink, question, [(h.title, round(h.score, 3)) for h in hits])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        if name == "binary":
            assert all(0.0 <= h.score <= 1.0 for h in hits)  # 1 - hamming / dim


def test_both_sinks_rank_alike(indexes) -> None:
    for name in RUNS:
        lance, parquet = indexes[(name, "lance")], indexes[(name, "parquet")]
        for question, _ in QUESTIONS:
            a = [(h.id, round(h.score, 4)) for h in lance.search(question, k=3)]
            b = [(h.id, round(h.score, 4)) for h in parquet.search(question, k=3)]
            assert [i for i, _ in a] == [i for i, _ in b] or [s for _, s in a] == [s for _, s in b], (name, a, b)


def test_validate_checks_every_dtype(outputs) -> None:
    for name, uri in outputs.items():
        report = validate_output(uri, samples=16)
        assert report["ok"], (name, report)
        assert report["vector_dtype"] == RUNS[name][1] and report["samples"] == 16
        assert report["min_cosine"] >= report["threshold"]


def test_validate_fails_a_corrupted_binary_output(outputs, tmp_path) -> None:
    """Flipped bits are caught: the bound is on equal sign bits, not a cosine no binary vector reaches."""
    index = open_index(outputs["binary"])
    schema = index.schema
    table = index.table.to_arrow()
    column = table.column("vector").combine_chunks()
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), 48)
    flipped = pa.FixedSizeListArray.from_arrays(pa.array((matrix ^ 0x55).reshape(-1), pa.uint8()), 48)
    bad = table.set_column(table.schema.get_field_index("vector"), "vector", flipped)
    sink = ParquetSink(OutputConfig(uri=str(tmp_path / "bad"), vector_dtype="binary"), schema)
    sink.open()
    writer = sink.begin("all")
    bad = bad.set_column(bad.schema.get_field_index("shard_id"), "shard_id", pa.array(["all"] * bad.num_rows))
    writer.write(bad.select(sink.schema.names).cast(sink.schema))
    writer.commit()
    report = validate_output(str(tmp_path / "bad"), samples=8)
    assert not report["ok"] and report["min_cosine"] < 0.9


def test_lancedb_native_text_search_embeds_the_query(outputs) -> None:
    """``lancedb.connect(out).open_table("chunks").search("text")`` runs a vector search with the job's
    model and query prompt (not BM25): float16 by L2/cosine, binary by Hamming on packed bits."""
    import lancedb

    import embedder  # noqa: F401 - registers the "embedder" embedding function

    for name in ("float16", "binary"):
        table = lancedb.connect(outputs[name]).open_table("chunks")
        function = table.embedding_functions["vector"].function
        assert function.model == "all-MiniLM-L6-v2" and function.vector_dtype == name
        for question, title in QUESTIONS[:3]:
            rows = table.search(question).limit(5).to_arrow()
            assert "_distance" in rows.column_names  # a vector search; BM25 would give _score
            assert title in rows.column("title").to_pylist(), (name, question, rows.column("title").to_pylist())
            ours = open_index(outputs[name]).search(question, k=5)
            assert rows.column("id").to_pylist()[0] == ours[0].id


def test_an_int8_lance_table_explains_lancedb_native_search(indexes) -> None:
    import lancedb

    import embedder  # noqa: F401

    index = indexes[("int8-128", "lance")]
    table = lancedb.connect(index.uri).open_table("chunks")
    with pytest.raises(ValueError, match="no vector column"):  # LanceDB takes int8 lists for no vector column
        table.search("albedo").limit(3).to_arrow()
    with pytest.raises(ValueError, match="int8 vectors, which Lance cannot search.*embedder search"):
        table.search("albedo", vector_column_name="vector").limit(3).to_arrow()


def test_vector_index_per_dtype(tmp_path) -> None:
    """binary gets an IVF_FLAT Hamming index; int8 gets none (Lance indexes float and bit vectors only)."""
    assert plan_vector_index(200_000, 384, vector_dtype="binary").kind == "IVF_FLAT"
    assert plan_vector_index(200_000, 384, vector_dtype="int8") is None
    assert plan_vector_index(200_000, 384, vector_dtype="float16").kind == "IVF_HNSW_SQ"
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    packed = quantize(vectors, "binary")
    from embedder.schema import output_schema, with_vector_dtype

    schema = with_vector_dtype(output_schema(64, provenance={"model": "m", "dim": 64, "normalize": True}), "binary")
    rows = pa.table({
        "id": [f"d{i}#0" for i in range(2000)], "doc_id": [f"d{i}" for i in range(2000)],
        "chunk_index": pa.array([0] * 2000, pa.int32()), "text": ["t"] * 2000, "title": [None] * 2000,
        "content_hash": ["h"] * 2000, "shard_id": ["s"] * 2000,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1), pa.uint8()), 8),
    }, schema=schema)
    db = connect_database(str(tmp_path / "db"))
    table = db.create_table("chunks", rows)
    done = build_indexes(table, text=False, min_rows=1000)
    assert done["vector"].startswith("built IVF_FLAT"), done
    index = LanceIndex(db.open_table("chunks"), str(tmp_path / "db"), embed_query=lambda q: vectors[7])
    assert index.vector_plan is not None and index.vector_plan.kind == "IVF_FLAT"
    hits = index.search_vector(vectors[7], k=3)
    assert hits[0].id == "d7#0" and hits[0].score == 1.0
    exact = similarity(packed, packed[7], "binary", 64)
    assert hits[1].score == pytest.approx(np.sort(exact)[-2])


@pytest.mark.parametrize("dtype,max_bytes_per_value", [("int8", 1.0), ("binary", 1.05), ("float16", 2.05)])
def test_parquet_stores_small_vectors_in_about_their_own_size(tmp_path, dtype: str, max_bytes_per_value: float) -> None:
    """Parquet has no 8-bit type: int8 and packed bits would take an INT32 (4 bytes) each without the
    sink's dictionary encoding of the vector values."""
    from embedder.records import Chunk
    from embedder.schema import chunks_to_table, output_schema

    rows, dim = 4000, 256
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(doc_id=f"d{i}", chunk_index=0, text="t", token_ids=np.zeros(0, np.int32), content_hash="h",
                    shard_id="s") for i in range(rows)]
    sink = ParquetSink(OutputConfig(uri=str(tmp_path / "p"), vector_dtype=dtype),
                       output_schema(dim, [], {"model": "m", "dim": dim, "normalize": True}))
    sink.open()
    writer = sink.begin("s")
    writer.write(chunks_to_table(chunks, vectors, sink.schema))
    writer.commit()
    (part,) = (tmp_path / "p").glob("part-*.parquet")
    stored_values = rows * sink.schema.field("vector").type.list_size
    assert part.stat().st_size < max_bytes_per_value * stored_values + 60_000, part.stat().st_size
    back = sink.read(columns=["id", "vector"])
    assert back.column("vector").type.value_type == sink.schema.field("vector").type.value_type
