"""Chunking: windows fit the limit, end on words, re-tokenize to the same ids, cover the text."""

from __future__ import annotations

import bz2
import time

import numpy as np
import pytest
import tokenizers

from embedder.chunking import Chunker, content_hash
from embedder.records import Document


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_file(f"{minilm_path}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def long_text(wiki_sample) -> str:
    # Real, messy text: the first 300 kB of the Wikipedia sample's XML (markup, entities, unicode).
    with bz2.open(wiki_sample, "rt", encoding="utf-8") as f:
        return f.read(300_000)


def _ids(tok: tokenizers.Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("max_tokens,overlap", [(32, 0), (126, 16), (510, 64)])
def test_windows_fit_retokenize_and_cover(tokenizer, long_text, max_tokens, overlap) -> None:
    doc = Document("doc-1", long_text[:60_000], "Sample")
    chunks = Chunker(tokenizer, max_tokens, overlap_tokens=overlap).chunk([doc], shard_id="s0")
    all_ids = _ids(tokenizer, doc.text)
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert all(c.id == f"doc-1#{c.chunk_index}" for c in chunks)
    assert all(1 <= len(c.token_ids) <= max_tokens for c in chunks)
    mismatched = [c.chunk_index for c in chunks if _ids(tokenizer, c.text) != c.token_ids.tolist()]
    assert mismatched == [], f"chunks whose text re-tokenizes differently: {mismatched}"
    assert all(c.content_hash == content_hash(c.text) and c.shard_id == "s0" for c in chunks)
    if overlap == 0:
        # Without overlap the windows are a partition of the document's tokens.
        assert np.concatenate([c.token_ids for c in chunks]).tolist() == all_ids
    else:
        # With overlap every token is covered, and consecutive windows share a few tokens.
        assert chunks[0].token_ids.tolist() == all_ids[: len(chunks[0].token_ids)]
        assert chunks[-1].token_ids.tolist() == all_ids[-len(chunks[-1].token_ids) :]
        shared = [c.token_ids[:4].tolist() for c in chunks[1:]]
        prev_tails = [p.token_ids.tolist() for p in chunks[:-1]]
        assert sum(any(s == t[i : i + 4] for i in range(len(t) - 3)) for s, t in zip(shared, prev_tails)) >= len(shared) * 0.9


def test_deterministic(tokenizer, long_text) -> None:
    docs = [Document(str(i), long_text[i * 5000 : (i + 1) * 5000]) for i in range(10)]
    a = Chunker(tokenizer, 64, 8).chunk(docs)
    b = Chunker(tokenizer, 64, 8).chunk(docs)
    assert [(c.id, c.text, c.token_ids.tolist()) for c in a] == [(c.id, c.text, c.token_ids.tolist()) for c in b]


def test_section_context_prefix(tokenizer) -> None:
    text = "Intro paragraph about the topic.\nHistory\nIt began long ago in a small town by the sea.\n"
    offset = text.index("History")
    doc = Document("7", text * 1, "Albedo", {"_sections": [[offset, "History"]]})
    chunks = Chunker(tokenizer, 12, context="section").chunk([doc])
    assert chunks[0].text.startswith("Albedo\n")
    assert any(c.text.startswith("Albedo — History\n") for c in chunks)
    assert all(len(c.token_ids) <= 12 for c in chunks)
    for c in chunks:  # the prefix tokens are part of what is embedded
        assert _ids(tokenizer, c.text) == c.token_ids.tolist()


def test_title_context_counts_against_limit(tokenizer) -> None:
    doc = Document("1", "word " * 200, "A rather long title of several words")
    chunks = Chunker(tokenizer, 32, context="title").chunk([doc])
    assert all(c.text.startswith("A rather long title of several words\n") for c in chunks)
    assert all(len(c.token_ids) <= 32 for c in chunks)


def test_huge_document_is_trimmed_fast(tokenizer) -> None:
    huge = "lorem ipsum dolor sit amet " * 2_000_000  # 54 MB
    chunker = Chunker(tokenizer, 256, max_document_chars=100_000)
    t0 = time.perf_counter()
    chunks = chunker.chunk([Document("big", huge)])
    assert time.perf_counter() - t0 < 10
    assert chunker.stats.trimmed_documents == 1
    assert sum(len(c.text) for c in chunks) <= 100_000


def test_rejects_bad_settings(tokenizer) -> None:
    with pytest.raises(ValueError, match="overlap_tokens"):
        Chunker(tokenizer, 32, overlap_tokens=16)
