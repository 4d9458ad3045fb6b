"""Lance tables as a source: re-embed stored text without the original corpus.

The source URI is a Lance dataset (``.../chunks.lance``) or a LanceDB database folder with the table
named by ``options.table`` (default ``chunks``). Any table with a text column works — ours or
anyone's; columns map as for JSONL/Parquet (``id_field``, ``text_field``, ``title_field``,
``metadata_fields``). Each row is one document.

Re-embedding our own output with a new model (the use this connector exists for): every stored chunk
becomes a document whose id is the chunk id (``source.id_field: id``, the default), so with
``chunking.max_tokens`` at least the old limit each comes back as exactly one chunk,
``<old id>#0``. Use ``source.id_field: doc_id`` only if the table holds one row per document.

Shards are runs of consecutive fragments of about ``source.shard_size_mb`` (from the fragments'
data file sizes), ids ``"<table>@frag<first>-<last>"``: stable as long as the table is not compacted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import Field

from connectors.base import Connector, ConnectorError, ConnectorOptions
from connectors.registry import register_connector
from embedder.records import BadRecord, Document, Shard, UnchangedDocument
from embedder.storage import object_store_options


@register_connector("lance")
class LanceConnector(Connector):
    """Reads a Lance/LanceDB table, fragment by fragment."""

    suffixes = (".lance",)

    class Options(ConnectorOptions):
        table: str = Field("chunks", min_length=1, description="a table name")
        """The table of a LanceDB database folder (a ``.lance`` URI names it already)."""
        batch_rows: int = Field(1024, ge=1, description="a positive integer")
        """Rows per read batch."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        uri = config.uri.rstrip("/")
        self.dataset_uri = uri if uri.endswith(".lance") else f"{uri}/{self.options.table}.lance"
        self.batch_rows = self.options.batch_rows

    def _dataset(self) -> Any:
        import lance

        try:
            return lance.dataset(self.dataset_uri, storage_options=object_store_options(self.dataset_uri, self.config.storage_options))
        except (ValueError, OSError) as err:
            raise ConnectorError(
                f"no Lance table at {self.dataset_uri!r} ({err}); check source.uri and source.options.table"
            ) from None

    def _columns(self, dataset: Any) -> list[str]:
        cfg = self.config
        names = set(dataset.schema.names)
        if cfg.text_field not in names:
            raise ConnectorError(
                f"the Lance table {self.dataset_uri!r} has no text column {cfg.text_field!r} "
                f"(columns: {', '.join(sorted(names))}); set source.text_field"
            )
        wanted = [cfg.id_field, cfg.text_field, cfg.title_field, *cfg.metadata_fields]
        missing = [c for c in cfg.metadata_fields if c not in names]
        if missing:
            raise ConnectorError(f"metadata field(s) {missing} are not columns of {self.dataset_uri!r}")
        return [c for c in dict.fromkeys(wanted) if c and c in names]

    def list_shards(self) -> list[Shard]:
        dataset = self._dataset()
        self._columns(dataset)
        fragments = dataset.get_fragments()
        if not fragments:
            raise ConnectorError(f"the Lance table {self.dataset_uri!r} is empty")
        name = self.dataset_uri.rstrip("/").rsplit("/", 1)[-1]
        shards: list[Shard] = []
        group: list[int] = []
        size = 0
        for fragment in fragments:
            meta = fragment.metadata
            group.append(fragment.fragment_id)
            size += sum(int(getattr(f, "file_size_bytes", 0) or 0) for f in meta.files) or 1
            if size >= self.shard_bytes:
                shards.append(self._shard(name, group, size))
                group, size = [], 0
        if group:
            shards.append(self._shard(name, group, size))
        return shards

    def _shard(self, name: str, fragment_ids: list[int], size: int) -> Shard:
        return Shard(
            id=f"{name}@frag{fragment_ids[0]}-{fragment_ids[-1]}",
            path=self.dataset_uri,
            size_bytes=size,
            extra=(("fragments", tuple(fragment_ids)),),
        )

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord | UnchangedDocument]:
        dataset = self._dataset()
        columns = self._columns(dataset)
        wanted = set(shard.get("fragments", ()))
        fragments = [f for f in dataset.get_fragments() if f.fragment_id in wanted]
        row = 0
        for fragment in fragments:
            for batch in fragment.to_batches(columns=columns, batch_size=self.batch_rows):
                for record in batch.to_pylist():
                    yield self.make_document(record, shard, f"fragment {fragment.fragment_id} row {row}")
                    row += 1
