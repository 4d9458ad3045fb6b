"""Stage functions shared by every runner: resolve the job, read+chunk a shard, build output rows.

Runners differ in how they schedule these (threads and processes locally, Ray tasks and actors on a
cluster) but call the same functions, so both produce the same output for the same job.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedder.config import ConfigError, Job
from embedder.records import BadRecord, Chunk, Document, Shard

if TYPE_CHECKING:
    from connectors.base import Connector
    from embedder.chunking import Chunker


DOCS_PER_BLOCK = 256
CHARS_PER_BLOCK = 2_000_000


@dataclass(slots=True)
class ShardEnd:
    """The last message of a shard's read+chunk stage: its counts and bad records."""

    shard_id: str
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    trimmed_documents: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)


def connector_registry():  # noqa: ANN201 - registry type lives in connectors
    return importlib.import_module("connectors.registry")


def sink_registry():  # noqa: ANN201
    return importlib.import_module("indexes.registry")


def resolve_job(job: Job) -> Job:
    """Fills ``auto`` choices (source format, sink) from the URIs; returns a new Job."""
    job = job.model_copy(deep=True)
    if job.source.format == "auto":
        job.source.format = _detect_source_format(job)
    if job.output.sink == "auto":
        job.output.sink = sink_registry().detect_sink(job.output.uri)
    return job


def _detect_source_format(job: Job) -> str:
    registry = connector_registry()
    uri = job.source.uri
    fmt = registry.detect_format(uri)
    if fmt:
        return fmt
    from embedder.storage import filesystem

    fs, path = filesystem(uri, job.source.storage_options)
    if not fs.exists(path):
        raise ConfigError(f"source {uri!r} does not exist: check source.uri / --source")
    if fs.isdir(path):
        if fs.exists(f"{path.rstrip('/')}/data") and fs.exists(f"{path.rstrip('/')}/_versions"):
            return "lance"
        counts: Counter[str] = Counter()
        for i, found in enumerate(fs.find(path)):
            if i >= 2000:
                break
            name = found.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            detected = registry.detect_format(found)
            if detected:
                counts[detected] += 1
        if counts:
            return counts.most_common(1)[0][0]
    valid = ", ".join(n for n in registry.CONNECTORS.names())
    raise ConfigError(f"cannot tell the format of {uri!r}; set source.format / --format (valid: {valid})")


def make_connector(job: Job) -> Connector:
    """The job's connector, found through the registry."""
    cls = connector_registry().CONNECTORS.get(job.source.format)
    return cls(job.source)


def read_and_chunk(connector: Connector, chunker: Chunker, shard: Shard) -> Iterator[list[Chunk] | ShardEnd]:
    """Reads one shard and yields blocks of chunks, then one ``ShardEnd`` with its counts.

    Documents are tokenized in blocks (one batched tokenizer call each); bad records are collected
    for the shard's quarantine.
    """
    end = ShardEnd(shard.id)
    block: list[Document] = []
    block_chars = 0
    before = chunker.stats.trimmed_documents

    def flush() -> list[Chunk]:
        chunks = chunker.chunk(block, shard_id=shard.id)
        end.chunks += len(chunks)
        end.tokens += sum(len(c.token_ids) for c in chunks)
        return chunks

    for item in connector.documents(shard):
        if isinstance(item, BadRecord):
            end.bad_records.append(item)
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


def chunking_provenance(chunker: Chunker) -> dict[str, Any]:
    return {"chunking": chunker.settings()}
