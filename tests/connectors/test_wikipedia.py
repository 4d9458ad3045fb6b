"""The Wikipedia dump connector: the real sample, multistream shards and range reads, S3, encodings, damage."""

from __future__ import annotations

import bz2
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import fsspec
import pytest

import connectors
from connectors.base import ConnectorError
from connectors.registry import CONNECTORS, detect_format
from connectors.wikipedia import WikipediaConnector
from embedder.config import SourceConfig
from embedder.records import BadRecord, Document, Shard

RESIDUE = ("{{", "}}", "[[", "]]", "<ref", "{|", "|}")
SITEINFO = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <base>https://en.wikipedia.org/wiki/Main_Page</base>
    <namespaces>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="6" case="first-letter">File</namespace>
      <namespace key="14" case="first-letter">Category</namespace>
    </namespaces>
  </siteinfo>
"""


# --- helpers ----------------------------------------------------------------------------------


def _connector(uri: str, shard_size_mb: float = 64.0, **options: object) -> WikipediaConnector:
    config = SourceConfig(uri=uri, format="wikipedia", shard_size_mb=shard_size_mb, options=options)
    connector = CONNECTORS.get("wikipedia")(config)
    assert isinstance(connector, WikipediaConnector)
    return connector


def _read(connector: WikipediaConnector, shards: list[Shard] | None = None) -> list[Document | BadRecord]:
    shards = connector.list_shards() if shards is None else shards
    return [item for shard in shards for item in connector.documents(shard)]


def _docs(items: list[Document | BadRecord]) -> list[Document]:
    return [item for item in items if isinstance(item, Document)]


def _bad(items: list[Document | BadRecord]) -> list[BadRecord]:
    return [item for item in items if isinstance(item, BadRecord)]


def _as_tuples(docs: list[Document]) -> list[tuple]:
    return [(d.id, d.title, d.text, d.metadata) for d in docs]


def _split_dump(xml: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(document start through </siteinfo>, each <page> element with its indentation, the end)."""
    first = xml.index(b"  <page>")
    pages = []
    position = first
    while True:
        start = xml.find(b"  <page>", position)
        if start < 0:
            break
        end = xml.index(b"</page>\n", start) + len(b"</page>\n")
        pages.append(xml[start:end])
        position = end
    return xml[:first], pages, xml[position:]


def _page_id_title(page: bytes) -> tuple[str, str]:
    text = page.decode("utf-8")
    title = re.search(r"<title>(.*?)</", text).group(1)
    return re.search(r"<id>(\d+)</id>", text).group(1), title


def _write_multistream(folder: Path, xml: bytes, pages_per_stream: int = 100, name: str = "wiki") -> Path:
    """The layout of Wikimedia's multistream dumps: a stream for the header, one per 100 pages, one
    for the closing tag; the bz2 index lists ``offset:page_id:title`` for every page."""
    head, pages, tail = _split_dump(xml)
    streams = [head] + [b"".join(pages[i : i + pages_per_stream]) for i in range(0, len(pages), pages_per_stream)]
    streams.append(tail)
    blob = bytearray()
    index_lines = []
    for k, stream in enumerate(streams):
        offset = len(blob)
        if 0 < k < len(streams) - 1:
            for page in pages[(k - 1) * pages_per_stream : k * pages_per_stream]:
                page_id, title = _page_id_title(page)
                index_lines.append(f"{offset}:{page_id}:{title}")
        blob += bz2.compress(stream)
    dump = folder / f"{name}-pages-articles-multistream.xml.bz2"
    dump.write_bytes(bytes(blob))
    index = folder / f"{name}-pages-articles-multistream-index.txt.bz2"
    index.write_bytes(bz2.compress(("\n".join(index_lines) + "\n").encode("utf-8")))
    return dump


def _page(page_id: int | None, title: str, text: str | None, ns: int = 0, extra: str = "") -> str:
    id_line = f"    <id>{page_id}</id>\n" if page_id is not None else ""
    text_line = '      <text xml:space="preserve" />\n' if text is None else f'      <text xml:space="preserve">{text}</text>\n'
    return (
        f"  <page>\n    <title>{title}</title>\n    <ns>{ns}</ns>\n{id_line}{extra}    <revision>\n"
        f"      <id>{1000 + (page_id or 0)}</id>\n      <timestamp>2020-01-01T00:00:00Z</timestamp>\n"
        f"{text_line}    </revision>\n  </page>\n"
    )


def _small_dump(*pages: str) -> bytes:
    return (SITEINFO + "".join(pages) + "</mediawiki>\n").encode("utf-8")


# --- the real sample --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_xml(wiki_sample: Path) -> bytes:
    return bz2.decompress(wiki_sample.read_bytes())


@pytest.fixture(scope="module")
def expected_articles(sample_xml: bytes) -> list[tuple[str, str, int]]:
    """(page id, title, revision id) of each non-redirect namespace-0 page, by a plain ElementTree pass."""
    ns = {"mw": "http://www.mediawiki.org/xml/export-0.10/"}
    root = ET.fromstring(sample_xml)
    out = []
    for page in root.findall("mw:page", ns):
        if page.findtext("mw:ns", namespaces=ns) == "0" and page.find("mw:redirect", ns) is None:
            revision = page.find("mw:revision", ns)
            out.append((page.findtext("mw:id", namespaces=ns), page.findtext("mw:title", namespaces=ns), int(revision.findtext("mw:id", namespaces=ns))))
    return out


@pytest.fixture(scope="module")
def sample_items(wiki_sample: Path) -> list[Document | BadRecord]:
    return _read(_connector(str(wiki_sample)))


@pytest.fixture(scope="module")
def sample_docs(sample_items: list[Document | BadRecord]) -> list[Document]:
    return _docs(sample_items)


def test_sample_yields_exactly_the_non_redirect_articles(
    wiki_sample: Path, sample_items: list[Document | BadRecord], expected_articles: list[tuple[str, str, int]]
) -> None:
    assert len(expected_articles) > 100
    assert _bad(sample_items) == []
    docs = _docs(sample_items)
    assert [(d.id, d.title, d.metadata["revision_id"]) for d in docs] == expected_articles
    assert len({d.id for d in docs}) == len(docs)
    shards = _connector(str(wiki_sample)).list_shards()
    assert len(shards) == 1 and shards[0].get("layout") == "bz2"  # single stream: one shard


def test_sample_text_has_no_markup_residue(sample_docs: list[Document]) -> None:
    for doc in sample_docs:
        for token in RESIDUE:
            assert token not in doc.text, (doc.title, token, doc.text[max(0, doc.text.find(token) - 80) :][:160])
        assert doc.text == doc.text.strip() and "\n\n\n" not in doc.text


def test_sample_articles_read_like_prose(sample_docs: list[Document]) -> None:
    by_title = {d.title: d for d in sample_docs}
    anarchism = by_title["Anarchism"].text
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "stateless societies, although several authors" in anarchism  # link text kept, refs gone
    assert "Category:" not in anarchism and "thumb|" not in anarchism
    albedo = by_title["Albedo"].text
    assert "where A is the astronomical albedo, D is the diameter in kilometers" in albedo  # <math> kept
    assert "about 15 °C" in albedo  # {{convert|15|C}} rendered, not dropped
    assert "Autism is a neurodevelopmental disorder" in by_title["Autism"].text


def test_sample_headings_are_lines_and_sections(sample_docs: list[Document]) -> None:
    with_sections = 0
    for doc in sample_docs:
        sections = doc.metadata["_sections"]
        offsets = [offset for offset, _ in sections]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        for offset, path in sections:
            heading = path.split(" — ")[-1]
            assert doc.text[offset:].startswith(heading + "\n") or doc.text[offset:] == heading
            assert offset == 0 or doc.text[offset - 2 : offset] == "\n\n"  # a line of its own
            assert "==" not in heading
        with_sections += bool(sections)
    assert with_sections > 80
    anarchism = next(d for d in sample_docs if d.title == "Anarchism")
    paths = [path for _, path in anarchism.metadata["_sections"]]
    assert "History — Origins" in paths and "Etymology and terminology" in paths
    assert not any(p.endswith(("References", "External links", "See also")) for p in paths)


def test_sample_metadata(sample_docs: list[Document]) -> None:
    anarchism = next(d for d in sample_docs if d.title == "Anarchism")
    assert anarchism.id == "12"
    assert anarchism.metadata["url"] == "https://en.wikipedia.org/wiki/Anarchism"
    assert anarchism.metadata["timestamp"] == "2016-04-22T10:19:33Z"
    assert anarchism.metadata["revision_id"] == 716551092
    spaced = next(d for d in sample_docs if " " in d.title)
    assert spaced.metadata["url"] == "https://en.wikipedia.org/wiki/" + spaced.title.replace(" ", "_")


# --- multistream ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multistream(tmp_path_factory: pytest.TempPathFactory, sample_xml: bytes) -> Path:
    return _write_multistream(tmp_path_factory.mktemp("multistream"), sample_xml)


@pytest.fixture(scope="module")
def multistream_items(multistream: Path) -> list[Document | BadRecord]:
    return _read(_connector(str(multistream), streams_per_shard=1))


@pytest.fixture(scope="module")
def short_multistream(tmp_path_factory: pytest.TempPathFactory, sample_xml: bytes) -> Path:
    """The sample's 124 shorter pages (24 articles), 20 pages per stream: cheap to read many times."""
    head, pages, tail = _split_dump(sample_xml)
    short = head + b"".join(p for p in pages if len(p) < 12_000) + tail
    return _write_multistream(tmp_path_factory.mktemp("short"), short, pages_per_stream=20, name="short")


@pytest.fixture(scope="module")
def short_multistream_docs(short_multistream: Path) -> list[Document]:
    items = _read(_connector(str(short_multistream), streams_per_shard=1))
    assert _bad(items) == []
    return _docs(items)


def test_multistream_gives_the_same_documents_in_several_shards(
    multistream: Path, multistream_items: list[Document | BadRecord], sample_docs: list[Document]
) -> None:
    connector = _connector(str(multistream), streams_per_shard=1)
    shards = connector.list_shards()
    # The header stream, then 3 streams of 100 pages (the closing-tag stream is not in the index: it
    # ends the last shard).
    assert len(shards) == 4 and all(s.get("layout") == "multistream" for s in shards)
    assert connector.list_shards() == shards  # deterministic listing
    assert [s.start for s in shards[1:]] == [s.end for s in shards[:-1]] and shards[-1].end == multistream.stat().st_size
    assert _bad(multistream_items) == []
    assert _as_tuples(_docs(multistream_items)) == _as_tuples(sample_docs)


def test_multistream_shards_follow_shard_size(multistream: Path) -> None:
    size = multistream.stat().st_size
    shards = _connector(str(multistream), shard_size_mb=0.5).list_shards()
    assert 2 <= len(shards) < 5
    assert shards[0].start == 0 and shards[-1].end == size
    assert all(s.end - s.start >= 0.5 * 2**20 for s in shards[:-1])


def test_each_shard_reads_only_its_byte_range(
    tmp_path: Path, short_multistream: Path, short_multistream_docs: list[Document]
) -> None:
    """A copy whose bytes outside one shard's range are zeroed gives that shard the same documents."""
    connector = _connector(str(short_multistream), streams_per_shard=2)
    shards = connector.list_shards()
    assert len(shards) == 4
    data = short_multistream.read_bytes()
    from_copies = []
    for shard in shards:
        zeroed = bytes(shard.start) + data[shard.start : shard.end] + bytes(len(data) - shard.end)
        copy = tmp_path / f"zeroed-{shard.start}.xml.bz2"
        copy.write_bytes(zeroed)
        items = list(connector.documents(dataclasses.replace(shard, path=str(copy))))
        assert _bad(items) == []
        from_copies += _docs(items)
    assert _as_tuples(from_copies) == _as_tuples(short_multistream_docs)


def test_multistream_without_index_finds_the_same_streams(tmp_path: Path, multistream: Path) -> None:
    """Scanning finds every stream the index lists, plus the closing-tag stream (no pages, so not
    in the index); the shards read the same documents."""
    with_index = _connector(str(multistream), streams_per_shard=1).list_shards()
    alone = tmp_path / multistream.name  # no index next to it
    alone.write_bytes(multistream.read_bytes())
    for connector in (_connector(str(multistream), streams_per_shard=1, index=False), _connector(str(alone), streams_per_shard=1)):
        scanned = connector.list_shards()
        assert [s.start for s in scanned[:-1]] == [s.start for s in with_index]
        assert scanned[-1].end == with_index[-1].end
        footer = list(connector.documents(scanned[-1]))
        assert footer == []  # the closing tag alone: no page, no damage
    reader = _connector(str(alone), streams_per_shard=1)
    last_with_index = _connector(str(multistream), streams_per_shard=1)
    assert _as_tuples(_docs(list(reader.documents(reader.list_shards()[-2])))) == _as_tuples(
        _docs(list(last_with_index.documents(with_index[-1])))
    )


def test_source_given_as_the_index_reads_its_dump(multistream: Path) -> None:
    index = multistream.with_name(multistream.name.replace("multistream.xml", "multistream-index.txt"))
    assert detect_format(str(index)) == "wikipedia"
    shards = _connector(str(index), streams_per_shard=1).list_shards()
    assert [s.start for s in shards] == [s.start for s in _connector(str(multistream), streams_per_shard=1).list_shards()]


def test_multistream_from_s3(s3_bucket: str, short_multistream: Path, short_multistream_docs: list[Document]) -> None:
    fs = fsspec.filesystem("s3")
    index = short_multistream.with_name(short_multistream.name.replace("multistream.xml", "multistream-index.txt"))
    fs.put_file(str(short_multistream), f"{s3_bucket}/dumps/{short_multistream.name}")
    fs.put_file(str(index), f"{s3_bucket}/dumps/{index.name}")
    connector = _connector(f"{s3_bucket}/dumps/{short_multistream.name}", streams_per_shard=2)
    shards = connector.list_shards()
    assert len(shards) == 4 and all(s.path.startswith("s3://") for s in shards)
    local = _connector(str(short_multistream), streams_per_shard=2).list_shards()
    assert [(s.id, s.start, s.end) for s in shards] == [(s.id, s.start, s.end) for s in local]
    items = _read(connector, shards)
    assert _bad(items) == []
    assert _as_tuples(_docs(items)) == _as_tuples(short_multistream_docs)
    # Without the index, on S3 too: the streams are found by scanning.
    scanned = _connector(f"{s3_bucket}/dumps/{short_multistream.name}", streams_per_shard=2, index=False)
    assert [s.start for s in scanned.list_shards()][:4] == [s.start for s in shards]


# --- plain XML and encodings ------------------------------------------------------------------


def test_plain_xml_byte_range_shards_keep_each_page_once(tmp_path: Path, sample_xml: bytes, sample_docs: list[Document]) -> None:
    head, pages, tail = _split_dump(sample_xml)
    pages = [p for p in pages if len(p) < 30_000]  # the shorter pages (45 articles): a fast test
    part = head + b"".join(pages) + tail
    path = tmp_path / "part.xml"
    path.write_bytes(part)
    connector = _connector(str(path), shard_size_mb=0.05)
    shards = connector.list_shards()
    assert len(shards) >= 10
    items = _read(connector, shards)
    assert _bad(items) == []
    ids = {_page_id_title(p)[0] for p in pages}
    expected = [d for d in sample_docs if d.id in ids]
    assert len(expected) > 40
    assert _as_tuples(_docs(items)) == _as_tuples(expected)


@pytest.mark.parametrize(
    ("encoding", "suffix"), [("UTF-16", ".xml"), ("UTF-16", ".xml.bz2"), ("ISO-8859-1", ".xml")]
)
def test_declared_encodings_give_the_same_documents(
    tmp_path: Path, sample_xml: bytes, sample_docs: list[Document], encoding: str, suffix: str
) -> None:
    """UTF-16 with a BOM, and an 8-bit encoding (characters outside it written as &#N; references)."""
    head, pages, tail = _split_dump(sample_xml)
    pages = [p for p in pages if len(p) < 12_000]  # 124 short pages, 24 of them articles
    part = f'<?xml version="1.0" encoding="{encoding}"?>\n' + (head + b"".join(pages) + tail).decode("utf-8")
    if encoding == "UTF-16":
        encoded = part.encode("utf-16")  # with BOM
        assert encoded[:2] in (b"\xff\xfe", b"\xfe\xff")
    else:
        encoded = part.encode("latin-1", "xmlcharrefreplace")
    path = tmp_path / f"dump{suffix}"
    path.write_bytes(bz2.compress(encoded) if suffix.endswith(".bz2") else encoded)
    connector = _connector(str(path), shard_size_mb=0.02)
    shards = connector.list_shards()
    assert shards[0].get("encoding") == encoding
    if suffix == ".xml":
        assert len(shards) >= 3  # byte ranges cut inside the encoded text
    items = _read(connector, shards)
    assert _bad(items) == []
    ids = {_page_id_title(p)[0] for p in pages}
    expected = [d for d in sample_docs if d.id in ids]
    assert len(expected) >= 20
    assert _as_tuples(_docs(items)) == _as_tuples(expected)


# --- damage -----------------------------------------------------------------------------------


def test_truncated_dump_keeps_the_pages_before_the_cut(tmp_path: Path, wiki_sample: Path, sample_docs: list[Document]) -> None:
    data = wiki_sample.read_bytes()
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(data[: len(data) // 2])
    items = _read(_connector(str(cut)))
    docs = _docs(items)
    assert 10 < len(docs) < len(sample_docs)
    assert _as_tuples(docs) == _as_tuples(sample_docs[: len(docs)])  # intact pages, in order
    bad = _bad(items)
    assert len(bad) == 1 and isinstance(items[-1], BadRecord)
    assert bad[0].location == f"byte {len(data) // 2}"
    assert "truncated" in bad[0].reason


def test_corrupt_stream_loses_only_that_stream(
    tmp_path: Path, short_multistream: Path, short_multistream_docs: list[Document]
) -> None:
    connector = _connector(str(short_multistream), shard_size_mb=1000)
    shards = connector.list_shards()
    assert len(shards) == 1  # all streams in one shard: reading must resume after the damage
    streams = _connector(str(short_multistream), streams_per_shard=1).list_shards()
    damaged = bytearray(short_multistream.read_bytes())
    victim = next(s for s in streams[1:] if len(_docs(list(connector.documents(s)))) >= 3)
    cut = victim.start + (victim.end - victim.start) * 3 // 4
    damaged[cut : cut + 64] = bytes(64)
    copy = tmp_path / short_multistream.name
    copy.write_bytes(bytes(damaged))
    items = list(connector.documents(dataclasses.replace(shards[0], path=str(copy))))
    bad = _bad(items)
    assert len(bad) == 1 and bad[0].location == f"byte {victim.start}" and "corrupt" in bad[0].reason
    in_victim = {d.id for d in _docs(list(connector.documents(victim)))}
    everything = _as_tuples(short_multistream_docs)
    got = _as_tuples(_docs(items))
    assert [t for t in got if t[0] not in in_victim] == [t for t in everything if t[0] not in in_victim]
    assert len([t for t in got if t[0] in in_victim]) < len(in_victim)


def test_malformed_pages_are_quarantined_and_the_rest_kept(tmp_path: Path) -> None:
    good = "'''Good''' text about [[things|stuff]]."
    pages = [
        _page(1, "First", good),
        _page(2, "Broken", "oops").replace("</title>", "</titl>"),  # not well-formed
        _page(None, "No id", good),
        _page(4, "Empty", None),
        _page(5, "Strange namespace", good, ns=999),
        _page(6, "Only markup", "{{Infobox|a=b}}\n[[Category:Things]]"),
        _page(7, "Unclosed", good).replace("  </page>\n", ""),  # never closed before the next page
        _page(8, "Talk:Something", good, ns=1),  # another namespace: skipped, not an error
        _page(9, "A redirect", "#REDIRECT [[First]]", extra='    <redirect title="First" />\n'),
        _page(10, "Last", good),
    ]
    xml = _small_dump(*pages)
    plain = tmp_path / "small.xml"
    plain.write_bytes(xml)
    for path in (plain, _write_multistream(tmp_path, xml, pages_per_stream=4, name="small")):
        connector = _connector(str(path))
        items = _read(connector)
        assert [(d.id, d.text) for d in _docs(items)] == [("1", "Good text about stuff."), ("10", "Good text about stuff.")]
        bad = {b.doc_id: b for b in _bad(items)}
        assert set(bad) == {"2", None, "4", "5", "6", "7"}, [(b.doc_id, b.reason) for b in bad.values()]
        assert "malformed XML" in bad["2"].reason and "mismatched tag" in bad["2"].reason
        assert "<id>" in bad[None].reason
        assert "no text" in bad["4"].reason
        assert "namespace 999" in bad["5"].reason
        assert "no text left" in bad["6"].reason
        assert "not closed" in bad["7"].reason
        assert all(re.fullmatch(r"byte \d+", b.location) for b in bad.values())
        assert connector.counts["redirects"] == 1 and connector.counts["other_namespaces"] == 1


def test_disambiguation_pages_are_optional(tmp_path: Path) -> None:
    xml = _small_dump(
        _page(1, "Mercury", "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n* [[Mercury (element)]]\n\n{{disambiguation}}"),
        _page(2, "Mercury (planet)", "'''Mercury''' is the smallest planet.{{Disambiguation needed}}"),
    )
    path = tmp_path / "dab.xml"
    path.write_bytes(xml)
    kept = _docs(_read(_connector(str(path))))
    assert [d.id for d in kept] == ["1", "2"]
    assert kept[0].text == "Mercury may refer to:\nMercury (planet)\nMercury (element)"
    connector = _connector(str(path), skip_disambiguation=True)
    assert [d.id for d in _docs(_read(connector))] == ["2"]
    assert connector.counts["disambiguation"] == 1


def test_options_are_validated() -> None:
    with pytest.raises(ConnectorError, match=r"'namespace'.*Valid: namespaces, skip_disambiguation"):
        _connector("x.xml.bz2", namespace=[0])
    with pytest.raises(ConnectorError, match="namespaces"):
        _connector("x.xml.bz2", namespaces="0")
    with pytest.raises(ConnectorError, match="streams_per_shard"):
        _connector("x.xml.bz2", streams_per_shard=0)
    for bad_size in (0, -1, 1.5, "64MB", True):
        with pytest.raises(ConnectorError, match="'max_page_bytes' must be a positive integer"):
            _connector("x.xml.bz2", max_page_bytes=bad_size)


# --- bombs: a page too large to hold ---------------------------------------------------------

BOMB_TEXT_MB = 300  # decompressed size of the bomb page's text (its bz2 form is a few hundred bytes)
CHILD_MEMORY_CAP = 1 << 30  # address space of the reading process: a blown bound fails, never swaps
READ_IN_CHILD = """
import json, sys
from connectors.registry import CONNECTORS
from embedder.config import SourceConfig
from embedder.records import BadRecord, Document

config = SourceConfig(uri=sys.argv[1], format="wikipedia", options={"max_page_bytes": int(sys.argv[2])})
connector = CONNECTORS.get("wikipedia")(config)
docs, bad = [], []
for shard in connector.list_shards():
    for item in connector.documents(shard):
        if isinstance(item, Document):
            docs.append([item.id, item.title])
        elif isinstance(item, BadRecord):
            bad.append([item.location, item.reason, item.doc_id])
# VmHWM: this process's own peak RSS since exec (ru_maxrss would include the forked parent's pages)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"docs": docs, "bad": bad, "hwm_kb": hwm_kb}))
"""
GOOD = "'''Good''' text about [[things|stuff]]."


def _write_bomb(path: Path, multistream: bool) -> None:
    """A dump whose page 3 holds ``BOMB_TEXT_MB`` MB of one character, between normal pages (page 4
    in the bomb's own bz2 stream), written without ever holding the decompressed bytes."""
    bomb_open, bomb_close = _page(3, "Bomb", "@").split("@")
    streams = [
        [SITEINFO],
        [_page(1, "First", GOOD), _page(2, "Second", GOOD)],
        [bomb_open, None, bomb_close, _page(4, "Fourth", GOOD)],
        [_page(5, "Fifth", GOOD)],
        ["</mediawiki>\n"],
    ]
    block = b"a" * (1 << 20)
    with path.open("wb") as out:
        compressor = bz2.BZ2Compressor()
        for stream in streams:
            for part in stream:
                if part is None:
                    for _ in range(BOMB_TEXT_MB):
                        out.write(compressor.compress(block))
                else:
                    out.write(compressor.compress(part.encode("utf-8")))
            if multistream:
                out.write(compressor.flush())
                compressor = bz2.BZ2Compressor()
        out.write(compressor.flush())


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_CAP, CHILD_MEMORY_CAP))
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))


@pytest.mark.parametrize("multistream", [False, True], ids=["single-stream", "multistream"])
def test_bz2_bomb_page_is_quarantined_in_bounded_memory(tmp_path: Path, multistream: bool) -> None:
    name = "bomb-pages-articles-multistream.xml.bz2" if multistream else "bomb-pages-articles.xml.bz2"
    dump = tmp_path / name
    _write_bomb(dump, multistream)
    assert dump.stat().st_size < 4096  # a bomb: hundreds of MB of page from a few compressed bytes
    env = {**os.environ, "PYTHONPATH": str(Path(connectors.__file__).parents[1])}
    with (tmp_path / "out.json").open("w+") as out, (tmp_path / "err.txt").open("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", READ_IN_CHILD, str(dump), str(1 << 20)],
            stdout=out,
            stderr=err,
            env=env,
            preexec_fn=_cap_memory,
        )
        child.wait()
        out.seek(0)
        err.seek(0)
        result, errors = out.read(), err.read()
    assert child.returncode == 0, errors[-2000:]
    items = json.loads(result)
    peak_mb = items["hwm_kb"] / 1024
    assert peak_mb < 400, f"reading a {BOMB_TEXT_MB} MB page took {peak_mb:.0f} MB of memory"
    assert items["docs"] == [["1", "First"], ["2", "Second"], ["4", "Fourth"], ["5", "Fifth"]], items["bad"]
    assert len(items["bad"]) == 1, items["bad"]
    location, reason, doc_id = items["bad"][0]
    assert doc_id == "3" and re.fullmatch(r"byte \d+", location)
    assert reason == (
        "page 3 ('Bomb') larger than max_page_bytes (1 MiB): skipped; raise source.options.max_page_bytes to read it"
    )


def test_oversized_pages_are_skipped_in_plain_xml_across_shards(tmp_path: Path) -> None:
    big = "x" * 50_000
    pages = [_page(1, "First", GOOD), _page(2, "Big", big), _page(3, "Third", GOOD), _page(4, "Bigger", big * 3)]
    xml = _small_dump(*pages)
    path = tmp_path / "big.xml"
    path.write_bytes(xml)
    offsets = [xml.index(page.encode("utf-8")) + 2 for page in pages]  # each "<page>" tag
    skipped = "larger than max_page_bytes (40000 bytes): skipped; raise source.options.max_page_bytes to read it"
    for shard_size_mb in (64.0, 0.01):  # one shard; shards of 10 KB, which the big pages cross
        connector = _connector(str(path), shard_size_mb=shard_size_mb, max_page_bytes=40_000)
        items = _read(connector)
        assert [d.id for d in _docs(items)] == ["1", "3"]
        assert [(b.doc_id, b.location, b.reason) for b in _bad(items)] == [
            ("2", f"byte {offsets[1]}", f"page 2 ('Big') {skipped}"),
            ("4", f"byte {offsets[3]}", f"page 4 ('Bigger') {skipped}"),
        ]
    assert [d.id for d in _docs(_read(_connector(str(path), max_page_bytes=1 << 20)))] == ["1", "2", "3", "4"]


# --- a file of another format ----------------------------------------------------------------


def test_a_jsonl_or_text_file_is_refused_naming_the_format_that_reads_it(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "docs.jsonl")).list_shards()
    assert str(err.value) == (
        "docs.jsonl looks like JSON Lines (starts with '{'), not a MediaWiki XML dump: use --format jsonl"
    )
    (tmp_path / "notes.xml").write_text("plain notes, not XML\n")
    with pytest.raises(ConnectorError) as err:
        _connector(str(tmp_path / "notes.xml")).list_shards()
    assert str(err.value) == (
        "notes.xml looks like a text file (its first bytes are UTF-8 text), not a MediaWiki XML dump: "
        "use --format text"
    )


def test_bz2_that_is_not_a_dump_inside_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.bz2"
    path.write_bytes(bz2.compress(b'{"id": "1", "text": "hello"}\n'))
    with pytest.raises(ConnectorError) as err:
        _connector(str(path)).list_shards()
    assert str(err.value) == (
        "docs.jsonl.bz2 holds JSON Lines once decompressed (starts with '{'), not a MediaWiki XML dump: "
        "decompress it and use --format jsonl"
    )


def test_a_bz2_dump_under_another_name_is_refused_with_the_rename(tmp_path: Path, wiki_sample: Path) -> None:
    path = tmp_path / "dump.xml"
    path.write_bytes(wiki_sample.read_bytes())
    with pytest.raises(ConnectorError) as err:
        _connector(str(path)).list_shards()
    assert str(err.value).startswith("dump.xml looks like a bz2-compressed file (starts with BZh) but")
    assert str(err.value).endswith("rename it to dump.xml.bz2")
