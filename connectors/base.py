"""The connector contract: list shards, read one shard.

A connector implements two methods, ``list_shards`` and ``read_shard``; this base class owns the
rest: finding files through fsspec, mapping record fields to ``Document``, and the error policy —
bad records and unreadable files become ``BadRecord``s (quarantined by the runner) instead of
exceptions, so bad input never kills a job.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedder.config import SourceConfig
from embedder.errors import UsageError
from embedder.records import BadRecord, Document, Shard, UnchangedDocument
from embedder.storage import filesystem


class ConnectorError(UsageError, ValueError):
    """The source cannot be read at all (wrong path, nothing to read): a usage error."""


class ConnectorOptions(BaseModel):
    """``source.options`` of a connector, validated when the connector is built: each built-in
    connector declares its own subclass as ``Options`` (a field's description says what it must be,
    for the error message). A plugin connector without ``Options`` gets its options unvalidated.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FileOptions(ConnectorOptions):
    """Options of every connector that reads files (folders and globs of them)."""

    follow_links: bool = Field(False, description="true or false")
    """Folders and globs: admit symbolic links that point out of the source root."""


def validate_options(name: str, options_class: type[ConnectorOptions], raw: Mapping[str, Any]) -> ConnectorOptions:
    """``raw`` (``source.options``) as ``options_class``.

    Raises:
        ConnectorError: an unknown key (listing the valid ones) or a value of the wrong kind
            (naming what it must be).
    """
    shared = FileOptions.model_fields if issubclass(options_class, FileOptions) else {}
    fields = [*(f for f in options_class.model_fields if f not in shared), *shared]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConnectorError(f"unknown {name} option(s) {', '.join(map(repr, unknown))}. Valid: {', '.join(fields)}")
    try:
        return options_class.model_validate(dict(raw))
    except ValidationError as err:
        field = str(err.errors()[0]["loc"][0])
        must = options_class.model_fields[field].description or "valid"
        raise ConnectorError(f"{name} option {field!r} must be {must}, not {raw.get(field)!r}") from None


log = logging.getLogger("embedder.connectors")
_SURROGATE = re.compile("[\ud800-\udfff]")

SNIFF_BYTES = 4096
"""Bytes read from the start of a source's first file to tell what format it is."""


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the first bytes of a file say it is.

    Attributes:
        kind: ``parquet``, ``bz2``, ``gzip``, ``zstd``, ``mediawiki`` (a MediaWiki XML dump), ``xml``,
            ``json`` (an object per line) or ``text`` (other UTF-8 text).
        looks_like: For messages: ``"a Parquet file"``.
        evidence: For messages: ``"starts with PAR1"``.
    """

    kind: str
    looks_like: str
    evidence: str


_MAGIC = (
    (b"PAR1", "parquet", "a Parquet file", "starts with PAR1"),
    (b"BZh", "bz2", "a bz2-compressed file", "starts with BZh"),
    (b"\x1f\x8b", "gzip", "a gzip-compressed file", "starts with 1f 8b"),
    (b"\x28\xb5\x2f\xfd", "zstd", "a zstd-compressed file", "starts with 28 b5 2f fd"),
)

_FORMAT_FOR = {
    "parquet": "use --format parquet",
    "bz2": "use --format wikipedia for a Wikipedia .xml.bz2 dump; decompress other data (or recompress it: "
    "--format jsonl reads .gz and .zst)",
    "gzip": "use --format jsonl for gzip-compressed JSON Lines (.jsonl.gz)",
    "zstd": "use --format jsonl for zstd-compressed JSON Lines (.jsonl.zst)",
    "mediawiki": "use --format wikipedia",
    "xml": "use --format text",
    "json": "use --format jsonl",
    "text": "use --format text",
}
"""The fix for a file of each sniffed kind given to a connector that does not read it."""


def sniff(head: bytes) -> Sniffed | None:
    """Tells a file's format from its first bytes (``SNIFF_BYTES`` of them is plenty).

    Returns None for bytes it does not recognize (e.g. a damaged file), so callers leave those to
    the reading, whose error policy quarantines them.
    """
    for magic, kind, looks_like, evidence in _MAGIC:
        if head.startswith(magic):
            return Sniffed(kind, looks_like, evidence)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (XML dumps may be)
        text = head.decode("utf-16", errors="ignore").encode("utf-8")
    elif b"\x00" in head:
        return None
    else:
        text = head.removeprefix(b"\xef\xbb\xbf")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(text) - 3:  # not just a character cut at the end of the sample
            return None
    start = text.lstrip()
    if start.startswith(b"<"):
        if b"<mediawiki" in start:
            return Sniffed("mediawiki", "a MediaWiki XML dump", "its root element is <mediawiki>")
        return Sniffed("xml", "an XML file", "starts with '<'")
    if start.startswith(b"{"):
        return Sniffed("json", "JSON Lines", "starts with '{'")
    return Sniffed("text", "a text file", "its first bytes are UTF-8 text")


class Connector(ABC):
    """Base class of every source format.

    Subclasses set ``suffixes`` (file endings kept when the source is a folder or glob) and
    implement ``list_shards`` and ``read_shard``.

    Args:
        config: The job's ``source`` section.
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    version_field: ClassVar[str | None] = None
    """Metadata field with a document version known before the text is parsed (Wikipedia:
    ``revision_id``). Incremental runs set ``known_versions`` (document id → version already
    embedded) and the connector yields ``UnchangedDocument`` for documents whose version is the same."""
    label: ClassVar[str] = ""
    """The format in messages: ``"JSONL"``."""
    reads: ClassVar[frozenset[str]] = frozenset()
    """The ``Sniffed.kind``s this connector reads; ``check_looks_like`` refuses the others (empty: none)."""
    compressed_suffixes: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Compressions read only from files named so (``{"gzip": (".gz",)}``): the name picks the decoder."""
    Options: ClassVar[type[ConnectorOptions] | None] = None
    """The model of ``source.options`` (None: a plugin's options pass unvalidated, as ``self.config.options``)."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.options = validate_options(self.name or type(self).__name__, self.Options, config.options) if self.Options else None
        self.known_versions: Mapping[str, str] | None = None
        self.shard_bytes_override: int | None = None  # the runner's shard plan (embedder.pipeline.read.plan_shards)
        self.fs, self.root = filesystem(config.uri, config.storage_options)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._prefix = "" if protocol in ("file", "local") else f"{protocol}://"

    # --- to implement -------------------------------------------------------------------------

    @abstractmethod
    def list_shards(self) -> list[Shard]:
        """All shards of the source, deterministically: same source, same shards, same order."""

    @abstractmethod
    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord | UnchangedDocument]:
        """Yields the shard's documents (and bad records) in a deterministic order."""

    # --- shared -------------------------------------------------------------------------------

    @property
    def shard_bytes(self) -> int:
        """Target input bytes per shard: ``source.shard_size_mb``, or the runner's finer plan for a
        source too small to give every reader a shard."""
        if self.shard_bytes_override:
            return max(1, int(self.shard_bytes_override))
        return max(1, int(self.config.shard_size_mb * 1024 * 1024))

    def url(self, path: str) -> str:
        """The fsspec URL of a path of this connector's filesystem."""
        return path if "://" in path or not self._prefix else f"{self._prefix}{path}"

    def list_files(self) -> list[tuple[str, int]]:
        """``(path, size)`` of the source's files, sorted; a folder is walked recursively.

        On a local disk only regular files are listed, and of a folder or glob only those inside it
        once links are resolved (``source.options.follow_links: true`` admits the others): each file
        left out is named in a warning.

        Raises:
            ConnectorError: when the path does not exist or holds no file of this format.
        """
        root = self.root
        walked = True  # a folder or glob, not one named file: links out of it are left out
        if any(ch in root for ch in "*?["):
            paths = self.fs.glob(root)
        elif self.fs.isdir(root):
            prefix = len(root.rstrip("/")) + 1
            paths = [
                p
                for p in self.fs.find(root)
                if self._keeps(p) and not any(part.startswith((".", "_")) for part in p[prefix:].split("/")[:-1])
            ]
        elif self.fs.exists(root):
            paths, walked = [root], False
        else:
            raise ConnectorError(f"source {self.config.uri!r} does not exist: check source.uri / --source")
        paths = sorted(p for p in paths if not self.fs.isdir(p))
        if self._prefix == "":  # a local disk: FIFOs, devices and links out of the source exist here
            paths = self._regular_files_inside(paths, walked)
        if not paths:
            wanted = ", ".join(self.suffixes) or "any"
            raise ConnectorError(
                f"source {self.config.uri!r} holds no {self.name} files ({wanted}); "
                "check source.uri or set source.format"
            )
        return [(p, int(self.fs.size(p) or 0)) for p in paths]

    def _regular_files_inside(self, paths: list[str], walked: bool) -> list[str]:
        """The local ``paths`` that are regular files and, for a walked folder or glob (``walked``),
        inside the source root once symbolic links are resolved; each one left out is logged.

        A FIFO would block its reader forever, a device would stream without end, and a link to
        ``/etc/passwd`` in a folder of notes would be embedded: none is a document of the source.
        ``source.options.follow_links: true`` admits links that point out of the source root.
        """
        if isinstance(self.options, FileOptions):
            follow = self.options.follow_links
        else:  # a plugin without an options model
            follow = self.config.options.get("follow_links", False) is True
        base = self.root.rstrip("/") or "/"
        if any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0] or "/"
        root_real = os.path.realpath(base)
        kept = []
        for path in paths:
            try:
                mode = os.stat(path).st_mode
            except OSError:  # a broken link, or gone since listing: reading quarantines it with the reason
                kept.append(path)
                continue
            if not stat.S_ISREG(mode):
                log.warning("source: skipped %s: not a regular file (a FIFO, socket or device)", path)
                continue
            real = os.path.realpath(path)
            if walked and not follow and os.path.commonpath([root_real, real]) != root_real:
                log.warning(
                    "source: skipped %s: a link to %s, outside the source root %s "
                    "(set source.options.follow_links: true to read it)",
                    path, real, root_real,
                )
                continue
            kept.append(path)
        return kept

    def check_looks_like(self, path: str, decompressed: bytes | None = None) -> None:
        """Refuses a file whose first bytes show another format than this connector reads.

        Each ``list_shards`` calls it on the source's first file: ``--format jsonl`` on a Parquet
        file would otherwise quarantine every line as malformed JSON and "succeed" with nothing
        embedded. Bytes it does not recognize (a damaged file) pass: reading quarantines those.

        Args:
            path: The file (a path of this connector's filesystem).
            decompressed: The start of the file's decompressed content, where the connector has
                it already (a bz2 dump's head): checked instead of the raw bytes.

        Raises:
            ConnectorError: naming what the file looks like and the ``--format`` that reads it.
        """
        if not self.reads:
            return
        head = decompressed
        if head is None:
            try:
                head = self.fs.cat_file(path, start=0, end=SNIFF_BYTES)
            except OSError:
                return  # unreadable now: reading it reports why
        found = sniff(head)
        if found is None:
            return
        name = self.relative(path)
        if decompressed is not None:
            if found.kind not in self.reads:
                raise ConnectorError(
                    f"{name} holds {found.looks_like} once decompressed ({found.evidence}), "
                    f"not {self.label}: decompress it and {_FORMAT_FOR[found.kind]}"
                )
            return
        if found.kind not in self.reads:
            raise ConnectorError(
                f"{name} looks like {found.looks_like} ({found.evidence}), "
                f"not {self.label}: {_FORMAT_FOR[found.kind]}"
            )
        suffixes = self.compressed_suffixes.get(found.kind)
        if suffixes and not name.lower().endswith(suffixes):
            raise ConnectorError(
                f"{name} looks like {found.looks_like} ({found.evidence}) but its name does not end in "
                f"{' or '.join(suffixes)}, which is how --format {self.name} knows to decompress it: "
                f"rename it to {name}{suffixes[0]}"
            )

    def _keeps(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        if base.startswith((".", "_")):
            return False
        return not self.suffixes or base.lower().endswith(self.suffixes)

    def relative(self, path: str) -> str:
        """A path relative to the source root (used in stable shard and document ids)."""
        root = self.root.rstrip("/")
        if any(ch in root for ch in "*?["):
            root = root.rsplit("/", 1)[0]
        if path == root:
            return path.rsplit("/", 1)[-1]
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return path

    def is_unchanged(self, doc_id: str, version: Any) -> bool:
        """True when ``known_versions`` says this version of the document is already embedded."""
        return (
            self.known_versions is not None
            and version is not None
            and self.known_versions.get(doc_id) == str(version)
        )

    def documents(self, shard: Shard) -> Iterator[Document | BadRecord | UnchangedDocument]:
        """``read_shard`` with the error policy applied.

        A failure mid-shard keeps what was read and quarantines the rest with the reason. A document
        whose id an earlier document of the same shard already had is quarantined ("duplicate id
        ... kept the first"): chunk ids are ``doc_id#chunk_index``, so two documents with one id
        would give colliding chunks and a shard that never completes. Ids are remembered per shard
        only (a shard is bounded by ``source.shard_size_mb``); duplicates across shards are not
        detected here (see the README).
        """
        produced = 0
        first_seen: dict[str, str] = {}  # id → where its first document was read
        try:
            for item in self.read_shard(shard):
                if isinstance(item, Document):
                    produced += 1
                    location = item.location or f"document {produced}"
                    first = first_seen.get(item.id)
                    if first is None:
                        first_seen[item.id] = location
                    else:
                        produced -= 1
                        yield BadRecord(
                            shard.id,
                            location,
                            f"duplicate id {item.id!r} (first seen at {first}): kept the first",
                            doc_id=item.id,
                            snippet=_text_snippet(item.text),
                        )
                        continue
                yield item
        except Exception as err:  # the policy: any failure of a shard becomes a quarantine record
            yield BadRecord(
                shard.id,
                f"after document {produced}",
                f"shard unreadable from here on: {type(err).__name__}: {err}",
            )

    def make_document(
        self, record: Mapping[str, Any], shard: Shard, location: str, default_id: str | None = None
    ) -> Document | BadRecord:
        """Maps one record to a Document with the configured id/text/title/metadata fields
        (``default_id``: the id of a record without an id field, e.g. its position in the file)."""
        cfg = self.config
        text = record.get(cfg.text_field)
        raw_id = record.get(cfg.id_field)
        if raw_id is None:
            raw_id = default_id
        doc_id = None if raw_id is None else str(raw_id)
        if doc_id is None or doc_id == "":
            return BadRecord(
                shard.id, location, f"no id field {cfg.id_field!r}", snippet=_snippet(record), fields=_fields(record)
            )
        if text is None:
            return BadRecord(
                shard.id, location, f"no text field {cfg.text_field!r}", doc_id=doc_id, snippet=_snippet(record),
                fields=_fields(record),
            )
        if not isinstance(text, str):
            return BadRecord(shard.id, location, f"text field {cfg.text_field!r} is {type(text).__name__}, not a string", doc_id=doc_id)
        if not text.strip():
            return BadRecord(shard.id, location, "empty or whitespace-only text", doc_id=doc_id)
        title = record.get(cfg.title_field) if cfg.title_field else None
        metadata = {name: record.get(name) for name in cfg.metadata_fields}
        title = None if title is None else str(title)
        checked = [("id", doc_id), ("text", text), ("title", title)]
        checked += [(f"metadata field {name!r}", value) for name, value in metadata.items()]
        for what, value in checked:
            at = _lone_surrogate(value) if isinstance(value, str) else -1
            if at >= 0:
                return BadRecord(
                    shard.id,
                    location,
                    f"{what} has a lone surrogate (U+{ord(value[at]):04X} at character {at}), which is not valid "
                    "Unicode and cannot be tokenized or stored: fix the record's encoding at the source",
                    doc_id=printable(doc_id),
                    snippet=printable(value[max(0, at - 60) : at + 60]),
                )
        return Document(
            id=doc_id, text=text, title=title, metadata=metadata, location=location
        )


def _fields(record: Mapping[str, Any], limit: int = 20) -> list[str]:
    names = [str(k) for k in record.keys()]
    return names[:limit] + (["…"] if len(names) > limit else [])


def _snippet(record: Any, limit: int = 200) -> str:
    text = repr(record)
    return text if len(text) <= limit else text[:limit] + "…"


def _text_snippet(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _lone_surrogate(value: str) -> int:
    """Index of the first lone surrogate in ``value`` (a JSON ``"\\ud800"`` escape), or -1."""
    if value.isascii():
        return -1
    found = _SURROGATE.search(value)
    return -1 if found is None else found.start()


def printable(value: str | None) -> str | None:
    """``value`` with its lone surrogates written as escapes, safe to encode as UTF-8.

    Surrogates that stand for undecodable bytes (how Python decodes a file name that is not UTF-8)
    are written as those bytes (``"caf\\xe9.txt"``), others as code points (``"\\ud800"``).
    """
    if value is None or _lone_surrogate(value) < 0:
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF: not an escaped byte
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
