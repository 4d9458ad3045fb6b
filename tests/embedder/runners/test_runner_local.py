"""End to end with the local runner: real sample corpus, bundled model, both sinks, s3, bad input."""

from __future__ import annotations

import bz2
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from embedder import open_index, run
from embedder.checkpoint import Checkpoint
from embedder.config import build_job
from tests.embedder.outputs import read_output, sample_articles

CHARS_PER_ARTICLE = 1500  # keeps CPU encoding of the whole sample to a few seconds


@pytest.fixture(scope="module")
def articles(wiki_sample) -> list[dict]:
    return sample_articles(wiki_sample, CHARS_PER_ARTICLE)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, articles):
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "wiki.jsonl", "w", encoding="utf-8") as f:
        for a in articles:
            f.write(json.dumps(a) + "\n")
    table = pa.Table.from_pylist(articles)
    pq.write_table(table, root / "wiki.parquet", row_group_size=25)
    return root


def _job(source: str, output: str, fmt: str, sink: str, **extra) -> dict:
    job = {
        "source": {"uri": source, "format": fmt, "metadata_fields": ["url"], "shard_size_mb": 0.05},
        "output": {"uri": output, "sink": sink},
        "model": {"name": "all-MiniLM-L6-v2", "device": "cpu"},
        "chunking": {"max_tokens": 128},
        "runner": {"workers": 2, "show_progress": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        job[section][name] = value
    return job


def _read(output: str, sink: str) -> pa.Table:
    return read_output(output, sink)


@pytest.fixture(scope="module")
def jsonl_lance(tmp_path_factory, corpus_dir):
    out = str(tmp_path_factory.mktemp("out") / "db")
    result = run(build_job(_job(str(corpus_dir / "wiki.jsonl"), out, "jsonl", "lance")))
    return result, out


@pytest.fixture(scope="module")
def parquet_parquet(tmp_path_factory, corpus_dir):
    out = str(tmp_path_factory.mktemp("out") / "parquet")
    result = run(build_job(_job(str(corpus_dir / "wiki.parquet"), out, "parquet", "parquet")))
    return result, out


def test_every_document_embedded_and_faithful(jsonl_lance, articles, minilm) -> None:
    result, out = jsonl_lance
    table = _read(out, "lance")
    assert result.state == "done" and result.shards_total >= 3  # the file was split into byte-range shards
    # host memory is sampled for the run record: the runner's RSS, and its readers' while they run
    assert result.memory_timeline and all(m[1] > 100 for m in result.memory_timeline)
    expected = {a["id"] for a in articles if a["text"].strip()}
    assert set(table.column("doc_id").to_pylist()) == expected
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == result.rows_written
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    assert vectors.shape[1] == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    # Fidelity: each vector equals SentenceTransformer.encode of the stored chunk text.
    reference = minilm.encode(table.column("text").to_pylist(), batch_size=64, normalize_embeddings=True)
    cos = np.sum(vectors * reference, axis=1)
    assert cos.min() >= 0.9999, f"min cos {cos.min()}"
    # passthrough metadata and titles
    row = table.slice(0, 1).to_pylist()[0]
    article = next(a for a in articles if a["id"] == row["doc_id"])
    assert row["title"] == article["title"] and row["url"] == article["url"]


def test_lance_and_parquet_outputs_agree(jsonl_lance, parquet_parquet) -> None:
    lance_table = _read(jsonl_lance[1], "lance").sort_by("id")
    parquet_table = _read(parquet_parquet[1], "parquet").sort_by("id")
    assert lance_table.column("id").to_pylist() == parquet_table.column("id").to_pylist()
    assert lance_table.column("text").to_pylist() == parquet_table.column("text").to_pylist()
    a = np.asarray(lance_table.column("vector").to_pylist())
    b = np.asarray(parquet_table.column("vector").to_pylist())
    assert np.sum(a * b, axis=1).min() >= 0.9999
    # the Parquet output is one dataset of part files; provenance travels in the schema
    files = ds.dataset(parquet_parquet[1], format="parquet").files
    assert len(files) >= 2 and all(f.rsplit("/", 1)[-1].startswith("part-") for f in files)
    # each shard committed once, by the committer thread; staging and commit time in the record
    result = parquet_parquet[0]
    assert result.shards_done == result.shards_total == len(files)
    assert result.rows_written == parquet_table.num_rows
    assert result.commit_seconds > 0 and result.write_seconds > 0
    from embedder.schema import provenance_of

    prov = provenance_of(pq.read_schema(files[0]))
    assert prov["model"] == "all-MiniLM-L6-v2" and prov["pooling"] == "mean" and prov["normalize"] is True


def test_search_finds_the_article(jsonl_lance) -> None:
    hits = open_index(jsonl_lance[1]).search("the fraction of sunlight reflected by a surface", k=3)
    assert "Albedo" in [h.title for h in hits]
    assert hits[0].score >= hits[-1].score


def test_rerun_skips_committed_shards(jsonl_lance, corpus_dir) -> None:
    result, out = jsonl_lance
    before = _read(out, "lance").num_rows
    again = run(build_job(_job(str(corpus_dir / "wiki.jsonl"), out, "jsonl", "lance")))
    assert again.shards_skipped == again.shards_total and again.rows_written == 0
    assert _read(out, "lance").num_rows == before
    runs = Checkpoint(out).runs()
    assert [r["state"] for r in runs][-2:] == ["done", "done"]


def test_text_folder(tmp_path, minilm) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Tides are caused by the gravity of the Moon and the Sun.")
    (docs / "sub" / "b.md").write_text("Honeybees tell each other where flowers are with a dance.")
    (docs / "empty.txt").write_text("  \n")
    out = str(tmp_path / "out")
    result = run(build_job(_job(str(docs), out, "auto", "parquet")))
    table = _read(out, "parquet")
    assert sorted(table.column("doc_id").to_pylist()) == ["a.txt", "sub/b.md"]
    assert result.bad_records == 1
    reference = minilm.encode(table.column("text").to_pylist(), normalize_embeddings=True)
    assert np.sum(np.asarray(table.column("vector").to_pylist()) * reference, axis=1).min() >= 0.9999


def test_s3_source_and_outputs(s3_bucket, corpus_dir, jsonl_lance) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put_file(str(corpus_dir / "wiki.jsonl"), f"{s3_bucket}/in/wiki.jsonl")
    local = _read(jsonl_lance[1], "lance").sort_by("id")
    for sink in ("parquet", "lance"):
        out = f"{s3_bucket}/out-{sink}"
        result = run(build_job(_job(f"{s3_bucket}/in/wiki.jsonl", out, "jsonl", sink)))
        assert result.state == "done"
        if sink == "parquet":
            table = ds.dataset(out[len("s3://"):], format="parquet", filesystem=fs).to_table().sort_by("id")
        else:
            table = _read(out, "lance").sort_by("id")
        assert table.column("id").to_pylist() == local.column("id").to_pylist()
        a = np.asarray(table.column("vector").to_pylist())
        b = np.asarray(local.column("vector").to_pylist())
        assert np.sum(a * b, axis=1).min() >= 0.9999
        assert Checkpoint(out).completed(), "completion records live next to the output on s3"


def test_bad_input_is_quarantined_with_reasons(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [
        json.dumps({"id": "ok1", "text": "A perfectly fine document about rivers."}).encode(),
        b'{"id": "bad-json", "text": "unterminated',
        json.dumps({"id": "no-text", "body": "text is in the wrong field"}).encode(),
        json.dumps({"id": "empty", "text": ""}).encode(),
        json.dumps({"id": "blank", "text": "   \n\t "}).encode(),
        b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',
        json.dumps({"id": "ok2", "text": "Another fine document about mountains."}).encode(),
    ]
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "b.jsonl.gz").write_bytes(gzip.compress(b'{"id": "gz1", "text": "compressed fine text"}\n' * 50)[:-30])
    out = str(tmp_path / "out")
    result = run(build_job(_job(str(src), out, "jsonl", "parquet")))
    table = _read(out, "parquet")
    assert {"ok1", "ok2"} <= set(table.column("doc_id").to_pylist())
    quarantine = Checkpoint(out).quarantine()
    reasons = " | ".join(q["reason"] for q in quarantine).lower()
    assert result.bad_records == len(quarantine) >= 6
    for word in ("json", "no text field", "empty", "utf-8"):
        assert word in reasons, f"{word!r} missing from quarantine reasons: {reasons}"
    assert any("b.jsonl.gz" in q["shard_id"] for q in quarantine), "the truncated gzip is quarantined"
    assert all(q["location"] for q in quarantine)


def _small_dump(wiki_sample, path, articles: int = 12) -> list[str]:
    """A valid dump file with the smallest real articles of the sample (and its redirects)."""
    import re

    raw = bz2.open(wiki_sample, "rt", encoding="utf-8").read()
    head = raw[: raw.index("<page>")]
    pages = re.findall(r"<page>.*?</page>", raw, flags=re.S)
    redirects = [p for p in pages if "<redirect" in p][:5]
    real = sorted((p for p in pages if "<redirect" not in p and "<ns>0</ns>" in p), key=len)[:articles]
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(head + "".join(redirects + real) + "</mediawiki>\n")
    return [re.search(r"<id>(\d+)</id>", p).group(1) for p in real]


def test_wikipedia_dump_end_to_end_via_cli(wiki_sample, tmp_path, minilm) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    dump = tmp_path / "enwiki-20160101-pages-articles1.xml.bz2"  # format detected from the name
    page_ids = _small_dump(wiki_sample, dump)
    out = tmp_path / "db"
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", "run", "--source", str(dump), "--output", str(out), "--no-progress",
         "--set", "chunking.context=section", "--set", "source.metadata_fields=[url, revision_id]"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    table = _read(str(out), "lance")
    assert set(table.column("doc_id").to_pylist()) == set(page_ids)
    texts = table.column("text").to_pylist()
    for residue in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}"):
        assert not any(residue in t for t in texts), residue
    assert all(u.startswith("https://en.wikipedia.org/wiki/") for u in table.column("url").to_pylist())
    assert any(" — " in t.split("\n", 1)[0] for t in texts), "chunks carry 'Title — Section' context"
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    reference = minilm.encode(texts, batch_size=64, normalize_embeddings=True)
    assert np.sum(vectors * reference, axis=1).min() >= 0.9999


def test_memory_timeline_counts_the_runner_and_its_readers() -> None:
    """The sampler records the runner's RSS and the sum over the reader pids it is given."""
    import subprocess
    import sys
    import time

    from embedder.execution.result import RunResult
    from embedder.execution.telemetry import TimelineSampler, rss_mb

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(80_000_000); time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has touched its 80 MB
            if (rss_mb(child.pid) or 0) > 80:
                break
            time.sleep(0.05)
        result = RunResult(run_id="r", output="o")
        sampler = TimelineSampler(encoder=None, reader_pids=lambda: [child.pid])
        sampler.sample(result)
        (_, runner, readers), = result.memory_timeline
        assert runner == pytest.approx(rss_mb(), rel=0.2) and runner > 50
        assert readers > 80
    finally:
        child.kill()
        child.wait()
    assert rss_mb(child.pid) is None  # a process that is gone counts nothing



def test_nothing_embedded_is_a_failure_naming_the_field(tmp_path) -> None:
    """A JSONL whose text sits in ``body`` ends exit 1, state failed, with the reason and the hint;
    the rerun with the fixed field then embeds everything (the empty pass left no shard "done")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    source = tmp_path / "notes.jsonl"
    with open(source, "w") as f:
        for i in range(40):
            f.write(json.dumps({"doc_id": f"n{i}", "heading": f"Note {i}", "body": f"Note number {i} about rivers."}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "embedder.cli", "run", "--source", str(source), "--output", str(out),
           "--sink", "parquet", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "nothing was embedded" in message and "no text field 'text' (40)" in message
    assert "doc_id, heading, body" in message and "source.text_field" in message
    assert "_embedder/quarantine" in message and "Traceback" not in proc.stderr
    runs = Checkpoint(str(out)).runs()
    assert runs[-1]["state"] == "failed" and runs[-1]["output_rows"] == 0
    fixed = subprocess.run([*cmd, "--set", "source.text_field=body", "--set", "source.id_field=doc_id"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0, fixed.stderr
    assert sorted(read_output(str(out), "parquet").column("doc_id").to_pylist()) == sorted(f"n{i}" for i in range(40))


def test_no_document_at_all_is_a_failure(tmp_path) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_text("\n\n")
    result = None
    with pytest.raises(Exception, match="nothing was embedded: the source .* gave no document"):
        result = run(build_job(_job(str(source), str(tmp_path / "out"), "jsonl", "parquet")))
    assert result is None
    assert Checkpoint(str(tmp_path / "out")).runs()[-1]["state"] == "failed"


def test_quarantine_reasons_are_counted_in_the_run_record(tmp_path) -> None:
    source = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"id": f"ok{i}", "text": f"fine text {i}"}) for i in range(5)]
    lines += [json.dumps({"id": f"e{i}", "text": ""}) for i in range(3)] + ['{"id": "broken', '{"id": "x", "text": 5}']
    source.write_text("\n".join(lines) + "\n")
    result = run(build_job(_job(str(source), str(tmp_path / "out"), "jsonl", "parquet")))
    assert result.state == "done" and result.bad_records == 5
    assert result.quarantine_reasons["empty or whitespace-only text"] == 3
    assert sum(result.quarantine_reasons.values()) == 5
    assert result.quarantine_uri.endswith("_embedder/quarantine/")


def test_length_histogram_counts_the_committed_rows(jsonl_lance) -> None:
    result, out = jsonl_lance
    assert sum(result.length_histogram) == result.rows_written == _read(out, "lance").num_rows


def test_two_encoders_give_the_same_output_as_one(tmp_path, corpus_dir) -> None:
    """runner.encoders: 2 runs two models (on the CPU here, the code path GPUs take) fed by one packer."""
    source = str(corpus_dir / "wiki.jsonl")
    one = run(build_job(_job(source, str(tmp_path / "one"), "jsonl", "parquet", runner__encoders=1)))
    two = run(build_job(_job(source, str(tmp_path / "two"), "jsonl", "parquet", runner__encoders=2)))
    assert one.encoders == 1 and two.encoders == 2 and len(two.encoder_tokens_per_second) == 2
    assert all(rate > 0 for rate in two.encoder_tokens_per_second)  # both took batches
    a = _read(str(tmp_path / "one"), "parquet").sort_by("id")
    b = _read(str(tmp_path / "two"), "parquet").sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist() and a.num_rows == two.rows_written
    va = np.asarray(a.column("vector").to_pylist(), dtype=np.float32)
    vb = np.asarray(b.column("vector").to_pylist(), dtype=np.float32)
    assert float(np.min(np.sum(va * vb, axis=1))) >= 0.9999
    assert Checkpoint(str(tmp_path / "two")).runs()[-1]["encoders"] == 2


def _cli_run(source, out, *args: str, timeout: float = 300):
    """``embedder run`` in a subprocess (exit code, stderr) with the test job's settings."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "embedder.cli", "run", "--source", str(source), "--output", str(out), "--no-progress",
           "--model", "all-MiniLM-L6-v2", "--device", "cpu", "--workers", "1", "--sink", "parquet", *args]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_duplicate_id_in_a_shard_is_quarantined_and_the_job_finishes(tmp_path) -> None:
    source = tmp_path / "dups.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": f"document number {i} about rivers"}) for i in range(5)]
    lines.insert(3, json.dumps({"id": "d1", "text": "a second document claiming id d1"}))
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = _cli_run(source, out, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    table = _read(str(out), "parquet")
    assert sorted(table.column("id").to_pylist()) == [f"d{i}#0" for i in range(5)]
    assert "document number 1 about rivers" in table.column("text").to_pylist()
    assert [q["reason"] for q in Checkpoint(str(out)).quarantine()] == [
        f"duplicate id 'd1' (first seen at byte {len(lines[0]) + 1}): kept the first"
    ]


def test_lone_surrogates_and_non_utf8_file_names_are_quarantined_not_a_traceback(tmp_path) -> None:
    import os

    source = tmp_path / "s.jsonl"
    source.write_text("\n".join([
        r'{"id": "a", "text": "a fine document about lakes"}',
        r'{"id": "b", "text": "broken \ud800 text"}',
        r'{"id": "c\udc00", "text": "broken id"}',
        r'{"id": "d", "text": "another fine document", "title": "t\udbff"}',
    ]) + "\n", encoding="utf-8")
    proc = _cli_run(source, tmp_path / "out", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert sorted(_read(str(tmp_path / "out"), "parquet").column("id").to_pylist()) == ["a#0"]
    quarantine = Checkpoint(str(tmp_path / "out")).quarantine()
    assert [(q["doc_id"], q["reason"].split(" (")[0]) for q in quarantine] == [
        ("b", "text has a lone surrogate"), ("c\\udc00", "id has a lone surrogate"), ("d", "title has a lone surrogate"),
    ]

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "ok.txt").write_text("a fine text file about hills", encoding="utf-8")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:
        f.write(b"named in Latin-1")
    proc = _cli_run(folder, tmp_path / "out-text", "--format", "text")
    assert proc.returncode == 0, proc.stderr
    assert _read(str(tmp_path / "out-text"), "parquet").column("doc_id").to_pylist() == ["ok.txt"]
    assert [q["location"] for q in Checkpoint(str(tmp_path / "out-text")).quarantine()] == ["caf\\xe9.txt"]


def test_a_text_without_tokens_is_quarantined_with_the_reason(tmp_path) -> None:
    source = tmp_path / "invisible.jsonl"
    texts = {"ok1": "a document about glaciers", "zw": "\u200b\u200b\u200b", "ctl": "\x01\x02\x03",
             "bom": "\ufeff", "ok2": "another document about deserts"}
    source.write_text("\n".join(json.dumps({"id": k, "text": v}) for k, v in texts.items()) + "\n")
    out = tmp_path / "out"
    proc = _cli_run(source, out, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert sorted(_read(str(out), "parquet").column("id").to_pylist()) == ["ok1#0", "ok2#0"]
    quarantine = Checkpoint(str(out)).quarantine()
    reason = "text has no tokens for this model's tokenizer (only invisible or control characters?)"
    assert [(q["doc_id"], q["reason"], q["snippet"]) for q in quarantine] == [
        ("zw", reason, r"'\u200b\u200b\u200b'"), ("ctl", reason, r"'\x01\x02\x03'"), ("bom", reason, r"'\ufeff'"),
    ]
    assert Checkpoint(str(out)).runs()[-1]["documents"] == 2


def test_a_fifo_and_a_link_to_etc_passwd_in_a_text_folder_are_not_read(tmp_path) -> None:
    import os

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "ok.txt").write_text("a note about the weather", encoding="utf-8")
    os.mkfifo(folder / "pipe.txt")  # opening it for reading blocks until a writer comes: never
    os.symlink("/etc/passwd", folder / "passwd.txt")
    proc = _cli_run(folder, tmp_path / "out", "--format", "text", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert _read(str(tmp_path / "out"), "parquet").column("doc_id").to_pylist() == ["ok.txt"]
    assert "skipped" in proc.stderr and "pipe.txt: not a regular file" in proc.stderr
    assert "passwd.txt: a link to /etc/passwd, outside the source root" in proc.stderr
