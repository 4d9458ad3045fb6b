"""Search as a user meets it: the real Wikipedia sample embedded with the bundled model, then natural
questions, filters, full-text and hybrid search."""

from __future__ import annotations

import pytest

from embedder import open_index, run
from embedder.config import OutputConfig, build_job
from indexes.lance import TEXT_INDEX_NAME, connect_database
from indexes.parquet import ParquetSink
from indexes.search import LanceIndex, ParquetIndex, SearchError

# Natural questions about articles of the sample, answerable from each article's first 1500 characters.
QUESTIONS = [
    ("What does albedo measure?", "Albedo"),
    ("Who was the 16th president of the United States?", "Abraham Lincoln"),
    ("Which Greek hero fought in the Trojan War?", "Achilles"),
    ("What is the capital city of Algeria?", "Algeria"),
    ("turning lead into gold", "Alchemy"),
    ("cold-blooded animals that start life as larvae in water", "Amphibian"),
]


@pytest.fixture(scope="module")
def wiki_output(tmp_path_factory, wiki_sample) -> str:
    """The Wikipedia sample (articles cut to 1500 characters, to keep CPU embedding to seconds),
    embedded into LanceDB by a real run with the bundled model."""
    out = str(tmp_path_factory.mktemp("search") / "db")
    result = run(build_job({
        "source": {"uri": str(wiki_sample), "format": "wikipedia", "metadata_fields": ["url"]},
        "output": {"uri": out, "sink": "lance"},
        "model": {"name": "all-MiniLM-L6-v2", "device": "cpu"},
        "chunking": {"max_tokens": 128, "max_document_chars": 1500},
        "runner": {"workers": 1, "show_progress": False},
        "validation": {"canary_samples": 4},
    }))
    assert result.state == "done" and result.documents == 106
    return out


@pytest.fixture(scope="module")
def index(wiki_output) -> LanceIndex:
    return open_index(wiki_output)


@pytest.mark.parametrize("question,title", QUESTIONS)
def test_natural_questions_find_their_article(index: LanceIndex, question: str, title: str) -> None:
    hits = index.search(question, k=3)
    assert hits[0].title == title, [(h.title, round(h.score, 3)) for h in hits]
    assert hits[0].metadata["url"].endswith("/" + title.replace(" ", "_"))


def test_the_run_built_a_full_text_index_but_no_vector_index_for_a_small_table(index: LanceIndex) -> None:
    names = {i.name: i.index_type for i in index.table.list_indices()}
    assert names == {TEXT_INDEX_NAME: "FTS"}, names  # ~1k rows: exact vector search, no ANN index
    assert index.vector_plan is None and index.has_text_index


def test_filters_restrict_every_mode(index: LanceIndex) -> None:
    for mode in ("vector", "fts", "hybrid"):
        hits = index.search("What does albedo measure?", k=5, filter="title != 'Albedo'", mode=mode)
        assert hits and all(h.title != "Albedo" for h in hits), mode
        only = index.search("reflection of sunlight", k=5, filter="title = 'Alabama'", mode=mode)
        assert all(h.title == "Alabama" for h in only), mode
    assert index.search("Trojan War hero", k=5, filter="title IN ('Aristotle', 'Apollo')")[0].title in ("Aristotle", "Apollo")


def test_full_text_finds_rare_names_and_hybrid_keeps_the_best_of_both(index: LanceIndex) -> None:
    # A rare proper name: BM25 pins it, whatever the embedding makes of it.
    fts = index.search("Myrmidons", k=3, mode="fts")
    assert fts[0].title == "Achilles" and "Myrmidons" in fts[0].text
    assert [h.score for h in fts] == sorted((h.score for h in fts), reverse=True)
    # Hybrid ranks a chunk first when both searches rank it high.
    hybrid = index.search("king of the Myrmidons", k=5, mode="hybrid")
    assert hybrid[0].title == "Achilles"
    assert all(0 < h.score <= 2 / 61 for h in hybrid)  # reciprocal-rank fusion of two lists, k0=60
    for question, title in QUESTIONS[:4]:
        assert index.search(question, k=3, mode="hybrid")[0].title == title, question
    # Only stop words: nothing to match.
    assert index.search("what is the", k=3, mode="fts") == []


def test_unknown_mode_names_the_valid_ones(index: LanceIndex) -> None:
    with pytest.raises(SearchError, match="Invalid search mode 'bm25'. Valid: vector, hybrid, fts"):
        index.search("albedo", mode="bm25")  # type: ignore[arg-type]


def test_parquet_output_answers_text_and_hybrid_queries_like_lance(index: LanceIndex, wiki_output, tmp_path) -> None:
    """The same rows in a Parquet output (copied, not re-embedded): BM25 scan and hybrid agree on the top hit."""
    table = index.table.to_arrow()
    schema = index.schema
    sink = ParquetSink(OutputConfig(uri=str(tmp_path / "parquet")), schema)
    sink.open()
    for shard_id in sorted(set(table.column("shard_id").to_pylist())):
        writer = sink.begin(shard_id)
        writer.write(table.filter(table.column("shard_id").to_numpy(zero_copy_only=False) == shard_id).select(schema.names))
        writer.commit()
    parquet = open_index(str(tmp_path / "parquet"))
    assert isinstance(parquet, ParquetIndex) and parquet.count_rows() == index.count_rows()
    for query in ("Myrmidons", "reflectivity of a surface", "Abraham Lincoln assassination"):
        assert parquet.search(query, k=1, mode="fts")[0].title == index.search(query, k=1, mode="fts")[0].title, query
    assert parquet.search("king of the Myrmidons", k=3, mode="hybrid")[0].title == "Achilles"
    assert all(h.title != "Achilles" for h in parquet.search("Myrmidons", k=3, mode="fts", filter="title != 'Achilles'"))


def test_lance_without_a_text_index_falls_back_to_a_bm25_scan(index: LanceIndex, wiki_output) -> None:
    table = connect_database(wiki_output).open_table("chunks")
    plain = LanceIndex(table, wiki_output, embed_query=index._embed_query)
    plain.has_text_index = False  # as for an output written before full-text indexes
    assert plain.search("Myrmidons", k=1, mode="fts")[0].title == "Achilles"
    assert plain.search("Myrmidons", k=3, mode="fts", filter="title = 'Apollo'") == []
