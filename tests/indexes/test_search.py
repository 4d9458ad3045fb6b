"""Search over both sinks: nearest rows by cosine, filters, and real text through the reference model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedder.chunking import content_hash
from embedder.config import OutputConfig
from embedder.records import Chunk
from embedder.schema import chunks_to_table, output_schema
from indexes.lance import LanceSink
from indexes.parquet import ParquetSink
from indexes.search import Hit, LanceIndex, ParquetIndex, SearchError, open_index

DIM = 8
PROVENANCE = {"model": "test/model-a", "weights_sha256": "0" * 64, "normalize": True}
SCHEMA = output_schema(dim=DIM, metadata_fields=["url"], provenance=PROVENANCE)
SINK_CLASSES = {"lance": LanceSink, "parquet": ParquetSink}


def make_chunks(shard_id: str, texts: list[str], titles: list[str | None]) -> list[Chunk]:
    return [
        Chunk(
            doc_id=f"doc{i}",
            chunk_index=0,
            text=text,
            token_ids=np.zeros(0, np.int32),
            content_hash=content_hash(text),
            shard_id=shard_id,
            title=title,
            metadata={"url": f"https://example.org/{i}"},
        )
        for i, (text, title) in enumerate(zip(texts, titles))
    ]


def write_output(kind: str, uri: str, shards: dict[str, pa.Table], schema: pa.Schema = SCHEMA) -> None:
    sink = SINK_CLASSES[kind](OutputConfig(uri=uri), schema)
    sink.open()
    for shard_id, table in shards.items():
        writer = sink.begin(shard_id)
        writer.write(table)
        writer.commit()


def random_output(kind: str, uri: str, n: int = 300) -> pa.Table:
    """``n`` rows with random unit vectors over three shards; returns them."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    titles = [None if i % 7 == 0 else f"Title {i % 3}" for i in range(n)]
    chunks = make_chunks("", [f"text {i}" for i in range(n)], titles)
    shards = {}
    for s, part in enumerate(np.array_split(np.arange(n), 3)):
        shard_chunks = [chunks[i] for i in part]
        for chunk in shard_chunks:
            chunk.shard_id = f"shard-{s}"
        shards[f"shard-{s}"] = chunks_to_table(shard_chunks, vectors[part], SCHEMA)
    write_output(kind, uri, shards)
    return pa.concat_tables(shards.values())


def no_model(query: str) -> np.ndarray:
    raise AssertionError("these tests search by vector")


@pytest.mark.parametrize("kind", ["lance", "parquet"])
def test_a_stored_vector_finds_its_own_row_first_with_score_one(kind: str, tmp_path) -> None:
    uri = str(tmp_path / kind)
    table = random_output(kind, uri)
    index = open_index(uri, embed_query=no_model)
    assert isinstance(index, LanceIndex if kind == "lance" else ParquetIndex)
    assert index.dim == DIM and index.provenance == PROVENANCE and index.count_rows() == 300

    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    for row in (0, 123, 299):
        hits = index.search_vector(vectors[row], k=5)
        assert isinstance(hits[0], Hit)
        assert hits[0].id == table["id"][row].as_py()
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata == {"url": table["url"][row].as_py()}
        assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        expected = np.sort(vectors @ vectors[row])[::-1][:5]
        np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["lance", "parquet"])
def test_a_filter_restricts_hits(kind: str, tmp_path) -> None:
    uri = str(tmp_path / kind)
    table = random_output(kind, uri)
    index = open_index(uri, embed_query=no_model)
    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    row = 1  # title "Title 1"
    assert table["title"][row].as_py() == "Title 1"

    hits = index.search_vector(vectors[row], k=10, filter="title = 'Title 2'")
    assert len(hits) == 10 and all(h.title == "Title 2" for h in hits)
    assert table["id"][row].as_py() not in {h.id for h in hits}
    titles = np.array(table["title"].to_pylist(), dtype=object)
    expected = np.sort((vectors @ vectors[row])[titles == "Title 2"])[::-1][:10]
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)

    hits = index.search_vector(vectors[row], k=500, filter="title IS NULL AND url LIKE 'https://%'")
    assert len(hits) == sum(t is None for t in titles) and all(h.title is None for h in hits)


COLUMNS = "id, doc_id, chunk_index, text, title, content_hash, shard_id, vector, url"


@pytest.mark.parametrize("kind", ["lance", "parquet"])
@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_a_filter_on_an_unknown_column_is_refused_listing_columns(kind: str, mode: str, tmp_path) -> None:
    random_output(kind, str(tmp_path / kind), n=30)
    index = open_index(str(tmp_path / kind), embed_query=no_model)  # refused before the query is embedded
    with pytest.raises(SearchError) as err:
        index.search("text", k=3, filter="nosuch = 'x'", mode=mode)
    assert str(err.value) == f"unknown column 'nosuch' in --filter; columns: {COLUMNS}"
    with pytest.raises(SearchError) as err:
        index.search("text", k=3, filter="title = 'Title 1' AND titel = 'x'", mode=mode)
    assert str(err.value) == f"unknown column 'titel' in --filter (did you mean 'title'?); columns: {COLUMNS}"


@pytest.mark.parametrize("kind", ["lance", "parquet"])
@pytest.mark.parametrize("bad", ["title = = 'x'", "title = 'x", "chunk_index = 'abc'"])
def test_a_broken_filter_is_refused_on_one_line(kind: str, bad: str, tmp_path) -> None:
    random_output(kind, str(tmp_path / kind), n=30)
    index = open_index(str(tmp_path / kind), embed_query=no_model)
    with pytest.raises(SearchError) as err:
        index.search("text", k=3, filter=bad, mode="vector")
    message = str(err.value)
    assert "\n" not in message and repr(bad) in message and ".rs:" not in message, message
    # Lance's own message; the Parquet parser's (types: pyarrow's, once the filter binds to the schema).
    expected_start = "invalid --filter" if kind == "lance" or "abc" in bad else "cannot parse filter"
    assert message.startswith(expected_start)


def test_lance_and_parquet_return_the_same_hits(tmp_path) -> None:
    random_output("lance", str(tmp_path / "db"))
    random_output("parquet", str(tmp_path / "parquet"))
    lance_index = open_index(str(tmp_path / "db"), embed_query=no_model)
    parquet_index = open_index(str(tmp_path / "parquet"), embed_query=no_model)
    query = np.random.default_rng(1).normal(size=DIM).astype(np.float32) * 3.0  # not unit length
    for predicate in (None, "title != 'Title 0'"):
        from_lance = lance_index.search_vector(query, k=8, filter=predicate)
        from_parquet = parquet_index.search_vector(query, k=8, filter=predicate)
        assert [h.id for h in from_lance] == [h.id for h in from_parquet]
        np.testing.assert_allclose([h.score for h in from_lance], [h.score for h in from_parquet], atol=1e-5)


SENTENCES = [
    ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", "Eiffel Tower"),
    ("Photosynthesis converts light energy into chemical energy in plants.", "Photosynthesis"),
    ("The Great Barrier Reef is the largest coral reef system in the world.", "Great Barrier Reef"),
    ("Python is a high-level programming language known for readability.", "Python"),
    ("Mount Everest is Earth's highest mountain above sea level.", "Mount Everest"),
    ("Beethoven composed nine symphonies, including the famous Ninth.", "Beethoven"),
]
PARAPHRASES = [
    ("Which plants turn sunlight into food?", "Photosynthesis"),
    ("what is the tallest peak on the planet", "Mount Everest"),
    ("famous iron landmark in the French capital", "Eiffel Tower"),
]


@pytest.mark.parametrize("kind", ["lance", "parquet"])
def test_real_text_finds_the_paraphrased_sentence(kind: str, tmp_path, minilm) -> None:
    texts, titles = [s for s, _ in SENTENCES], [t for _, t in SENTENCES]
    vectors = minilm.encode(texts, normalize_embeddings=True)
    schema = output_schema(dim=vectors.shape[1], metadata_fields=["url"], provenance={"model": "all-MiniLM-L6-v2"})
    chunks = make_chunks("wiki", texts, titles)
    uri = str(tmp_path / kind)
    write_output(kind, uri, {"wiki": chunks_to_table(chunks, vectors, schema)}, schema)

    index = open_index(uri, embed_query=lambda q: minilm.encode(q, normalize_embeddings=True))
    for query, title in PARAPHRASES:
        hits = index.search(query, k=3)
        assert hits[0].title == title, (query, [(h.title, round(h.score, 3)) for h in hits])
        assert hits[0].score > hits[1].score
    filtered = index.search("tallest mountain", k=3, filter="title != 'Mount Everest'")
    assert "Mount Everest" not in {h.title for h in filtered}


def test_open_index_on_s3_for_both_sinks(s3_bucket: str) -> None:
    for kind in ("lance", "parquet"):
        uri = f"{s3_bucket}/{kind}"
        table = random_output(kind, uri, n=30)
        index = open_index(uri, embed_query=no_model)
        assert index.kind == kind and index.count_rows() == 30
        vector = table["vector"][7].values.to_numpy()
        assert index.search_vector(vector, k=1)[0].id == table["id"][7].as_py()


def test_open_index_names_what_it_looked_for(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchError, match="part-\\*.parquet"):
        open_index(str(tmp_path / "empty"))


def test_a_query_of_another_dimension_is_refused(tmp_path) -> None:
    random_output("parquet", str(tmp_path / "parquet"), n=10)
    index = open_index(str(tmp_path / "parquet"), embed_query=lambda q: np.ones(DIM + 1, np.float32))
    with pytest.raises(SearchError, match="9 dims.*8-dim.*test/model-a"):
        index.search("anything")
