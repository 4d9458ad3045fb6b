"""The JSONL connector: byte-range shards, compression, bad lines, object storage."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pytest
import zstandard

from connectors.base import Connector, ConnectorError
from connectors.registry import CONNECTORS
from embedder.config import SourceConfig
from embedder.records import Document
from tests.connectors.reading import bad_of, docs_of, read_all


def _connector(uri: str, **options: object) -> Connector:
    return CONNECTORS.get("jsonl")(SourceConfig(uri=uri, **options))





def _corpus(n: int = 300) -> bytes:
    """n records of varied lengths, non-ASCII text included, one per line."""
    lines = [
        json.dumps(
            {
                "id": f"doc-{i}",
                "text": f"Document {i}: " + "naïve café " * (i % 23 + 1),
                "title": f"Title {i}",
                "lang": "fr",
            },
            ensure_ascii=False,
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(_corpus())
    return path


def test_byte_range_shards_yield_every_line_once_in_order(corpus_file: Path) -> None:
    whole = read_all(_connector(str(corpus_file), metadata_fields=["lang"]))
    split_connector = _connector(str(corpus_file), shard_size_mb=0.001, metadata_fields=["lang"])
    shards = split_connector.list_shards()
    assert len(shards) >= 3
    split = read_all(split_connector)
    assert bad_of(whole) == [] and bad_of(split) == []
    assert [d.id for d in docs_of(whole)] == [f"doc-{i}" for i in range(300)]
    assert docs_of(split) == docs_of(whole)
    assert docs_of(whole)[7].title == "Title 7" and docs_of(whole)[7].metadata == {"lang": "fr"}
    assert "naïve café" in docs_of(whole)[7].text


@pytest.mark.parametrize("shard_bytes", [1, 2, 3, 7, 31, 64, 100])
def test_any_cut_points_keep_each_line_once(tmp_path: Path, shard_bytes: int) -> None:
    """Cuts landing on a newline, just after one, mid-line, mid-UTF-8 character; CRLF; no final newline."""
    lines = [json.dumps({"id": i, "text": "é" * (i % 5 + 1)}, ensure_ascii=False) for i in range(25)]
    path = tmp_path / "crlf.jsonl"
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    split = read_all(_connector(str(path), shard_size_mb=shard_bytes / 1024 / 1024))
    assert bad_of(split) == []
    assert [(d.id, d.text) for d in docs_of(split)] == [(str(i), "é" * (i % 5 + 1)) for i in range(25)]


def test_shard_ids_are_stable_across_listings(corpus_file: Path) -> None:
    first = [s.id for s in _connector(str(corpus_file), shard_size_mb=0.001).list_shards()]
    second = [s.id for s in _connector(str(corpus_file), shard_size_mb=0.001).list_shards()]
    assert first == second
    assert len(set(first)) == len(first)
    assert first[0] == "docs.jsonl@0-1048"
    assert _connector(str(corpus_file)).list_shards()[0].id == "docs.jsonl"


def test_gzip_and_zstd_give_the_same_documents(tmp_path: Path) -> None:
    data = _corpus()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "docs.jsonl").write_bytes(data)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "zst").mkdir()
    # two zstd frames back to back: concatenated files are valid zstd and must read in full
    half = len(data) // 2
    zstd = zstandard.ZstdCompressor()
    (tmp_path / "zst" / "docs.jsonl.zst").write_bytes(zstd.compress(data[:half]) + zstd.compress(data[half:]))

    plain = docs_of(read_all(_connector(str(tmp_path / "plain"))))
    gz_connector = _connector(str(tmp_path / "gz"), shard_size_mb=0.001)
    assert len(gz_connector.list_shards()) == 1  # a compressed file cannot be split
    gz = read_all(gz_connector)
    zst = read_all(_connector(str(tmp_path / "zst")))
    assert bad_of(gz) == [] and bad_of(zst) == []
    assert len(plain) == 300
    assert docs_of(gz) == plain
    assert docs_of(zst) == plain


def test_truncated_gzip_keeps_records_before_the_damage(tmp_path: Path) -> None:
    data = _corpus(2000).replace(b"\n", b"\r\n")  # CRLF: offsets must count the \r too
    compressed = gzip.compress(data)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(compressed[: len(compressed) * 2 // 3])
    items = read_all(_connector(str(path)))
    docs, bad = docs_of(items), bad_of(items)
    assert len(bad) == 1
    assert "gzip" in bad[0].reason and "truncated" in bad[0].reason
    assert items[-1] is bad[0]  # the report comes after every record that could be read
    assert 100 < len(docs) < 2000
    assert [d.id for d in docs] == [f"doc-{i}" for i in range(len(docs))]
    # the report points at the first line lost: right after the last one kept
    kept = data.split(b"\n")[: len(docs)]
    assert bad[0].location == f"byte {sum(len(line) + 1 for line in kept)}"


def test_truncated_zstd_is_reported_not_silently_short(tmp_path: Path) -> None:
    data = _corpus(2000)
    compressed = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(compressed[: len(compressed) // 2])
    items = read_all(_connector(str(path)))
    bad = bad_of(items)
    assert len(bad) == 1 and "zstd" in bad[0].reason
    assert [d.id for d in docs_of(items)] == [f"doc-{i}" for i in range(len(docs_of(items)))]
    assert len(docs_of(items)) > 100


def test_each_kind_of_bad_line_is_quarantined_and_reading_goes_on(tmp_path: Path) -> None:
    good = [json.dumps({"id": f"g{i}", "text": f"good {i}"}).encode() for i in range(7)]
    lines = [
        good[0],
        b'{"id": "m", "text": "unterminated',  # malformed JSON
        good[1],
        b'["an", "array"]',  # not an object
        good[2],
        b'{"id": "u", "text": "caf\xe9"}',  # Latin-1 byte: invalid UTF-8
        good[3],
        b'{"id": "nt", "body": "no text field"}',
        good[4],
        b'{"id": "et", "text": ""}',
        good[5],
        b'{"id": "wt", "text": " \\n\\t "}',
        good[6],
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = read_all(_connector(str(path)))
    assert [d.id for d in docs_of(items)] == [f"g{i}" for i in range(7)]
    bad = bad_of(items)
    assert len(bad) == 6
    assert all(b.reason and b.shard_id == "bad.jsonl" for b in bad)
    reasons = [b.reason for b in bad]
    assert reasons[0].startswith("malformed JSON")
    assert "array, not an object" in reasons[1]
    assert "invalid UTF-8" in reasons[2]
    assert "no text field 'text'" in reasons[3]
    assert "empty or whitespace-only" in reasons[4] and "empty or whitespace-only" in reasons[5]
    # locations are byte offsets of the offending lines
    offsets = {b.location for b in bad}
    starts = [sum(len(line) + 1 for line in lines[:k]) for k in range(len(lines))]
    assert offsets == {f"byte {starts[k]}" for k in (1, 3, 5, 7, 9, 11)}


def test_records_without_id_get_stable_offset_ids(tmp_path: Path) -> None:
    lines = [b'{"text": "first"}', b'{"id": null, "text": "second"}', b'{"id": 7, "text": "third"}']
    path = tmp_path / "noid.jsonl"
    path.write_bytes(b"\n".join(lines))
    docs = docs_of(read_all(_connector(str(path))))
    assert [d.id for d in docs] == ["noid.jsonl@0", f"noid.jsonl@{len(lines[0]) + 1}", "7"]
    again = docs_of(read_all(_connector(str(path), shard_size_mb=10 / 1024 / 1024)))
    assert [d.id for d in again] == [d.id for d in docs]


def test_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "custom.ndjson"
    path.write_text(json.dumps({"uid": 1, "body": "hello", "name": "Greeting", "url": "http://x"}) + "\n")
    docs = docs_of(
        read_all(
            _connector(
                str(path), id_field="uid", text_field="body", title_field="name", metadata_fields=["url"]
            )
        )
    )
    assert docs == [Document(id="1", text="hello", title="Greeting", metadata={"url": "http://x"})]


def test_s3_gives_the_same_documents_as_local(s3_bucket: str, tmp_path: Path) -> None:
    data = _corpus()
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_bucket}/corpus/a.jsonl", data)
    fs.pipe_file(f"{s3_bucket}/corpus/b.jsonl.gz", gzip.compress(data.replace(b'"doc-', b'"b-doc-')))
    fs.invalidate_cache()
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data.replace(b'"doc-', b'"b-doc-')))

    remote = _connector(f"{s3_bucket}/corpus/", shard_size_mb=0.002)
    local = _connector(str(tmp_path), shard_size_mb=0.002)
    assert [s.id for s in remote.list_shards()] == [s.id for s in local.list_shards()]
    assert remote.list_shards()[0].path.startswith("s3://")
    remote_docs = read_all(remote)
    assert bad_of(remote_docs) == []
    assert len(remote_docs) == 600
    assert docs_of(remote_docs) == docs_of(read_all(local))


def test_missing_path_names_source_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConnectorError, match="nowhere.jsonl") as err:
        _connector(uri).list_shards()
    assert "source.uri" in str(err.value)


# --- a file of another format ------------------------------------------------------------------


def test_a_parquet_or_bz2_file_is_refused_naming_the_format_that_reads_it(tmp_path: Path) -> None:
    import bz2

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["1"], "text": ["hello"]}), tmp_path / "data.parquet")
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "data.parquet")).list_shards()
    assert str(err.value) == (
        "data.parquet looks like a Parquet file (starts with PAR1), not JSONL: use --format parquet"
    )
    (tmp_path / "docs.jsonl.bz2").write_bytes(bz2.compress(_corpus(5)))
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "docs.jsonl.bz2")).list_shards()
    assert str(err.value).startswith(
        "docs.jsonl.bz2 looks like a bz2-compressed file (starts with BZh), not JSONL: use --format wikipedia"
    )
    assert "--format jsonl reads .gz and .zst" in str(err.value)


def test_compressed_data_under_a_plain_name_is_refused_with_the_rename(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_bytes(gzip.compress(_corpus(5)))
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "docs.jsonl")).list_shards()
    assert str(err.value).startswith(
        "docs.jsonl looks like a gzip-compressed file (starts with 1f 8b) but its name does not end in .gz"
    )
    assert str(err.value).endswith("rename it to docs.jsonl.gz")


def test_sniffing_keeps_compressed_and_imperfect_jsonl_readable(tmp_path: Path) -> None:
    data = _corpus(20)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    # A BOM, a blank line and a first line that is not JSON: still JSONL, the bad line quarantined.
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf\n  not json at all\n" + data)
    for name in ("a.jsonl.gz", "b.jsonl.zst", "c.jsonl"):
        items = read_all(_connector(str(tmp_path / name)))
        assert len(docs_of(items)) == 20, name
    assert len(bad_of(read_all(_connector(str(tmp_path / "c.jsonl"))))) == 1


def test_a_line_nested_too_deep_is_one_bad_record_and_the_next_lines_are_read(tmp_path: Path) -> None:
    good = [json.dumps({"id": f"g{i}", "text": f"good {i}"}) for i in range(60)]
    deep_array = "[" * 1000 + "]" * 1000
    deep_object = '{"id": "deep", "text": "t", "meta": ' + '{"a": ' * 1000 + "1" + "}" * 1001
    lines = [*good[:3], deep_array, *good[3:30], deep_object, *good[30:]]
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = read_all(_connector(str(path)))
    assert [d.id for d in docs_of(items)] == [f"g{i}" for i in range(60)]
    bad = bad_of(items)
    starts = [sum(len(line) + 1 for line in lines[:k]) for k in range(len(lines))]
    assert [(b.location, b.reason) for b in bad] == [
        (f"byte {starts[3]}", "JSON nested too deep to parse (the parser's recursion limit); flatten the record"),
        (f"byte {starts[31]}", "JSON nested too deep to parse (the parser's recursion limit); flatten the record"),
    ]


def test_a_duplicate_id_in_a_shard_keeps_the_first_and_quarantines_the_others(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "first a"}),
        json.dumps({"id": "x", "text": "the first x"}),
        json.dumps({"id": "b", "text": "b"}),
        json.dumps({"id": "x", "text": "a second x"}),
        json.dumps({"id": "x", "text": "a third x"}),
        json.dumps({"id": "c", "text": "c"}),
    ]
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = read_all(_connector(str(path)))
    assert [(d.id, d.text) for d in docs_of(items)] == [("a", "first a"), ("x", "the first x"), ("b", "b"), ("c", "c")]
    starts = [sum(len(line) + 1 for line in lines[:k]) for k in range(len(lines))]
    assert [(b.location, b.reason, b.doc_id) for b in bad_of(items)] == [
        (f"byte {starts[3]}", f"duplicate id 'x' (first seen at byte {starts[1]}): kept the first", "x"),
        (f"byte {starts[4]}", f"duplicate id 'x' (first seen at byte {starts[1]}): kept the first", "x"),
    ]


def test_a_lone_surrogate_in_id_text_title_or_metadata_is_quarantined(tmp_path: Path) -> None:
    lines = [
        r'{"id": "a", "text": "fine"}',
        r'{"id": "b", "text": "broken \ud800 here"}',
        r'{"id": "c\udc00", "text": "fine text, broken id"}',
        r'{"id": "d", "text": "fine", "title": "half a pair \udbff"}',
        r'{"id": "e", "text": "fine", "url": "http://x/\ud83d"}',
        r'{"id": "f", "text": "a real pair \ud83d\ude00 is fine"}',
    ]
    path = tmp_path / "surrogates.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = read_all(_connector(str(path), metadata_fields=["url"]))
    assert [(d.id, d.text) for d in docs_of(items)] == [("a", "fine"), ("f", "a real pair \U0001f600 is fine")]
    tail = "which is not valid Unicode and cannot be tokenized or stored: fix the record's encoding at the source"
    assert [(b.doc_id, b.reason) for b in bad_of(items)] == [
        ("b", f"text has a lone surrogate (U+D800 at character 7), {tail}"),
        ("c\\udc00", f"id has a lone surrogate (U+DC00 at character 1), {tail}"),
        ("d", f"title has a lone surrogate (U+DBFF at character 12), {tail}"),
        ("e", f"metadata field 'url' has a lone surrogate (U+D83D at character 9), {tail}"),
    ]
    for bad in bad_of(items):  # a quarantine record is always writable as UTF-8
        json.dumps([bad.doc_id, bad.snippet, bad.location], ensure_ascii=False).encode("utf-8")
