"""Text-folder sources: every ``.txt``/``.md``/``.text`` file under a folder is one document.

A document's id is the file's path relative to the source root, with ``/`` separators
(``"guides/install.md"``); its title is the file name without its suffix (``"install"``); its text is
the whole file, decoded as strict UTF-8 (a leading byte-order mark is dropped). The metadata fields
``path`` (the file's URL) and ``size_bytes`` can be kept with ``source.metadata_fields``.

Files and folders whose names start with ``.`` or ``_`` (``.git/``, ``_build/``, ``.DS_Store``)
are skipped.

Sharding. One shard per file would make a folder of ten thousand notes ten thousand shards, each with
its own completion record. Instead consecutive files, in sorted path order, are grouped until a shard
holds about ``source.shard_size_mb`` bytes (or ``source.options["files_per_shard"]`` files, default
1000). The member paths travel in ``Shard.extra["files"]``. A one-file shard's id is the file's
relative path; a group's id is ``"<first relative path>+<number of files>@<hash of the member
list>"``, so it stays the same while the folder does, and changes when a file joins or leaves it.

Bad input: a file that is not valid UTF-8, empty or whitespace-only, or unreadable (e.g. deleted
between listing and reading), and a file whose name is not valid UTF-8 (written with ``\\xNN``
escapes in its shard id and record), is a ``BadRecord`` naming the file; the other files of the shard are
still read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import PurePosixPath

from pydantic import Field

from connectors.base import Connector, ConnectorError, FileOptions, printable
from connectors.registry import register_connector
from embedder.records import BadRecord, Document, Shard

_FILES_PER_SHARD = 1000


@register_connector("text")
class TextConnector(Connector):
    """Reads a folder (recursively), a glob, or a single file of plain text or Markdown.

    Example:
        >>> from connectors.registry import CONNECTORS
        >>> from embedder.config import SourceConfig
        >>> src = CONNECTORS.get("text")(SourceConfig(uri="docs/", metadata_fields=["path"]))
        >>> [doc.id for shard in src.list_shards() for doc in src.documents(shard)]  # doctest: +SKIP
        ['guides/install.md', 'index.md']
    """

    class Options(FileOptions):
        files_per_shard: int = Field(_FILES_PER_SHARD, ge=1, description="a positive integer")
        """At most this many files per shard (besides ``source.shard_size_mb`` bytes)."""

    suffixes = (".txt", ".md", ".text")
    label = "plain text"
    reads = frozenset({"text", "json", "xml", "mediawiki"})  # any UTF-8 file is text

    def list_shards(self) -> list[Shard]:
        root = self.root.rstrip("/")
        files = [(p, size) for p, size in self.list_files() if p == root or not _hidden(self.relative(p))]
        if not files:
            raise ConnectorError(
                f"source {self.config.uri!r} holds only hidden files (names starting with '.' or '_'); "
                "check source.uri"
            )
        self.check_looks_like(files[0][0])
        max_files = self.options.files_per_shard
        shards: list[Shard] = []
        group: list[str] = []
        group_bytes = 0
        for path, size in files:
            if group and (group_bytes + size > self.shard_bytes or len(group) >= max_files):
                shards.append(self._shard(group, group_bytes))
                group, group_bytes = [], 0
            group.append(path)
            group_bytes += size
        shards.append(self._shard(group, group_bytes))
        return shards

    def _shard(self, paths: list[str], size: int) -> Shard:
        first = printable(self.relative(paths[0]))
        if len(paths) == 1:
            shard_id = first
        else:
            names = "\n".join(printable(self.relative(p)) for p in paths)
            digest = hashlib.sha1(names.encode("utf-8")).hexdigest()[:12]
            shard_id = f"{first}+{len(paths)}@{digest}"
        return Shard(shard_id, self.url(paths[0]), 0, -1, size, extra=(("files", tuple(paths)),))

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord]:
        cfg = self.config
        for path in shard.get("files", ()):
            rel = self.relative(path)
            shown = printable(rel)
            if shown != rel:  # the OS gave bytes that are not UTF-8: no id or column can hold the name
                yield BadRecord(
                    shard.id,
                    shown,
                    f"file name is not valid UTF-8 ({shown}); rename the file (e.g. convmv -f latin1 -t utf8)",
                    doc_id=shown,
                )
                continue
            try:
                data = self.fs.cat_file(path)
            except OSError as err:  # missing (deleted since listing), a folder, no permission...
                yield BadRecord(shard.id, rel, f"file unreadable: {type(err).__name__}: {err}", doc_id=rel)
                continue
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                yield BadRecord(
                    shard.id,
                    rel,
                    f"not valid UTF-8 (byte {err.start}: {err.reason}); convert the file to UTF-8",
                    doc_id=rel,
                    snippet=data[max(0, err.start - 40) : err.start + 40].decode("utf-8", errors="replace"),
                )
                continue
            record = {
                "path": self.url(path),
                "size_bytes": len(data),
                cfg.id_field: rel,
                cfg.text_field: text,
            }
            if cfg.title_field:
                record[cfg.title_field] = PurePosixPath(rel).stem
            yield self.make_document(record, shard, rel)


def _hidden(relative_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))
