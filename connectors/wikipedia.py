"""MediaWiki XML dumps (``*-pages-articles*.xml[.bz2]``), read in place, in parallel, as clean text.

Layouts and shards:

* **Multistream** ``.xml.bz2`` (``*-pages-articles-multistream.xml.bz2``): the file is a
  concatenation of independent bz2 streams (the first holds ``<siteinfo>``, each next one 100
  pages, the last the closing tag). A shard is a run of consecutive streams of about ``source.shard_size_mb`` compressed bytes
  (or ``options.streams_per_shard`` streams), read with range requests of its own bytes only and
  decompressed on its own, so shards run in parallel worker processes and ``s3://`` dumps are never
  downloaded whole. Stream offsets come from the ``*-multistream-index.txt.bz2`` next to the dump
  (``offset:page_id:title`` lines) or ``options.index``; without an index they are found by scanning
  the compressed bytes for stream headers (``BZh[1-9]`` + block magic) that sit right after the
  previous stream's end-of-stream marker (one pass over the compressed bytes at listing time: give
  the index for remote dumps). Wikimedia's partial dumps (``*-multistream1.xml-p1p41242.bz2``,
  with ``*-multistream-index1.txt-p1p41242.bz2``) are read the same way, and a folder of them is
  one source.
* **Single-stream** ``.xml.bz2``: one shard. Its bz2 blocks are bit-aligned and depend on the
  stream header, so it cannot be entered in the middle; it is decompressed as a stream.
* **Plain** ``.xml``: byte ranges of ``source.shard_size_mb``; a shard owns the pages whose
  ``<page>`` tag starts inside its range (the Hadoop line-reader rule, with ``<page>`` for a newline).

Shard ids are ``"<relative path>@<start>-<end>"`` (byte offsets in the file): stable for the same
file, index and shard size. What every shard needs from ``<siteinfo>`` (namespaces, base URL, the
declared encoding) is read once at listing time into ``Shard.extra``.

Parsing: a real XML parser (expat, through ``xml.etree.ElementTree.XMLPullParser``), fed
incrementally, each page's elements dropped once read, so memory stays flat on a 90 GB dump. Shards
that do not start at the top of the file are wrapped in a synthetic ``<mediawiki>`` root. UTF-8 and
UTF-16 (BOM) dumps, and any 8-bit encoding the XML declaration names, are parsed as declared. The
byte stream is cut at ``<page>`` tags before parsing so that one malformed page costs only itself:
the parser is restarted at the next page.

Pages: namespaces ``options.namespaces`` (default ``[0]``, articles); redirects are skipped and
counted, not errors; disambiguation pages are kept unless ``options.skip_disambiguation``. Each
page becomes a ``Document``: id = page id, title, text = clean plain text (see
``connectors.wikitext``), metadata ``revision_id``, ``timestamp``, ``url`` and ``_sections``
(``[char_offset, "Heading — Subheading"]`` for each heading line, for "Title — Section" context).
The last ``<revision>`` of a page is used (full-history dumps hold several).

Bad input never stops a shard: a corrupt or truncated bz2 stream, a malformed page, a page without
id or text, a namespace the dump does not declare, each become a ``BadRecord`` at ``"byte N"`` (the
start of the bz2 stream holding the page, or the page's own offset in a plain ``.xml``; for a
single-stream file the compressed block being read; for truncated data, where it ends), and every
page before the damage is kept. Reading resumes at the next bz2 stream after a corrupt one.

Memory is bounded whatever the compression ratio (a 1 KB bz2 bomb expands to gigabytes): bz2 output
is taken in pieces of a few MB, and a page larger than ``options.max_page_bytes`` (default 64 MiB)
is one ``BadRecord`` naming its id and title; its bytes are dropped up to the next ``<page>`` tag,
where reading goes on (likewise more than that before the first page: the document start is then
replaced by a synthetic one). A reader holds at most about ``max_page_bytes`` plus a few MB.
Redirects, pages of other namespaces and skipped disambiguation pages are not errors: they are
tallied in ``WikipediaConnector.counts`` with the pages and documents read.
"""

from __future__ import annotations

import bz2
import codecs
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, field_validator

from connectors.base import Connector, ConnectorError, FileOptions
from connectors.registry import register_connector
from connectors.wikitext import DEFAULT_DROP_SECTIONS, WikitextCleaner, is_disambiguation, is_redirect
from embedder.config import SourceConfig
from embedder.records import BadRecord, Document, Shard, UnchangedDocument
from embedder.storage import filesystem

_READ_BLOCK = 2 << 20  # compressed (or plain XML) bytes per range request
_FEED_BLOCK = 1 << 18  # compressed bytes per decompress call: bounds what damage costs
_OUT_BLOCK = 2 << 20  # decompressed bytes per piece: bounds what one call can expand to (a bz2 bomb)
_MAX_PAGE_BYTES = 64 << 20  # default options.max_page_bytes
_INDEX_LINE_LIMIT = 1 << 20  # an index line is offset:page_id:title (titles are at most 255 bytes)
_HEAD_LIMIT = 16 << 20  # how far <siteinfo> is looked for
_PROBE_BYTES = 4 << 20  # without an index: a second stream must show up here to call a file multistream
_SCAN_OVERLAP = 16

_STREAM_HEADER = re.compile(rb"BZh[1-9]1AY&SY")
_END_OF_STREAM = 0x177245385090  # bz2's 48-bit end-of-stream magic (sqrt(pi)), before a 32-bit CRC
_INDEX_LINE = re.compile(rb"^(\d+):", re.MULTILINE)
_INDEX_NAME = re.compile(r"-multistream-index(\d*)\.txt(-p\d+p\d+)?\.bz2$", re.IGNORECASE)
_PARTIAL_DUMP = re.compile(r"\.xml-p\d+p\d+\.bz2$", re.IGNORECASE)
_XML_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_PAGE_ID = re.compile(r"<id>\s*(\d+)\s*</id>")
_PAGE_TITLE = re.compile(r"<title>([^<]*)</title>")



@dataclass(slots=True, frozen=True)
class _Encoding:
    """How the dump's bytes are encoded, and the byte patterns the reader needs in that encoding."""

    declared: str  # the name to put in an XML declaration
    codec: str  # Python codec of the bytes after the BOM
    bom: bytes

    @property
    def unit(self) -> int:
        return 2 if self.codec.startswith("utf-16") else 1

    def encode(self, text: str) -> bytes:
        return text.encode(self.codec)

    def wrap_open(self) -> bytes:
        """A synthetic document start for bytes taken from the middle of the dump."""
        if self.codec == "utf-8":
            return b"<mediawiki>"
        return self.bom + self.encode(f'<?xml version="1.0" encoding="{self.declared}"?><mediawiki>')

    def decode(self, data: bytes) -> str:
        return data.decode(self.codec, errors="replace")


_UTF8 = _Encoding("UTF-8", "utf-8", b"")


def _detect_encoding(head: bytes) -> _Encoding:
    """The encoding of an XML document from its first bytes (BOM, then the XML declaration)."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ConnectorError("UTF-32 dumps are not supported by the XML parser: re-encode to UTF-8 (iconv)")
    if head.startswith(codecs.BOM_UTF8):
        return _UTF8
    if head.startswith(codecs.BOM_UTF16_LE) or head.startswith(b"<\x00?\x00"):
        return _Encoding("UTF-16", "utf-16-le", codecs.BOM_UTF16_LE)
    if head.startswith(codecs.BOM_UTF16_BE) or head.startswith(b"\x00<\x00?"):
        return _Encoding("UTF-16", "utf-16-be", codecs.BOM_UTF16_BE)
    match = _XML_DECLARATION.match(head)
    if match is None:
        return _UTF8
    declared = match.group(1).decode("ascii")
    try:
        codec = codecs.lookup(declared).name
    except LookupError:
        raise ConnectorError(f"the dump declares the unknown encoding {declared!r}") from None
    if codec in ("utf-8", "utf-8-sig", "ascii"):
        return _UTF8
    if codec.startswith(("utf-16", "utf-32")):
        raise ConnectorError(f"the dump declares {declared} but has no byte order mark: add one or re-encode to UTF-8")
    return _Encoding(declared, codec, b"")


@dataclass(slots=True, frozen=True)
class _SiteInfo:
    """What every shard needs from the dump's ``<siteinfo>``."""

    base_url: str | None  # e.g. "https://en.wikipedia.org/wiki/"
    namespaces: tuple[tuple[int, str], ...]  # empty when the dump has no <siteinfo>

    @classmethod
    def parse(cls, head: bytes, encoding: _Encoding) -> _SiteInfo:
        end_tag = encoding.encode("</siteinfo>")
        end = head.find(end_tag)
        if end < 0:
            return cls(None, ())
        parser = ET.XMLPullParser(events=("end",))
        parser.feed(head[: end + len(end_tag)])
        try:
            for _, elem in parser.read_events():
                if _local(elem.tag) == "siteinfo":
                    return cls._from_element(elem)
        except ET.ParseError:
            pass  # a broken header: the shard reading it reports the damage
        return cls(None, ())

    @classmethod
    def _from_element(cls, siteinfo: ET.Element) -> _SiteInfo:
        base_url = None
        namespaces: list[tuple[int, str]] = []
        for child in siteinfo.iter():
            name = _local(child.tag)
            if name == "base" and child.text:
                base_url = child.text.strip().rsplit("/", 1)[0] + "/"
            elif name == "namespace":
                try:
                    namespaces.append((int(child.get("key", "")), (child.text or "").strip()))
                except ValueError:
                    continue
        return cls(base_url, tuple(sorted(namespaces)))


@register_connector("wikipedia")
class WikipediaConnector(Connector):
    """Reads MediaWiki XML dumps: multistream/single-stream ``.xml.bz2`` and plain ``.xml``.

    Options (``source.options``):
        namespaces: Namespace numbers to keep (default ``[0]``, articles).
        skip_disambiguation: Drop disambiguation pages (default ``False``).
        index: Path or URL of the multistream index; default: the ``*-multistream-index.txt.bz2``
            next to the dump when it exists; ``False``: never use one (scan for streams).
        streams_per_shard: Streams per shard, instead of ``source.shard_size_mb`` of compressed bytes.
        drop_sections: Section headings removed with their subsections (default: References,
            External links, See also, Further reading, Notes...; ``[]`` keeps all).
        max_page_bytes: The largest ``<page>`` read, in decompressed bytes (default 64 MiB; the
            largest real articles are a few MB). A larger page is skipped with one quarantine
            record, so a bz2 bomb or a runaway page cannot take the worker's memory.

    ``counts`` tallies, per connector instance, what was read: ``pages``, ``documents``,
    ``redirects``, ``other_namespaces``, ``disambiguation``, ``bad``, ``unchanged``.

    Incremental runs: ``version_field`` is ``revision_id``; a page whose revision equals the one
    already embedded (``known_versions``) is yielded as ``UnchangedDocument`` before its markup is
    parsed.

    Example:
        >>> from embedder.config import SourceConfig
        >>> src = WikipediaConnector(SourceConfig(uri="enwiki-latest-pages-articles-multistream.xml.bz2"))
        >>> for shard in src.list_shards():  # doctest: +SKIP
        ...     for item in src.documents(shard): ...
    """

    class Options(FileOptions):
        namespaces: list[int] = Field([0], min_length=1, description="a list of integers (e.g. [0])")
        skip_disambiguation: bool = Field(False, description="true or false")
        index: str | Literal[False] | None = Field(None, description="a path/URL or false")
        streams_per_shard: int | None = Field(None, ge=1, description="a positive integer")
        drop_sections: list[str] = Field(list(DEFAULT_DROP_SECTIONS), description="a list of headings")
        max_page_bytes: int = Field(_MAX_PAGE_BYTES, ge=1, description="a positive integer")

        @field_validator("namespaces", mode="before")
        @classmethod
        def _one_namespace(cls, value: Any) -> Any:
            return [value] if isinstance(value, int) and not isinstance(value, bool) else value

        @field_validator("index")
        @classmethod
        def _index_not_empty(cls, value: Any) -> Any:
            if value == "":
                raise ValueError("empty")
            return value

    suffixes = (".xml", ".xml.bz2")
    version_field = "revision_id"
    label = "a MediaWiki XML dump"
    reads = frozenset({"mediawiki", "bz2"})
    compressed_suffixes = {"bz2": (".bz2",)}

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        options = self.options
        self.namespaces = frozenset(options.namespaces)
        self.skip_disambiguation = options.skip_disambiguation
        self.index = options.index
        self.streams_per_shard = options.streams_per_shard
        self.drop_sections = tuple(options.drop_sections)
        self.max_page_bytes = options.max_page_bytes
        self.counts: Counter[str] = Counter()

    # --- listing ------------------------------------------------------------------------------

    def list_shards(self) -> list[Shard]:
        files, index = self._dump_files()
        self.check_looks_like(files[0][0])
        shards: list[Shard] = []
        for path, size in files:
            if path.lower().endswith(".bz2"):
                shards.extend(self._bz2_shards(path, size, index, check=path == files[0][0]))
            else:
                shards.extend(self._xml_shards(path, size))
        return shards

    def _keeps(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        if base.startswith((".", "_")) or _INDEX_NAME.search(base):
            return False
        return base.lower().endswith(self.suffixes) or _PARTIAL_DUMP.search(base) is not None

    def _dump_files(self) -> tuple[list[tuple[str, int]], str | bool | None]:
        """The dumps to read, and the index option (a source given as the index reads its dump)."""
        index = self.index
        root = self.root
        if _INDEX_NAME.search(root.rsplit("/", 1)[-1]):
            dump = _INDEX_NAME.sub(lambda m: f"-multistream{m.group(1)}.xml{m.group(2) or ''}.bz2", root)
            if not self.fs.exists(dump):
                raise ConnectorError(f"source {self.config.uri!r} is a multistream index, but its dump {dump!r} does not exist")
            return [(dump, int(self.fs.size(dump) or 0))], (self.url(root) if index is None else index)
        files = self.list_files()
        if isinstance(index, str) and len(files) > 1:
            raise ConnectorError(
                f"option 'index' names one index but the source holds {len(files)} dumps; "
                "leave it unset so each dump uses the index next to it"
            )
        return files, index

    def _bz2_shards(
        self, path: str, size: int, index: str | bool | None, check: bool = False
    ) -> list[Shard]:
        url = self.url(path)
        head = _bz2_head(self.fs, url, size)
        if check:  # the source's first file: is it a dump once decompressed (not, say, bz2 JSONL)?
            self.check_looks_like(path, decompressed=head)
        encoding = _detect_encoding(head)
        site = _SiteInfo.parse(head, encoding)
        starts = self._stream_starts(path, url, size, index)
        layout = "multistream" if len(starts) > 1 else "bz2"
        extra = _extra(layout, encoding, site, size)
        rel = self.relative(path)
        bounds = starts + [size]
        shards: list[Shard] = []
        first = 0
        for i in range(1, len(bounds)):
            if i < len(bounds) - 1:
                if self.streams_per_shard is not None:
                    if i - first < self.streams_per_shard:
                        continue
                elif bounds[i] - bounds[first] < self.shard_bytes:
                    continue
            start, end = bounds[first], bounds[i]
            shards.append(Shard(f"{rel}@{start}-{end}", url, start, end, end - start, extra))
            first = i
        return shards

    def _stream_starts(self, path: str, url: str, size: int, index: str | bool | None) -> list[int]:
        """Byte offsets of the bz2 streams of a dump, 0 first."""
        index_url: str | None = None
        if isinstance(index, str):
            index_url = index
        elif index is None:
            sibling = _sibling_index(path)
            if sibling is not None and self.fs.exists(sibling):
                index_url = self.url(sibling)
        if index_url is not None:
            offsets = _index_offsets(index_url, self.config.storage_options)
        else:
            offsets = _scan_stream_starts(self.fs, url, 0, min(size, _PROBE_BYTES), verify=True)
            if len(offsets) > 1 and size > _PROBE_BYTES:
                last = offsets[-1]
                offsets += _scan_stream_starts(self.fs, url, last + 1, size, verify=True)
        return sorted({0, *(o for o in offsets if 0 <= o < size)})

    def _xml_shards(self, path: str, size: int) -> list[Shard]:
        url = self.url(path)
        head = _xml_head(self.fs, url, size)
        encoding = _detect_encoding(head)
        site = _SiteInfo.parse(head, encoding)
        extra = _extra("xml", encoding, site, size)
        rel = self.relative(path)
        step = self.shard_bytes
        step += step % encoding.unit
        starts = list(range(0, size, step)) or [0]
        return [
            Shard(f"{rel}@{start}-{min(start + step, size)}", url, start, min(start + step, size), min(step, size - start), extra)
            for start in starts
        ]

    # --- reading ------------------------------------------------------------------------------

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord]:
        layout = shard.get("layout")
        if layout == "xml":
            source = _xml_chunks(self.fs, shard.path, shard.start)
        elif layout in ("multistream", "bz2"):
            source = _bz2_chunks(self.fs, shard.path, shard.start, shard.end, by_stream=layout == "multistream")
        else:
            raise ConnectorError(f"shard {shard.id!r} was not listed by the wikipedia connector (layout {layout!r})")
        yield from _ShardReader(self, shard).run(source)


# --- shard extras -----------------------------------------------------------------------------


def _extra(layout: str, encoding: _Encoding, site: _SiteInfo, size: int) -> tuple[tuple[str, Any], ...]:
    return (
        ("layout", layout),
        ("encoding", encoding.declared),
        ("codec", encoding.codec),
        ("bom", encoding.bom.hex()),
        ("base_url", site.base_url),
        ("namespaces", site.namespaces),
        ("file_size", size),
    )


def _size_text(size: int) -> str:
    """``67108864`` → ``"64 MiB"``: a byte count as a user wrote it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _shard_encoding(shard: Shard) -> _Encoding:
    codec = shard.get("codec", "utf-8")
    if codec == "utf-8":
        return _UTF8
    return _Encoding(shard.get("encoding", codec), codec, bytes.fromhex(shard.get("bom", "")))


# --- byte sources -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Chunk:
    """Decompressed (or plain) bytes, and where they come from in the file.

    ``offset`` is the start of the bz2 stream that produced them, or for plain XML (``exact``) the
    file offset of ``data[0]``.
    """

    data: bytes
    offset: int
    exact: bool = False


@dataclass(slots=True)
class _Damage:
    """Compressed data that could not be decompressed; reading continues after it where it can."""

    offset: int
    reason: str


def _read_range(fs: Any, url: str, start: int, end: int) -> bytes:
    return fs.cat_file(url, start=start, end=end)


def _bz2_chunks(fs: Any, url: str, start: int, end: int, by_stream: bool = True) -> Iterator[_Chunk | _Damage]:
    """Decompresses the bz2 streams in ``[start, end)``, reading only that byte range.

    Yields the output of each stream as it comes, a ``_Damage`` for a corrupt stream (then goes on
    at the next stream header) and for data that ends inside a stream (a truncated file). Chunks
    are located by the start of their stream (``by_stream``), else by the compressed block read.
    """
    decompressor = bz2.BZ2Decompressor()
    fed = False
    stream_start = start
    position = start  # next file byte to read
    data = b""
    data_at = start  # file offset of data[0]
    while True:
        if not data:
            if position >= end:
                break
            data = _read_range(fs, url, position, min(end, position + _READ_BLOCK))
            if not data:
                break  # the file is shorter than the shard: truncated
            data_at = position
            position += len(data)
        feed, data = data[:_FEED_BLOCK], data[_FEED_BLOCK:]
        feed_at = data_at
        data_at += len(feed)
        # At most _OUT_BLOCK bytes per call: a few compressed bytes can expand to gigabytes, so
        # the output is drained piece by piece until the decompressor needs input again.
        error: OSError | None = None
        try:
            out = decompressor.decompress(feed, _OUT_BLOCK)
        except OSError as err:
            error = err
        while error is None:
            fed = True  # this stream has started: ending here is a truncation
            if out:
                yield _Chunk(out, stream_start if by_stream else feed_at)
            if decompressor.eof or decompressor.needs_input:
                break
            try:
                out = decompressor.decompress(b"", _OUT_BLOCK)
            except OSError as err:
                error = err
        if error is not None:
            yield _Damage(
                stream_start,
                f"corrupt bz2 stream at byte {stream_start} ({error}); its remaining pages are lost, "
                "reading resumes at the next stream",
            )
            resume = _scan_stream_starts(fs, url, stream_start + 1, end, verify=False, first_only=True)
            if not resume:
                return
            stream_start = position = resume[0]
            decompressor, fed, data = bz2.BZ2Decompressor(), False, b""
            continue
        if decompressor.eof:
            unused = decompressor.unused_data
            stream_start = feed_at + len(feed) - len(unused)
            decompressor, fed = bz2.BZ2Decompressor(), False
            data, data_at = unused + data, stream_start
    if fed:
        yield _Damage(
            position,
            f"the bz2 stream starting at byte {stream_start} ends at byte {position} before its "
            "end-of-stream marker: the file is truncated (or the index does not match this dump)",
        )


def _xml_chunks(fs: Any, url: str, start: int) -> Iterator[_Chunk]:
    """The plain XML file from ``start`` to its end, block by block (the reader stops early)."""
    position = start
    while True:
        data = _read_range(fs, url, position, position + _READ_BLOCK)
        if not data:
            return
        yield _Chunk(data, position, exact=True)
        position += len(data)


def _bz2_head(fs: Any, url: str, size: int) -> bytes:
    """The decompressed start of a dump, through ``</siteinfo>`` (or the first page)."""
    out = bytearray()
    for chunk in _bz2_chunks(fs, url, 0, size):
        if isinstance(chunk, _Damage):
            break
        out += chunk.data
        if len(out) >= _HEAD_LIMIT or _head_complete(out):
            break
    return bytes(out)


def _xml_head(fs: Any, url: str, size: int) -> bytes:
    out = bytearray()
    for chunk in _xml_chunks(fs, url, 0):
        out += chunk.data
        if len(out) >= _HEAD_LIMIT or _head_complete(out):
            break
    return bytes(out)


def _head_complete(head: bytearray) -> bool:
    try:
        encoding = _detect_encoding(bytes(head[:256]))
    except ConnectorError:
        return True
    return encoding.encode("</siteinfo>") in head or encoding.encode("<page>") in head


def _stream_footer_before(data: bytes, pos: int) -> bool:
    """True when the 80-bit end-of-stream marker + CRC of a bz2 stream ends right before ``pos``
    (followed by 0-7 padding bits): then ``pos`` is where the previous stream ended."""
    if pos < 11:
        return False
    value = int.from_bytes(data[pos - 11 : pos], "big")
    return any((value >> (pad + 32)) & 0xFFFFFFFFFFFF == _END_OF_STREAM for pad in range(8))


def _scan_stream_starts(
    fs: Any, url: str, start: int, end: int, *, verify: bool, first_only: bool = False
) -> list[int]:
    """Offsets in ``[start, end)`` where a bz2 stream starts (offset 0 always counts).

    With ``verify``, a header counts only right after the previous stream's end-of-stream marker,
    so compressed bytes that happen to look like a header are not taken for one.
    """
    found: list[int] = []
    position = max(0, start - _SCAN_OVERLAP)
    carry = b""
    carry_at = position
    while position < end:
        block = _read_range(fs, url, position, min(end + 10, position + _READ_BLOCK))
        if not block:
            break
        data = carry + block
        data_at = carry_at
        for match in _STREAM_HEADER.finditer(data):
            offset = data_at + match.start()
            if offset < start or offset >= end or (found and offset <= found[-1]):
                continue
            if offset == 0 or not verify or _stream_footer_before(data, match.start()):
                found.append(offset)
                if first_only:
                    return found
        position += len(block)
        carry = data[-_SCAN_OVERLAP:]
        carry_at = data_at + len(data) - len(carry)
    return found


def _sibling_index(path: str) -> str | None:
    """``X-multistream.xml.bz2`` → ``X-multistream-index.txt.bz2`` (also for partial dumps
    ``X-multistream1.xml-p1p41242.bz2`` → ``X-multistream-index1.txt-p1p41242.bz2``)."""
    folder, _, name = path.rpartition("/")
    new = re.sub(r"multistream(\d*)\.xml", r"multistream-index\1.txt", name, count=1, flags=re.IGNORECASE)
    if new == name:
        return None
    return f"{folder}/{new}" if folder else new


def _index_offsets(index_url: str, storage_options: dict[str, Any]) -> list[int]:
    """The distinct stream offsets of a multistream index (``offset:page_id:title`` lines)."""
    fs, path = filesystem(index_url, storage_options)
    if not fs.exists(path):
        raise ConnectorError(f"the multistream index {index_url!r} does not exist: fix options.index or remove it")
    offsets: list[int] = []
    last = -1
    tail = b""
    with fs.open(path, "rb") as raw, bz2.open(raw, "rb") as f:
        while True:
            block = f.read(8 << 20)
            if not block:
                break
            block = tail + block
            cut = block.rfind(b"\n") + 1
            tail = block[cut:]
            if len(tail) > _INDEX_LINE_LIMIT:  # not an index (or a bz2 bomb): do not gather it whole
                raise ConnectorError(
                    f"the multistream index {index_url!r} has a line longer than {_size_text(_INDEX_LINE_LIMIT)}: "
                    "it is not an index of 'offset:page_id:title' lines; fix options.index or set it to false"
                )
            for value in map(int, _INDEX_LINE.findall(block, 0, cut)):
                if value != last:
                    offsets.append(value)
                    last = value
        if tail:
            match = _INDEX_LINE.match(tail)
            if match and int(match.group(1)) != last:
                offsets.append(int(match.group(1)))
    if not offsets:
        raise ConnectorError(f"the multistream index {index_url!r} holds no 'offset:page_id:title' lines")
    return offsets


# --- parsing ----------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag[tag.rfind("}") + 1 :]


class _ShardReader:
    """Turns one shard's bytes into documents: cuts them at ``<page>`` tags, feeds the pieces to an
    incremental XML parser, and converts each finished ``<page>`` element."""

    def __init__(self, connector: WikipediaConnector, shard: Shard) -> None:
        self.connector = connector
        self.shard = shard
        self.encoding = _shard_encoding(shard)
        self.marker = self.encoding.encode("<page>")
        self.file_size = int(shard.get("file_size", 0))
        self.layout = shard.get("layout")
        namespaces = tuple(tuple(p) for p in shard.get("namespaces", ()))
        self.declared_namespaces = {int(k) for k, _ in namespaces}
        self.namespace_prefixes = {name.lower(): int(k) for k, name in namespaces if name}
        names = dict(namespaces)
        self.cleaner = WikitextCleaner(
            file_namespaces=[names.get(6, ""), names.get(-2, ""), names.get(14, "")],
            site_namespaces=[name for _, name in namespaces],
            drop_sections=connector.drop_sections,
        )
        base = shard.get("base_url")
        self.base_url = base
        self.parser: ET.XMLPullParser | None = None
        self.root: ET.Element | None = None
        self.wrap_next = shard.start != 0  # the first parser reads the real document start

    # The parser ------------------------------------------------------------------------------

    def _new_parser(self) -> ET.XMLPullParser:
        parser = ET.XMLPullParser(events=("start", "end"))
        if self.wrap_next:
            parser.feed(self.encoding.wrap_open())
        self.wrap_next = True
        self.root = None
        return parser

    def _feed(self, data: bytes) -> tuple[list[ET.Element], ET.ParseError | None]:
        """Feeds bytes; returns the ``<page>`` elements they completed, and the error that stopped them."""
        if self.parser is None:
            self.parser = self._new_parser()
        self.parser.feed(data)
        pages: list[ET.Element] = []
        try:
            for event, elem in self.parser.read_events():
                if event == "start":
                    if self.root is None:
                        self.root = elem
                elif _local(elem.tag) == "page":
                    pages.append(elem)
        except ET.ParseError as err:
            self.parser = None
            return pages, err
        return pages, None

    # The loop --------------------------------------------------------------------------------

    def run(self, source: Iterator[_Chunk | _Damage]) -> Iterator[Document | BadRecord]:
        shard = self.shard
        marker, unit = self.marker, self.encoding.unit
        limit = self.connector.max_page_bytes
        stop = shard.end if self.layout == "xml" and 0 <= shard.end < self.file_size else None
        # Bytes are dropped up to the next <page> tag: before a plain XML shard's first page (the
        # previous shard owns them), and after a piece larger than max_page_bytes.
        dropping = self.layout == "xml" and shard.start > 0
        pending = bytearray()  # bytes from the last <page> tag (or the shard start) on
        pending_page = False  # pending starts with a <page> tag
        pending_at = shard.start  # the location reported for pending
        origin = 0  # offset of pending[0] in the decompressed stream (for UTF-16 alignment)
        for item in source:
            if isinstance(item, _Damage):
                # What was read before the damage still counts: the last page of the previous
                # stream is whole; a page cut by the damage is named in the record.
                page_id = title = None
                if pending and not dropping:
                    whole = yield from self._piece(bytes(pending), pending_at, pending_page, damaged=True)
                    if not whole:
                        page_id, title = self._peek(pending)
                lost = f"; page {page_id} ({title!r}) was cut by the damage" if page_id else ""
                self.connector.counts["bad"] += 1
                yield BadRecord(shard.id, f"byte {item.offset}", item.reason + lost, doc_id=page_id)
                pending, pending_page, origin, dropping = bytearray(), False, 0, False
                self.parser = None
                continue
            base = item.offset - len(pending)
            search = max(1 if pending_page else 0, len(pending) - len(marker) + 1)
            pending += item.data  # appended in place: a long page is not copied once per chunk
            data = pending
            cut = 0
            while True:
                found = data.find(marker, search)
                if found < 0:
                    break
                if unit > 1 and (origin + found) % unit:
                    search = found + 1
                    continue
                if dropping:
                    dropping = False
                elif found - cut > limit:
                    yield self._oversized(data, cut, pending_at, pending_page)
                elif found > cut:
                    yield from self._piece(bytes(data[cut:found]), pending_at, pending_page)
                cut, pending_page = found, True
                pending_at = base + found if item.exact else item.offset
                if stop is not None and pending_at >= stop:
                    yield from self._finish(at_file_end=False)
                    return
                search = found + len(marker)
            if not dropping and len(data) - cut > limit:
                yield self._oversized(data, cut, pending_at, pending_page)
                dropping = True
            if dropping:  # keep only what could be the start of a <page> tag cut by the chunk end
                cut = max(cut, len(data) - len(marker) + 1)
                pending_page = False
            del pending[:cut]
            origin += cut
        if pending and not dropping:
            yield from self._piece(bytes(pending), pending_at, pending_page)
        # The source is exhausted: a plain XML shard has read to the end of the file; a bz2 shard
        # holds the end of the document when its range ends the file (unless it was dropped with
        # an oversized last page: then the document is closed here).
        at_end = self.layout == "xml" or shard.end < 0 or shard.end >= self.file_size
        yield from self._finish(at_file_end=at_end and not dropping)

    def _oversized(self, data: bytearray, cut: int, at: int, is_page: bool) -> BadRecord:
        """The record for a piece larger than ``max_page_bytes``, whose bytes are then dropped up to
        the next ``<page>`` tag. The parser carries on at that tag: it has seen nothing of the
        piece, unless the piece is the document start, which is then replaced by a synthetic one."""
        self.connector.counts["bad"] += 1
        size = _size_text(self.connector.max_page_bytes)
        head = bytes(data[cut : cut + 4096])
        fix = "raise source.options.max_page_bytes to read it"
        if not is_page:
            self.parser, self.wrap_next = None, True
            return BadRecord(
                self.shard.id,
                f"byte {at}",
                f"more than max_page_bytes ({size}) before the first <page>: skipped; {fix}",
                snippet=self._snippet(head),
            )
        page_id, title = self._peek(head)
        name = f"page {page_id} ({title!r})" if page_id else "page"
        return BadRecord(
            self.shard.id,
            f"byte {at}",
            f"{name} larger than max_page_bytes ({size}): skipped; {fix}",
            doc_id=page_id,
            snippet=self._snippet(head),
        )

    def _piece(
        self, piece: bytes, at: int, is_page: bool, damaged: bool = False
    ) -> Generator[Document | BadRecord, None, bool]:
        """Parses one piece: a whole ``<page>`` element (plus what follows it up to the next one),
        or the bytes before the first page (the document start, or whitespace).

        Returns:
            Whether the piece parsed whole. A piece cut short by ``damaged`` data is not reported
            here (the damage record names it).
        """
        pages, error = self._feed(piece)
        for page in pages:
            item = self._page_item(page, at)
            if item is not None:
                yield item
        if self.root is not None:
            self.root.clear()  # drop the finished pages: memory stays flat
        if error is None and (pages or not is_page):
            return True
        self.parser = None
        if damaged:
            return False
        self.connector.counts["bad"] += 1
        page_id, title = self._peek(piece)
        if pages:  # the page parsed; what follows it up to the next page did not
            where = f"the bytes after page {page_id} ({title!r})"
            page_id = None
        else:
            where = f"page {page_id} ({title!r})" if page_id else "the bytes before the first page"
        reason = (
            f"malformed XML in {where}: {error}"
            if error is not None
            else f"malformed XML in {where}: its <page> element is not closed before the next page"
        )
        yield BadRecord(self.shard.id, f"byte {at}", reason, doc_id=page_id, snippet=self._snippet(piece))
        return False

    def _finish(self, at_file_end: bool) -> Iterator[BadRecord]:
        """Closes the parser: a shard that ends the file must end the document (``</mediawiki>``)."""
        if self.parser is None:
            return
        parser, self.parser = self.parser, None
        try:
            if not at_file_end:
                parser.feed(self.encoding.encode("</mediawiki>"))
            parser.close()
            for _ in parser.read_events():
                pass
        except ET.ParseError as err:
            self.connector.counts["bad"] += 1
            yield BadRecord(
                self.shard.id,
                f"byte {self.shard.end if self.shard.end >= 0 else self.file_size}",
                f"the dump ends without closing its XML ({err}): the file is truncated",
            )

    # Pages -----------------------------------------------------------------------------------

    def _page_item(self, page: ET.Element, at: int) -> Document | BadRecord | UnchangedDocument | None:
        """A finished ``<page>`` element as a Document, a BadRecord, or None (skipped on purpose)."""
        counts = self.connector.counts
        counts["pages"] += 1
        title = ns_text = page_id = None
        redirect = False
        revision = None
        for child in page:
            name = _local(child.tag)
            if name == "title":
                title = child.text
            elif name == "ns":
                ns_text = child.text
            elif name == "id":
                page_id = child.text
            elif name == "redirect":
                redirect = True
            elif name == "revision":
                revision = child
        location = f"byte {at}"
        shard_id = self.shard.id
        if page_id is None or not page_id.strip().isdigit():
            counts["bad"] += 1
            return BadRecord(shard_id, location, "page without a numeric <id>", snippet=f"title: {title!r}")
        page_id = page_id.strip()
        if not title or not title.strip():
            counts["bad"] += 1
            return BadRecord(shard_id, location, "page without a <title>", doc_id=page_id)
        if ns_text is None:
            prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
            ns = self.namespace_prefixes.get(prefix, 0)
        else:
            try:
                ns = int(ns_text)
            except ValueError:
                counts["bad"] += 1
                return BadRecord(shard_id, location, f"<ns> is not a number: {ns_text!r}", doc_id=page_id)
        if self.declared_namespaces and ns not in self.declared_namespaces:
            counts["bad"] += 1
            return BadRecord(
                shard_id, location, f"namespace {ns} is not declared in the dump's <siteinfo><namespaces>", doc_id=page_id
            )
        if ns not in self.connector.namespaces:
            counts["other_namespaces"] += 1
            return None
        if redirect:
            counts["redirects"] += 1
            return None
        revision_id = timestamp = text = None
        if revision is not None:
            for child in revision:
                name = _local(child.tag)
                if name == "id":
                    revision_id = child.text
                elif name == "timestamp":
                    timestamp = child.text
                elif name == "text":
                    text = child.text
        if not text or not text.strip():
            counts["bad"] += 1
            return BadRecord(shard_id, location, "page has no text (empty or missing <revision><text>)", doc_id=page_id)
        if is_redirect(text):
            counts["redirects"] += 1
            return None
        if self.connector.skip_disambiguation and is_disambiguation(title, text):
            counts["disambiguation"] += 1
            return None
        if revision_id and self.connector.is_unchanged(page_id, revision_id.strip()):
            counts["unchanged"] += 1  # incremental run: same revision as embedded, markup never parsed
            return UnchangedDocument(page_id)
        try:
            clean = self.cleaner.clean(text)
        except Exception as err:  # a parser failure on one page must not stop the shard
            counts["bad"] += 1
            return BadRecord(shard_id, location, f"wikitext could not be parsed: {type(err).__name__}: {err}", doc_id=page_id)
        if not clean.text:
            counts["bad"] += 1
            return BadRecord(
                shard_id, location, "no text left after removing markup (templates, tables, links only)", doc_id=page_id
            )
        counts["documents"] += 1
        revision_id = revision_id.strip() if revision_id else None
        metadata = {
            "revision_id": int(revision_id) if revision_id and revision_id.isdigit() else None,
            "timestamp": timestamp.strip() if timestamp else None,
            "url": self._url(title),
            "_sections": clean.sections,
        }
        return Document(id=page_id, text=clean.text, title=title, metadata=metadata, location=location)

    def _url(self, title: str) -> str | None:
        if not self.base_url:
            return None
        return self.base_url + quote(title.strip().replace(" ", "_"), safe=";@$!*(),/~:")

    def _peek(self, piece: bytes) -> tuple[str | None, str | None]:
        """Page id and title of a (possibly broken) page, for the quarantine record."""
        text = self.encoding.decode(piece[:4096])
        page_id = _PAGE_ID.search(text)
        title = _PAGE_TITLE.search(text)
        return (page_id.group(1) if page_id else None, title.group(1) if title else None)

    def _snippet(self, piece: bytes) -> str:
        text = self.encoding.decode(piece[:300]).strip()
        return text if len(piece) <= 300 else text + "…"
