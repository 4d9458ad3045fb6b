"""Incremental runs embed only what changed and end equal to a fresh full run; model changes are
refused unless reembedding; history lists every run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from embedder import run
from embedder.chunking import Chunker
from embedder.config import ChunkingConfig, build_job
from embedder.records import Chunk, Document
from embedder.schema import provenance_of

REPO = Path(__file__).resolve().parents[3]
WORDS = ("river mountain bread star bee chess tide volcano coffee sleep light water people small old new "
         "city forest music paper stone glass cloud winter summer garden letter engine island").split()


def _doc(i: int, rng: random.Random, words: int | None = None) -> dict:
    n = words or rng.randint(30, 400)
    return {"id": f"doc-{i}", "title": f"Title {i}", "text": " ".join(rng.choice(WORDS) for _ in range(n)) + "."}


def _write(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def _versions(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    rng = random.Random(3)
    v1 = [_doc(i, rng) for i in range(60)]
    v2 = [dict(d) for d in v1]
    for d in v2[0:6]:  # 10% edited: a sentence added in the middle
        words = d["text"].split()
        d["text"] = " ".join(words[: len(words) // 2] + ["an", "inserted", "sentence", "here"] + words[len(words) // 2 :])
    v2[6]["text"] = " ".join(v2[6]["text"].split()[:20])  # one document shrinks to one chunk
    del v2[50:53]  # 5% deleted
    v2 += [_doc(100 + i, rng) for i in range(3)]  # 5% added
    return v1, v2


def _job(source: Path, output: Path, sink: str, **output_extra) -> dict:
    return {
        "source": {"uri": str(source), "format": "jsonl", "shard_size_mb": 0.01},
        "output": {"uri": str(output), "sink": sink, **output_extra},
        "model": {"device": "cpu"},
        "chunking": {"max_tokens": 64},
        "runner": {"workers": 1, "show_progress": False},
        "validation": {"canary_samples": 4},
    }


def _table(output: Path, sink: str):
    if sink == "parquet":
        import pyarrow.dataset as ds

        return ds.dataset(str(output), format="parquet").to_table().sort_by("id")
    import lancedb

    return lancedb.connect(str(output)).open_table("chunks").to_arrow().sort_by("id")


def _chunk_set(docs: list[dict], minilm_path: str) -> dict[str, tuple[str, int]]:
    tok = tokenizers.Tokenizer.from_file(f"{minilm_path}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    chunker = Chunker.from_settings(tok, 256, 2, ChunkingConfig(max_tokens=64))
    chunks = chunker.chunk([Document(d["id"], d["text"], d["title"]) for d in docs])
    return {c.id: (c.content_hash, len(c.token_ids)) for c in chunks}


@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_incremental_equals_fresh_run(sink, tmp_path, minilm_path) -> None:
    v1, v2 = _versions(tmp_path)
    source = tmp_path / "corpus.jsonl"
    output = tmp_path / "out"
    _write(source, v1)
    first = run(build_job(_job(source, output, sink)))
    assert first.state == "done" and first.mode == "full"

    _write(source, v2)
    second = run(build_job(_job(source, output, sink, mode="incremental")))
    old, new = _chunk_set(v1, minilm_path), _chunk_set(v2, minilm_path)
    changed = {cid for cid, (h, _) in new.items() if old.get(cid, (None,))[0] != h}
    assert second.mode == "incremental"
    assert second.tokens == sum(new[c][1] for c in changed), "only new and changed chunks are embedded"
    assert second.added == sum(1 for c in changed if c not in old)
    assert second.updated == sum(1 for c in changed if c in old)
    assert second.unchanged == len(new) - len(changed)
    assert second.deleted == len(set(old) - set(new))

    fresh_out = tmp_path / "fresh"
    run(build_job(_job(source, fresh_out, sink)))
    got, want = _table(output, sink), _table(fresh_out, sink)
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert got.column("content_hash").to_pylist() == want.column("content_hash").to_pylist()
    a, b = np.asarray(got.column("vector").to_pylist()), np.asarray(want.column("vector").to_pylist())
    assert np.sum(a * b, axis=1).min() >= 0.9999

    third = run(build_job(_job(source, output, sink, mode="incremental")))
    assert third.tokens == 0 and third.added == third.updated == third.deleted == 0
    after = _table(output, sink)
    assert after.column("id").to_pylist() == got.column("id").to_pylist()
    assert after.column("shard_id").to_pylist() == got.column("shard_id").to_pylist()

    history = subprocess.run([sys.executable, "-m", "embedder.cli", "history", str(output), "--json"],
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True)
    records = json.loads(history.stdout)
    assert [r["mode"] for r in records] == ["full", "incremental", "incremental"]
    assert all({"mode", "added", "updated", "deleted", "unchanged", "tokens_embedded", "state"} <= set(r) for r in records)
    assert records[1]["tokens_embedded"] == second.tokens and records[2]["tokens_embedded"] == 0


def test_model_change_is_refused_then_reembedded(tmp_path, minilm_path) -> None:
    from tests.embedder.models.tiny_models import save_tiny_model

    rng = random.Random(5)
    source = tmp_path / "corpus.jsonl"
    _write(source, [_doc(i, rng) for i in range(12)])
    output = tmp_path / "out"
    run(build_job(_job(source, output, "parquet")))
    other = save_tiny_model(tmp_path / "other-model", minilm_path, family="bert")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "embedder.cli", "run", "--source", str(source), "--output", str(output),
            "--sink", "parquet", "--model", str(other), "--device", "cpu", "--no-progress"]
    refused = subprocess.run([*base, "--mode", "incremental"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "reembed" in refused.stderr and "model" in refused.stderr
    redone = subprocess.run([*base, "--mode", "reembed"], env=env, capture_output=True, text=True)
    assert redone.returncode == 0, redone.stderr
    table = _table(output, "parquet")
    import pyarrow.dataset as ds

    prov = provenance_of(ds.dataset(str(output), format="parquet").schema)
    assert prov["model"] == str(other)
    assert len(set(table.column("doc_id").to_pylist())) == 12


def _dump_pair(wiki_sample, tmp_path: Path, changed: int = 2) -> tuple[Path, Path, list[str]]:
    """Two dumps of the sample's 10 smallest articles; in the second, ``changed`` pages have a new
    revision with one more paragraph."""
    import bz2
    import re

    raw = bz2.open(wiki_sample, "rt", encoding="utf-8").read()
    head = raw[: raw.index("<page>")]
    pages = sorted((p for p in re.findall(r"<page>.*?</page>", raw, flags=re.S)
                    if "<redirect" not in p and "<ns>0</ns>" in p), key=len)[:10]
    v2 = list(pages)
    changed_ids = []
    for i in range(changed):
        page = v2[i]
        rev = re.search(r"<revision>\s*<id>(\d+)</id>", page).group(1)
        page = page.replace(f"<id>{rev}</id>", f"<id>{int(rev) + 1000000}</id>", 1)
        v2[i] = page.replace("</text>", "\n\nA new closing paragraph was added in this revision.</text>", 1)
        changed_ids.append(re.search(r"<id>(\d+)</id>", page).group(1))
    paths = []
    for name, body in (("v1", pages), ("v2", v2)):
        path = tmp_path / name / "enwiki-pages-articles.xml.bz2"
        path.parent.mkdir()
        with bz2.open(path, "wt", encoding="utf-8") as f:
            f.write(head + "".join(body) + "</mediawiki>\n")
        paths.append(path)
    return paths[0], paths[1], changed_ids


def test_wikipedia_unchanged_revisions_are_not_parsed(wiki_sample, tmp_path) -> None:
    from connectors.registry import CONNECTORS
    from embedder.config import SourceConfig
    from embedder.records import UnchangedDocument

    v1, v2, changed_ids = _dump_pair(wiki_sample, tmp_path)
    connector = CONNECTORS.get("wikipedia")(SourceConfig(uri=str(v1)))
    known = {d.id: str(d.metadata["revision_id"]) for s in connector.list_shards() for d in connector.documents(s)}
    connector = CONNECTORS.get("wikipedia")(SourceConfig(uri=str(v2)))
    connector.known_versions = known
    items = [i for s in connector.list_shards() for i in connector.documents(s)]
    assert sorted(i.id for i in items if isinstance(i, Document)) == sorted(changed_ids)
    assert len([i for i in items if isinstance(i, UnchangedDocument)]) == 8
    assert connector.counts["unchanged"] == 8

    output = tmp_path / "out"
    job = {"source": {"uri": str(v1), "metadata_fields": ["revision_id"]},
           "output": {"uri": str(output), "sink": "parquet"},
           "model": {"device": "cpu"}, "chunking": {"max_tokens": 128},
           "runner": {"workers": 1, "show_progress": False}, "validation": {"canary_samples": 0}}
    first = run(build_job(job))
    job["source"]["uri"] = str(v2)
    job["output"]["mode"] = "incremental"
    second = run(build_job(job))
    table = _table(output, "parquet")
    embedded_docs = {i.split("#")[0] for i, s in zip(table.column("id").to_pylist(), table.column("shard_id").to_pylist())
                     if s.endswith("@" + second.run_id)}
    assert embedded_docs == set(changed_ids), "only the pages with a new revision were embedded"
    assert 0 < second.tokens < first.tokens / 4
    assert second.deleted == 0 and second.updated + second.added >= 2
    assert len(set(table.column("doc_id").to_pylist())) == 10


# --- the compact form of what the output holds --------------------------------------------------


def _output_rows(rng: random.Random, docs: int) -> tuple[dict, dict, dict]:
    """Rows as an output holds them: ids → content hash, doc → chunk count, doc → revision ids of its rows."""
    from embedder.chunking import content_hash

    hashes, counts, revisions = {}, {}, {}
    for d in range(docs):
        doc_id = f"Page {d} é"  # non-ASCII ids hash by their utf-8 bytes
        counts[doc_id] = rng.randint(1, 6)
        revision = rng.randint(1, 10**9)
        revisions[doc_id] = []
        for i in range(counts[doc_id]):
            hashes[f"{doc_id}#{i}"] = content_hash(f"{doc_id} {i} {rng.random()}")
            # some documents were partly re-embedded by a later pass: their rows carry two revisions
            revisions[doc_id].append(revision + (1 if d % 7 == 0 and i == 0 else 0))
    return hashes, counts, revisions


def test_compact_lookup_answers_as_the_rows_it_was_built_from() -> None:
    import pyarrow as pa

    from embedder.chunking import content_hash
    from embedder.incremental import ABSENT, CHANGED, SAME, ExistingChunks

    rng = random.Random(11)
    hashes, counts, revisions = _output_rows(rng, 1500)
    ids = list(hashes)
    rng.shuffle(ids)  # outputs are not sorted
    table = pa.table({
        "id": ids,
        "doc_id": [i.rsplit("#", 1)[0] for i in ids],
        "chunk_index": pa.array([int(i.rsplit("#", 1)[1]) for i in ids], pa.int32()),
        "content_hash": [hashes[i] for i in ids],
        "revision_id": pa.array([revisions[i.rsplit("#", 1)[0]][int(i.rsplit("#", 1)[1])] for i in ids], pa.int64()),
    })
    existing = ExistingChunks.from_table(table, "revision_id")
    assert len(existing) == len(ids)
    assert existing.nbytes == 16 * len(ids) + 28 * len(counts)  # 16 bytes per chunk id, 28 per document

    queries = ids[:500] + ids[500:1000] + [f"Page {d} é#9" for d in range(300)] + ["other#0"]
    query_hashes = [hashes[i] for i in ids[:500]] + [content_hash(i + " edited") for i in ids[500:1000]] + ["0" * 32] * 301
    status = existing.match(queries, query_hashes)
    assert (status[:500] == SAME).all() and (status[500:1000] == CHANGED).all() and (status[1000:] == ABSENT).all()

    docs = list(counts) + ["never seen"]
    assert existing.chunk_counts(docs).tolist() == [*counts.values(), 0]
    known = existing.known_versions()
    assert len(known) == len(counts)
    # a document's version is the newest its rows carry (revision ids only grow)
    assert all(known.get(d) == str(max(revisions[d])) for d in counts)
    assert known.get("never seen") is None and "never seen" not in known


def test_compact_lookup_keeps_non_integer_versions_exactly() -> None:
    import pyarrow as pa

    from embedder.incremental import ExistingChunks

    rows = [("a", 0, "v1"), ("a", 1, "v1"), ("b", 0, "007"), ("c", 0, "123"), ("d", 0, "x"), ("d", 1, "y"), ("e", 0, None)]
    table = pa.table({"id": [f"{d}#{i}" for d, i, _ in rows], "doc_id": [d for d, _, _ in rows],
                      "chunk_index": pa.array([i for _, i, _ in rows], pa.int32()), "content_hash": ["ab" * 16] * len(rows),
                      "etag": [v for _, _, v in rows]})
    known = ExistingChunks.from_table(table, "etag").known_versions()
    assert {d: known.get(d) for d in "abcde"} == {"a": "v1", "b": "007", "c": "123", "d": None, "e": None}
    assert ExistingChunks.from_table(table.drop_columns(["etag"]), "etag").known_versions() is None


def test_colliding_chunk_ids_are_reembedded_never_skipped() -> None:
    """Two ids whose 64-bit keys collide: the stored row of one never passes the other as
    unchanged, even with the same content; rows sharing a key each still match their own id."""
    from embedder.chunking import content_hash
    from embedder.incremental import CHANGED, SAME, ChangeFilter, ExistingChunks, content_keys, id_digests

    same_text = content_hash("References")
    (x_key, x_check), (_, y_check) = id_digests(["Page X#3", "Page Y#3"])
    content = content_keys([same_text])[0]
    # The output holds Page Y#3 with that text, and Y's key happens to equal X's.
    existing = ExistingChunks(chunk_keys=np.array([x_key], np.uint64), chunk_values=np.array([y_check ^ content], np.uint64))
    assert existing.match(["Page X#3"], [same_text]).tolist() == [CHANGED]
    chunk_filter = ChangeFilter(existing)
    chunk = Chunk("Page X", 3, "References", np.zeros(3, np.int32), same_text, "s1", None, {})
    assert chunk_filter.filter([chunk]) == [chunk], "a colliding id is embedded, not skipped"
    _, record = chunk_filter.finish_shard("s1", 1, [])
    assert (record["updated"], record["unchanged"], record["replaced"]) == (1, 0, ["Page X#3"])

    # Both rows in the output under one key (Y's row sorted first): X still finds its own row.
    both = ExistingChunks(chunk_keys=np.array([x_key, x_key], np.uint64),
                          chunk_values=np.array([y_check ^ content, x_check ^ content], np.uint64))
    assert both.match(["Page X#3", "Page X#3"], [same_text, content_hash("edited")]).tolist() == [SAME, CHANGED]


def test_colliding_document_ids_keep_their_own_counts() -> None:
    from embedder.incremental import ExistingChunks, id_digests

    (a_key, a_check), (_, b_check) = id_digests(["Doc A", "Doc B"])
    # Doc A's key is shared with a row of Doc B (7 chunks) sorted before it.
    existing = ExistingChunks(doc_keys=np.array([a_key, a_key], np.uint64), doc_checks=np.array([b_check, a_check], np.uint64),
                              doc_chunks=np.array([7, 2], np.uint32))
    assert existing.chunk_counts(["Doc A", "Doc B"]).tolist() == [2, 0]
