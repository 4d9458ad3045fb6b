"""The Parquet connector: row-group shards from the footer, the Wikipedia layout, bad rows and files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import Connector, ConnectorError
from connectors.registry import CONNECTORS
from embedder.config import SourceConfig
from embedder.records import Document
from tests.connectors.reading import bad_of, docs_of, read_all


def _connector(uri: str, **options: object) -> Connector:
    return CONNECTORS.get("parquet")(SourceConfig(uri=uri, **options))





def _wikipedia_table(n: int = 600) -> pa.Table:
    """The common Wikipedia Parquet layout: id, url, title, text (ids as strings)."""
    return pa.table(
        {
            "id": [str(12 + 7 * i) for i in range(n)],
            "url": [f"https://en.wikipedia.org/wiki?curid={12 + 7 * i}" for i in range(n)],
            "title": [f"Article {i}" for i in range(n)],
            "text": [f"Article {i} is about ünïcode and things. " * (i % 40 + 1) for i in range(n)],
        }
    )


def _write(table: pa.Table, path: Path | str, row_group_size: int = 50) -> None:
    with fsspec.open(str(path), "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def test_row_groups_become_shards_with_the_same_documents(tmp_path: Path) -> None:
    path = tmp_path / "wiki.parquet"
    _write(_wikipedia_table(), path, row_group_size=50)
    assert pq.ParquetFile(path).metadata.num_row_groups == 12

    whole_connector = _connector(str(path), metadata_fields=["url"])
    assert [s.id for s in whole_connector.list_shards()] == ["wiki.parquet"]
    whole = read_all(whole_connector)

    split_connector = _connector(str(path), metadata_fields=["url"], shard_size_mb=0.01)
    shards = split_connector.list_shards()
    assert len(shards) >= 3
    assert shards[0].id.startswith("wiki.parquet@rg0-")
    # the shards tile the row groups: contiguous, no overlap, none left out
    assert [(s.start, s.end) for s in shards] == [(a.start, a.end) for a in shards] and all(
        a.end == b.start for a, b in zip(shards, shards[1:], strict=False)
    )
    assert shards[0].start == 0 and shards[-1].end == 12
    assert [s.id for s in split_connector.list_shards()] == [s.id for s in shards]  # stable

    split = read_all(split_connector)
    assert bad_of(whole) == [] and bad_of(split) == []
    assert docs_of(split) == docs_of(whole)
    assert [d.id for d in docs_of(whole)] == [str(12 + 7 * i) for i in range(600)]


def test_wikipedia_layout_with_url_metadata(tmp_path: Path) -> None:
    path = tmp_path / "enwiki.parquet"
    _write(_wikipedia_table(3), path)
    docs = docs_of(read_all(_connector(str(path), metadata_fields=["url"])))
    assert docs[1] == Document(
        id="19",
        text="Article 1 is about ünïcode and things. " * 2,
        title="Article 1",
        metadata={"url": "https://en.wikipedia.org/wiki?curid=19"},
    )


def test_listing_reads_only_the_footer(tmp_path: Path) -> None:
    """Shard sizes come from the footer's compressed sizes; listing must not read the data pages."""
    path = tmp_path / "random.parquet"
    rows = 400
    texts = [os.urandom(2000).hex() for _ in range(rows)]  # incompressible: a file of about 1.6 MB
    _write(pa.table({"id": [str(i) for i in range(rows)], "text": texts}), path, row_group_size=50)
    opened: list[int] = []

    class CountingFile(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            opened.append(len(data))
            return data

    connector = _connector(str(path), shard_size_mb=0.01)
    original_open = connector.fs.open
    connector.fs.open = lambda p, mode="rb", **kw: CountingFile(p, mode)  # type: ignore[method-assign]
    try:
        shards = connector.list_shards()
    finally:
        connector.fs.open = original_open  # type: ignore[method-assign]
    assert len(shards) == 8  # each row group is about 0.2 MB of compressed data, above the 0.01 MB target
    footer = pq.ParquetFile(path).metadata.serialized_size
    assert opened, "the listing went around fs.open"
    assert sum(opened) <= footer + 64 * 1024  # the footer, plus at most pyarrow's speculative tail read
    assert sum(opened) < path.stat().st_size / 10
    assert sum(s.size_bytes for s in shards) <= path.stat().st_size


def test_null_and_empty_text_are_bad_records(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["a", "b", "c", "d", "e"],
            "text": ["good one", None, "", "  \n ", "good two"],
        }
    )
    path = tmp_path / "holes.parquet"
    _write(table, path, row_group_size=2)
    items = read_all(_connector(str(path)))
    assert [d.id for d in docs_of(items)] == ["a", "e"]
    bad = bad_of(items)
    assert [(b.doc_id, b.location) for b in bad] == [("b", "row 1"), ("c", "row 2"), ("d", "row 3")]
    assert all(b.reason for b in bad)
    assert [d.title for d in docs_of(items)] == [None, None]  # no title column: no titles


def test_missing_id_column_gives_row_ids(tmp_path: Path) -> None:
    path = tmp_path / "texts.parquet"
    _write(pa.table({"text": [f"t{i}" for i in range(5)]}), path, row_group_size=2)
    connector = _connector(str(path), shard_size_mb=1 / 1024 / 1024)  # one row group per shard
    assert len(connector.list_shards()) == 3
    assert [d.id for d in docs_of(read_all(connector))] == [f"texts.parquet@row{i}" for i in range(5)]


def test_missing_text_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "wiki.parquet"
    _write(_wikipedia_table(3), path)
    with pytest.raises(ConnectorError) as err:
        _connector(str(path), text_field="body").list_shards()
    message = str(err.value)
    assert "'body'" in message and "id, url, title, text" in message and "source.text_field" in message


def test_corrupt_file_is_one_bad_record_and_others_still_read(tmp_path: Path) -> None:
    _write(_wikipedia_table(10), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not really parquet " * 50)
    items = read_all(_connector(str(tmp_path)))
    assert len(docs_of(items)) == 10
    bad = bad_of(items)
    assert len(bad) == 1
    assert bad[0].shard_id == "b.parquet" and "Parquet" in bad[0].reason


def test_damaged_row_group_costs_only_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "damaged.parquet"
    _write(_wikipedia_table(200), path, row_group_size=50)
    data = bytearray(path.read_bytes())
    text_chunk = pq.ParquetFile(path).metadata.row_group(1).column(3)  # text column of row group 1
    start = text_chunk.data_page_offset
    data[start : start + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    items = read_all(_connector(str(path)))  # the whole file is one shard
    ids = [str(12 + 7 * i) for i in range(200)]
    assert [d.id for d in docs_of(items)] == ids[:50] + ids[100:]
    bad = bad_of(items)
    assert len(bad) == 1
    assert bad[0].location == "row group 1, rows 50-99" and "unreadable" in bad[0].reason


def test_s3_gives_the_same_documents_as_local(s3_bucket: str, tmp_path: Path) -> None:
    table = _wikipedia_table(200)
    _write(table, f"{s3_bucket}/wiki/part-0.parquet")
    fsspec.filesystem("s3").invalidate_cache()
    _write(table, tmp_path / "part-0.parquet")
    remote = _connector(f"{s3_bucket}/wiki/*.parquet", metadata_fields=["url"], shard_size_mb=0.01)
    local = _connector(str(tmp_path / "*.parquet"), metadata_fields=["url"], shard_size_mb=0.01)
    assert len(remote.list_shards()) >= 2
    assert [s.id for s in remote.list_shards()] == [s.id for s in local.list_shards()]
    remote_items = read_all(remote)
    assert bad_of(remote_items) == []
    assert docs_of(remote_items) == docs_of(read_all(local))
    assert len(remote_items) == 200


def test_a_jsonl_or_text_file_is_refused_naming_the_format_that_reads_it(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "docs.jsonl")).list_shards()
    assert str(err.value) == (
        "docs.jsonl looks like JSON Lines (starts with '{'), not Parquet: use --format jsonl"
    )
    (tmp_path / "notes.parquet").write_text("just some notes\n")
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "notes.parquet")).list_shards()
    assert str(err.value) == (
        "notes.parquet looks like a text file (its first bytes are UTF-8 text), "
        "not Parquet: use --format text"
    )


def test_a_damaged_parquet_file_is_still_quarantined_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    _write(_wikipedia_table(20), path)
    path.write_bytes(path.read_bytes()[:-100])  # starts with PAR1, footer gone
    items = read_all(_connector(str(path)))
    assert docs_of(items) == [] and len(bad_of(items)) == 1
