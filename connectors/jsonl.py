"""JSON Lines sources: one JSON object per line, plain or gzip/zstd-compressed, local or on object storage.

Sharding. A plain file larger than ``source.shard_size_mb`` is cut into byte ranges; the shard
``[start, end)`` owns every line that *starts* inside it (the Hadoop ``LineRecordReader`` rule: skip
the partial first line unless ``start == 0``, read past ``end`` to finish the last line), so the
shards of a file together yield each line exactly once, in file order. A compressed file cannot be
entered in the middle and is always one shard. Shard ids are the path relative to the source root
(``"docs/a.jsonl"``) for a one-shard file and ``"docs/a.jsonl@<start>-<end>"`` for a byte range:
they only change when the file's size or the shard size does.

Positions are byte offsets, not line numbers. Numbering lines would make every shard count the
newlines of everything before it (quadratic in the file size); a byte offset is known for free.
So a bad line is reported at ``"byte N"`` (its first byte, counted in the decompressed stream for
``.gz``/``.zst``; ``tail -c +$((N+1)) FILE | head -1`` prints it), and a record without the
configured id field (or with a null id) gets the stable synthetic id ``"<relative path>@<N>"``.

Bad input never stops the shard: malformed JSON, JSON nested too deep for the parser, a line that is
not an object, invalid UTF-8 and records without usable text each become a ``BadRecord`` and reading goes on with the next line. A
damaged compressed stream keeps every complete line before the damage and ends with one
``BadRecord`` naming it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from connectors.base import Connector, FileOptions
from connectors.registry import register_connector
from embedder.records import BadRecord, Document, Shard

_PLAIN_SUFFIXES = (".jsonl", ".ndjson", ".json")
_GZIP_SUFFIXES = tuple(s + ".gz" for s in _PLAIN_SUFFIXES)
_ZSTD_SUFFIXES = tuple(s + ext for s in _PLAIN_SUFFIXES for ext in (".zst", ".zstd"))

_READ_BLOCK = 1 << 20  # bytes of file read per call (plain files)
_FETCH_BLOCK = 4 << 20  # read-ahead of remote files: a shard reads at most this much past its end
_COMPRESSED_BLOCK = 1 << 18  # compressed bytes fed to the decoder per call (bounds its output)
_BOM = b"\xef\xbb\xbf"


@register_connector("jsonl")
class JsonlConnector(Connector):
    """Reads ``.jsonl``/``.ndjson``/``.json`` files (one object per line), optionally ``.gz``/``.zst``.

    Fields come from ``source.id_field``, ``text_field``, ``title_field`` and ``metadata_fields``.

    Example:
        >>> from connectors.registry import CONNECTORS
        >>> from embedder.config import SourceConfig
        >>> src = CONNECTORS.get("jsonl")(SourceConfig(uri="s3://corpus/docs/", shard_size_mb=64))
        >>> for shard in src.list_shards():  # doctest: +SKIP
        ...     for item in src.documents(shard): ...
    """

    Options = FileOptions

    suffixes = _PLAIN_SUFFIXES + _GZIP_SUFFIXES + _ZSTD_SUFFIXES
    label = "JSONL"
    reads = frozenset({"json", "text", "gzip", "zstd"})  # text: a bad first line, quarantined
    compressed_suffixes = {"gzip": (".gz",), "zstd": (".zst", ".zstd")}

    def list_shards(self) -> list[Shard]:
        shards: list[Shard] = []
        step = self.shard_bytes
        files = self.list_files()
        self.check_looks_like(files[0][0])
        for path, size in files:
            rel = self.relative(path)
            extra = (("relative_path", rel),)
            if _compression(path) is not None or size <= step:
                shards.append(
                    Shard(id=rel, path=self.url(path), start=0, end=-1, size_bytes=size, extra=extra)
                )
                continue
            for start in range(0, size, step):
                end = min(start + step, size)
                shards.append(
                    Shard(
                        f"{rel}@{start}-{end}",
                        self.url(path),
                        start,
                        end,
                        size_bytes=end - start,
                        extra=extra,
                    )
                )
        return shards

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord]:
        rel = shard.get("relative_path", shard.id)
        compression = _compression(shard.path)
        # A bounded read-ahead block: fsspec's default (50 MB on s3fs) would fetch far past a shard's end.
        with self.fs.open(shard.path, "rb", block_size=_FETCH_BLOCK) as f:
            if compression is None:
                first = _first_line(f, shard.start)
                if first is not None:
                    offset, head = first
                    yield from self._records(_lines(_blocks(f, head), offset, shard.end), shard, rel)
                return
            position = [0]  # where the next line starts: the damage report points there
            try:
                lines = _lines(_decompressed_blocks(f, compression), 0, -1)
                yield from self._records(_tracking(lines, position), shard, rel)
            except (EOFError, zlib.error, _zstd_error()) as err:
                yield BadRecord(
                    shard.id,
                    f"byte {position[0]}",
                    f"damaged {compression} stream: {err}; the lines before it were kept",
                )

    def _records(
        self, lines: Iterable[tuple[int, bytes]], shard: Shard, rel: str
    ) -> Iterator[Document | BadRecord]:
        """Parses lines into documents; each bad line becomes a BadRecord."""
        for offset, raw in lines:
            if offset == 0 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline pair) are not records
            location = f"byte {offset}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRecord(
                    shard.id,
                    location,
                    f"invalid UTF-8 at byte {err.start} of the line: {err.reason}",
                    snippet=_snippet(raw),
                )
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield BadRecord(
                    shard.id,
                    location,
                    f"malformed JSON: {err.msg} at column {err.colno}",
                    snippet=_snippet(raw),
                )
                continue
            except RecursionError:  # e.g. "[[[[..." 1,000 deep: the parser's stack, not the shard, gives up
                yield BadRecord(
                    shard.id,
                    location,
                    "JSON nested too deep to parse (the parser's recursion limit); flatten the record",
                    snippet=_snippet(raw),
                )
                continue
            if not isinstance(record, dict):
                yield BadRecord(
                    shard.id,
                    location,
                    f"the line is a JSON {_json_type(record)}, not an object",
                    snippet=_snippet(raw),
                )
                continue
            yield self.make_document(record, shard, location, default_id=f"{rel}@{offset}")


def _compression(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _first_line(f: BinaryIO, start: int) -> tuple[int, bytes] | None:
    """Positions ``f`` at the first line starting at or after ``start``.

    Reads from the byte before ``start``: if it is a newline, a line starts exactly at ``start``;
    otherwise the partial line belongs to the previous shard and is skipped.

    Returns:
        The line's offset and the bytes already read past it, or None when the file ends first.
    """
    if start == 0:
        return 0, b""
    f.seek(start - 1)
    offset = start - 1
    while True:
        block = f.read(_READ_BLOCK)
        if not block:
            return None
        newline = block.find(b"\n")
        if newline >= 0:
            return offset + newline + 1, block[newline + 1 :]
        offset += len(block)


def _blocks(f: BinaryIO, head: bytes) -> Iterator[bytes]:
    """``head``, then the rest of ``f`` block by block."""
    if head:
        yield head
    while block := f.read(_READ_BLOCK):
        yield block


def _lines(blocks: Iterable[bytes], offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for each line starting before ``end`` (``-1``: no end).

    The ``\n`` is removed; a ``\r`` before it is kept (it is JSON whitespace), so a line's length
    plus one is always where the next line starts.
    """
    buffer = bytearray()
    scanned = 0  # bytes of buffer known to hold no newline
    for block in blocks:
        buffer += block
        begin = 0
        while True:
            newline = buffer.find(b"\n", max(begin, scanned))
            if newline < 0:
                break
            if end >= 0 and offset >= end:
                return
            yield offset, bytes(buffer[begin:newline])
            offset += newline + 1 - begin
            begin = newline + 1
        del buffer[:begin]
        scanned = len(buffer)
        if end >= 0 and offset >= end:
            return
    if buffer and (end < 0 or offset < end):
        yield offset, bytes(buffer)


def _decompressed_blocks(f: BinaryIO, compression: str) -> Iterator[bytes]:
    """Decompressed blocks of a gzip or zstd file, across concatenated members/frames.

    Raises:
        EOFError: when the file ends inside a member or frame (a truncated file).
    """
    new_decoder: Callable[[], Any]
    if compression == "gzip":
        new_decoder = lambda: zlib.decompressobj(wbits=31)  # noqa: E731  (31: gzip wrapper, checks the CRC)
    else:
        import zstandard

        new_decoder = zstandard.ZstdDecompressor().decompressobj
    decoder = None
    while True:
        data = f.read(_COMPRESSED_BLOCK)
        if not data:
            break
        while data:
            if decoder is None:
                decoder = new_decoder()
            out = decoder.decompress(data)
            if out:
                yield out
            if decoder.eof:  # end of a member/frame: the rest, if any, starts the next one
                data = decoder.unused_data
                decoder = None
            else:
                data = b""
    if decoder is not None:
        if compression == "gzip":
            tail = decoder.flush()
            if tail:
                yield tail
        raise EOFError(
            f"the file ends inside a {compression} {'member' if compression == 'gzip' else 'frame'} (truncated?)"
        )


def _tracking(lines: Iterable[tuple[int, bytes]], position: list[int]) -> Iterator[tuple[int, bytes]]:
    """Passes lines through, remembering where the next line starts (for damage reports)."""
    for offset, line in lines:
        yield offset, line
        position[0] = offset + len(line) + 1


def _zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:  # zstandard is a dependency; without it .zst files fail to open anyway
        return EOFError
    return zstandard.ZstdError


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return text if len(raw) <= limit else text + "…"
