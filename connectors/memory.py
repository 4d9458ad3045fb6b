"""In-memory sources (a DataFrame, a list, an Arrow table, a ``datasets.Dataset``), read from their spool.

``embedder.run`` writes the object's needed columns to an Arrow IPC spool file first
(``embedder.in_memory``, which says why); this connector memory-maps that file. Sharding: ranges of
``source.options.shard_rows`` rows (default 10,000), ids ``rows<first>-<last>`` (both inclusive);
``source.shard_size_mb`` does not apply. Fields are mapped as for Parquet: a row's id is its
``source.id_field`` or, without one (or for a null), its position (``"0"``, ``"1"``...); a null,
empty or non-string text is a quarantine record for that row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from connectors.base import Connector, ConnectorError, ConnectorOptions, validate_options
from connectors.registry import register_connector
from embedder.config import SourceConfig
from embedder.in_memory import DEFAULT_SHARD_ROWS, JSON_FIELD_KEY, SPOOL_METADATA_KEY, spool_path
from embedder.records import BadRecord, Document, Shard
from embedder.storage import filesystem


@register_connector("memory")
class MemoryConnector(Connector):
    """Reads the spool file of an in-memory source (``source.uri``: ``memory://<kind>/<fingerprint>``).

    Example:
        >>> from embedder import Job, run
        >>> run(Job(source=["first text", "second text"], output={"uri": "out/db"}))  # doctest: +SKIP
    """

    class Options(ConnectorOptions):
        shard_rows: int = Field(DEFAULT_SHARD_ROWS, ge=1, description="a whole number of rows >= 1")
        """Rows per shard."""
        spool_dir: str | None = Field(None, description="a local folder path")
        """Where the spooled Arrow file goes (default ``<temp dir>/embedder-spool``)."""

    label = "in-memory"

    def __init__(self, config: SourceConfig) -> None:  # no files to find: the spool is the source
        self.config = config
        self.options = validate_options("memory", self.Options, config.options)
        self.known_versions = None
        self.shard_bytes_override = None
        self.path = spool_path(config)
        self.fs, self.root = filesystem(self.path)
        self._prefix = ""
        self._file: Any = None

    def _open(self) -> Any:
        """The spool file, memory-mapped (once per process)."""
        if self._file is None:
            import pyarrow as pa

            if not os.path.exists(self.path):
                raise ConnectorError(
                    f"the in-memory source {self.config.uri!r} has no spool file {self.path}: in-memory data "
                    "exists only in the Python process that holds it; pass the object to "
                    "embedder.run(job, source=obj) again"
                )
            self._file = pa.ipc.open_file(pa.memory_map(self.path))
        return self._file

    def _shard_rows(self) -> int:
        return self.options.shard_rows

    def _num_rows(self) -> int:
        spool = self._open()
        if spool.num_record_batches == 0:
            return 0
        last = spool.num_record_batches - 1
        return last * self._batch_rows() + spool.get_batch(last).num_rows

    def _batch_rows(self) -> int:
        meta = json.loads(self._open().schema.metadata[SPOOL_METADATA_KEY])
        return int(meta["batch_rows"])

    def list_shards(self) -> list[Shard]:
        step = self._shard_rows()
        total = self._num_rows()
        size = os.path.getsize(self.path)
        shards = []
        for start in range(0, total, step):
            end = min(start + step, total)
            shards.append(Shard(f"rows{start}-{end - 1}", self.path, start, end, size_bytes=size * (end - start) // total))
        return shards

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord]:
        spool = self._open()
        batch_rows = self._batch_rows()
        json_columns = {f.name for f in spool.schema if (f.metadata or {}).get(JSON_FIELD_KEY)}
        row = shard.start
        for index in range(shard.start // batch_rows, (shard.end - 1) // batch_rows + 1):
            batch = spool.get_batch(index)
            first = index * batch_rows
            part = batch.slice(row - first, min(shard.end, first + batch.num_rows) - row)
            values = {name: part.column(name).to_pylist() for name in part.schema.names}
            for name in json_columns:
                values[name] = [None if v is None else json.loads(v) for v in values[name]]
            for i in range(part.num_rows):
                record = {name: column[i] for name, column in values.items()}
                yield self.make_document(record, shard, f"row {row}", default_id=str(row))
                row += 1
