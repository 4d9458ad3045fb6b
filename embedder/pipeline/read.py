"""The read stage: list a source's shards (sized so every reader has work) and read one shard into
blocks of chunks, closed by its ``ShardEnd``; and the read progress of a run."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from embedder.records import BadRecord, Chunk, Document, Shard, ShardEnd, UnchangedDocument
from embedder.registry import connector_registry

if TYPE_CHECKING:
    from connectors.base import Connector
    from embedder.chunking import Chunker
    from embedder.config import Job
    from embedder.execution.result import RunResult

log = logging.getLogger("embedder")

DOCS_PER_BLOCK = 256
CHARS_PER_BLOCK = 2_000_000


def make_connector(job: Job, shard_bytes: int | None = None) -> Connector:
    """The job's connector, found through the registry (``shard_bytes``: the output's planned shard
    size, see ``plan_shards``)."""
    cls = connector_registry().CONNECTORS.get(job.source.format)
    connector = cls(job.source)
    connector.shard_bytes_override = shard_bytes
    return connector


def read_and_chunk(connector: Connector, chunker: Chunker, shard: Shard) -> Iterator[list[Chunk] | ShardEnd]:
    """Reads one shard and yields blocks of chunks, then one ``ShardEnd`` with its counts.

    Documents are tokenized in blocks (one batched tokenizer call each); bad records are collected
    for the shard's quarantine. A document that gives no chunk (its text has no token for this
    model's tokenizer: zero-width spaces, control characters, a lone BOM) is one of them, so every
    document read is either embedded or quarantined.
    """
    end = ShardEnd(shard.id)
    block: list[Document] = []
    block_chars = 0
    before = chunker.stats.trimmed_documents

    def flush() -> list[Chunk]:
        chunks = chunker.chunk(block, shard_id=shard.id)
        end.chunks += len(chunks)
        end.tokens += sum(len(c.token_ids) for c in chunks)
        chunked = {c.doc_id for c in chunks}
        for doc in block:
            if doc.id not in chunked:
                end.documents -= 1
                end.bad_records.append(
                    BadRecord(
                        shard.id,
                        doc.location or f"document {doc.id}",
                        "text has no tokens for this model's tokenizer (only invisible or control characters?)",
                        doc_id=doc.id,
                        snippet=ascii(doc.text[:100]),
                    )
                )
        return chunks

    for item in connector.documents(shard):
        if isinstance(item, BadRecord):
            end.bad_records.append(item)
            continue
        if isinstance(item, UnchangedDocument):
            end.unchanged_doc_ids.append(item.id)
            continue
        end.documents += 1
        block.append(item)
        block_chars += len(item.text)
        if len(block) >= DOCS_PER_BLOCK or block_chars >= CHARS_PER_BLOCK:
            chunks = flush()
            block, block_chars = [], 0
            if chunks:
                yield chunks
    if block:
        chunks = flush()
        if chunks:
            yield chunks
    end.trimmed_documents = chunker.stats.trimmed_documents - before
    yield end


class ReadProgress:
    """Counts documents as readers produce them (before their shard commits) and the input bytes of
    shards read to their end, for progress lines and the ETA. Exact once every shard has ended: a
    shard's end sets its document count to what the reader counted.

    Args:
        result: The run's result, updated in place (``documents_read``, ``bytes_read``).
        shards: This run's pending shards (their ``size_bytes``).
    """

    def __init__(self, result: RunResult, shards: Sequence[Shard]) -> None:
        self.result = result
        self._sizes = {s.id: s.size_bytes for s in shards}
        self._counted: dict[str, int] = {}

    def chunks(self, chunks: Sequence[Chunk]) -> None:
        """A block of chunks read: each first chunk of a document counts that document."""
        for chunk in chunks:
            # a shard's end may arrive before its last vectors: once it ended, its count is exact
            if chunk.chunk_index == 0 and chunk.shard_id in self._sizes:
                self._counted[chunk.shard_id] = self._counted.get(chunk.shard_id, 0) + 1
                self.result.documents_read += 1

    def end(self, end: ShardEnd) -> None:
        """A shard read to its end."""
        if end.shard_id not in self._sizes:
            return
        self.result.documents_read += end.documents - self._counted.pop(end.shard_id, 0)
        self.result.bytes_read += self._sizes.pop(end.shard_id)


# --- shard planning -------------------------------------------------------------------------

SHARDS_PER_READER = 2
"""A source is split into at least this many shards per reader where its format allows."""

MIN_SHARD_BYTES = 256 * 1024
"""Shards are never planned smaller than this to give every reader work (a smaller source has fewer)."""


def plan_shards(connector: Connector, readers: int, stored: int | None | str = None) -> tuple[list[Shard], int]:
    """Lists the source's shards so that every reader has work, and returns them with the shard size.

    Large sources keep shards of about ``source.shard_size_mb``. A source that gives fewer than
    ``SHARDS_PER_READER × readers`` shards at that size is split finer (JSONL byte ranges, Parquet row
    groups, multistream bz2 streams, groups of text files: each connector's own boundaries), down to
    ``MIN_SHARD_BYTES``: a 59 MB dump as one shard kept one reader busy and the GPU a third idle.

    Shard ids depend on the shard size, so the size is fixed by an output's first pass and stored in
    its generation record: a resumed or extended pass (``stored``) lists exactly the same shards,
    whatever the machine's CPU count. ``stored == "config"``: an output from before this rule; its
    shards stay at the configured size.

    Args:
        connector: The job's connector.
        readers: Reader processes (or read tasks) that will run.
        stored: The output's shard size (bytes), ``"config"``, or None to plan it now.
    """
    if stored == "config":
        shards = connector.list_shards()
        return shards, connector.shard_bytes
    if isinstance(stored, int):
        connector.shard_bytes_override = stored
        return connector.list_shards(), stored
    shards = connector.list_shards()
    configured = connector.shard_bytes
    wanted = SHARDS_PER_READER * max(1, readers)
    total = sum(s.size_bytes for s in shards)
    target = max(MIN_SHARD_BYTES, total // wanted)
    if len(shards) >= wanted or total <= 0 or target >= configured:
        return shards, configured
    connector.shard_bytes_override = target
    finer = connector.list_shards()
    log.info(
        "source: %d shard(s) of %.1f MB for %d reader(s) (%d at source.shard_size_mb)",
        len(finer), target / 2**20, readers, len(shards),
    )
    return finer, target
