"""The sink contract: an explicit commit protocol, shard by shard.

Like Ray Data's ``Datasink`` and Hadoop's output committers::

    sink.open()                        # once: create or check the table
    sink.abort(shard_id)               # before redoing a shard: drop what a dead attempt left
    writer = sink.begin(shard_id)
    writer.write(table) ...            # any number of times, invisible to readers
    writer.commit()                    # atomically publish the whole shard
    ...                                # (the runner records completion only after this)
    sink.finish()                      # once at the end: compaction, indexes

A sink never exposes half a shard: rows written before ``commit`` are invisible to readers, and
``abort`` removes every trace of an attempt that never committed — and of one that committed but
whose completion was never recorded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pyarrow as pa

from embedder.config import OutputConfig


class SinkError(RuntimeError):
    """The output cannot be written (incompatible existing table, unreachable store...)."""


class ShardWriter(ABC):
    """Writes one shard's rows; nothing is visible until ``commit``."""

    @abstractmethod
    def write(self, table: pa.Table) -> None:
        """Stages rows of the shard (any number of calls, each with the sink's schema)."""

    @abstractmethod
    def commit(self) -> int:
        """Publishes every staged row of the shard at once; returns the number of rows."""

    @abstractmethod
    def discard(self) -> None:
        """Drops staged rows of this attempt (the shard stays uncommitted)."""


class Sink(ABC):
    """Base class of output formats.

    Args:
        config: The job's ``output`` section.
        schema: The output schema (``embedder.schema.output_schema``), provenance included.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: OutputConfig, schema: pa.Schema) -> None:
        self.config = config
        self.schema = schema

    @abstractmethod
    def open(self) -> None:
        """Creates the output if absent; checks an existing one has a compatible schema."""

    @abstractmethod
    def begin(self, shard_id: str) -> ShardWriter:
        """Starts writing a shard."""

    @abstractmethod
    def abort(self, shard_id: str) -> None:
        """Removes whatever any earlier attempt left of the shard (committed or not)."""

    def abort_many(self, shard_ids: list[str]) -> None:
        """``abort`` for many shards at once (sinks override this to do it in one pass)."""
        for shard_id in shard_ids:
            self.abort(shard_id)

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Called once after the last shard: compaction, index builds."""

    @abstractmethod
    def read(self, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Reads committed rows (for status, tests, validation and brute-force search)."""

    @abstractmethod
    def count_rows(self) -> int:
        """Committed rows."""

    def describe(self) -> dict[str, Any]:
        return {"sink": self.name, "uri": self.config.uri}
