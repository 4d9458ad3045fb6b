"""Parquet sources: one row per document, read row group by row group, only the columns needed.

Sharding. Each file's row groups are grouped, in order, into shards of about
``source.shard_size_mb`` of *compressed* data, as the file's footer states it; listing reads footers
only, never data. A row group is never split (it is Parquet's unit of reading), so one large row group
is one shard. Shard ids are the path relative to the source root for a file read as one shard and
``"<relative path>@rg<first>-<last>"`` (both inclusive) otherwise; they change only when the file's
row groups or the shard size do.

Columns. ``source.text_field`` must be a column of every file: a file without it is a
``ConnectorError`` that lists the columns it has (a typo in the job, not bad data). Columns named in
``metadata_fields`` must exist too. The id and title columns are optional: without an id column, or
for a null id, a row's id is ``"<relative path>@row<N>"`` (N counts rows from the file's start); without
a title column titles are empty. The common Wikipedia layout ``id, url, title, text`` works with the
defaults (add ``metadata_fields: [url]`` to keep the URL).

Bad input: a null, empty or non-string text is a ``BadRecord`` for that row; a file whose footer or
data cannot be read is one ``BadRecord`` and the job goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from connectors.base import Connector, ConnectorError, FileOptions
from connectors.registry import register_connector
from embedder.records import BadRecord, Document, Shard

if TYPE_CHECKING:
    import pyarrow.parquet as pq

_BATCH_ROWS = 1024  # rows per Arrow batch handed to Python: bounds memory for long texts
# Files are opened without fsspec's read-ahead: pyarrow asks for exactly the byte ranges it needs
# (footer, column chunks), and read-ahead would turn each into a fetch of a whole block (50 MB on
# s3fs), several times the shard's own size.


@register_connector("parquet")
class ParquetConnector(Connector):
    """Reads ``.parquet`` files (a file, a folder of them, or a glob), local or on object storage.

    Example:
        >>> from connectors.registry import CONNECTORS
        >>> from embedder.config import SourceConfig
        >>> cfg = SourceConfig(uri="s3://corpus/wikipedia/*.parquet", metadata_fields=["url"])
        >>> src = CONNECTORS.get("parquet")(cfg)
        >>> shards = src.list_shards()  # doctest: +SKIP
    """

    Options = FileOptions

    suffixes = (".parquet", ".parq", ".pq")
    label = "Parquet"
    reads = frozenset({"parquet"})

    def list_shards(self) -> list[Shard]:
        import pyarrow as pa

        shards: list[Shard] = []
        files = self.list_files()
        for path, size in files:
            rel = self.relative(path)
            try:
                with self.fs.open(path, "rb", cache_type="none") as f:
                    parquet_file = _open(f)
                    metadata = parquet_file.metadata
                    columns = parquet_file.schema_arrow.names
            except (pa.ArrowException, OSError, ValueError):
                if path == files[0][0]:  # the first file: another format (--format parquet on JSONL)?
                    self.check_looks_like(path)
                # Unreadable footer: one shard for the whole file; reading it reports the damage.
                shards.append(
                    Shard(id=rel, path=self.url(path), size_bytes=size, extra=(("relative_path", rel),))
                )
                continue
            self._check_columns(rel, columns)
            groups = _group_row_groups(metadata, self.shard_bytes)
            for first, last, group_bytes in groups:
                shard_id = rel if len(groups) == 1 else f"{rel}@rg{first}-{last}"
                shards.append(
                    Shard(
                        shard_id,
                        self.url(path),
                        first,
                        last + 1,
                        group_bytes,
                        extra=(("relative_path", rel),),
                    )
                )
        return shards

    def read_shard(self, shard: Shard) -> Iterator[Document | BadRecord]:
        import pyarrow as pa

        rel = shard.get("relative_path", shard.id)
        with self.fs.open(shard.path, "rb", cache_type="none") as f:
            try:
                parquet_file = _open(f)
                metadata = parquet_file.metadata
            except (pa.ArrowException, OSError, ValueError) as err:
                yield BadRecord(shard.id, "file", f"not a readable Parquet file: {type(err).__name__}: {err}")
                return
            columns = parquet_file.schema_arrow.names
            self._check_columns(rel, columns)
            end = metadata.num_row_groups if shard.end < 0 else shard.end
            if shard.start >= end:
                return
            row = sum(metadata.row_group(i).num_rows for i in range(shard.start))
            cfg = self.config
            has_id = cfg.id_field in columns
            wanted = [cfg.id_field] if has_id else []
            wanted.append(cfg.text_field)
            if cfg.title_field and cfg.title_field in columns:
                wanted.append(cfg.title_field)
            wanted.extend(cfg.metadata_fields)
            wanted = list(dict.fromkeys(wanted))  # one read per column, order kept
            for row_group in range(shard.start, end):
                # One row group at a time: damage in one costs that group only, and the rows
                # before it have been handed on already.
                group_end = row + metadata.row_group(row_group).num_rows
                try:
                    for batch in parquet_file.iter_batches(
                        batch_size=_BATCH_ROWS, row_groups=[row_group], columns=wanted, use_threads=False
                    ):
                        values = {name: batch.column(name).to_pylist() for name in wanted}
                        for i in range(batch.num_rows):
                            record = {name: column[i] for name, column in values.items()}
                            yield self.make_document(record, shard, f"row {row}", default_id=f"{rel}@row{row}")
                            row += 1
                except (pa.ArrowException, OSError) as err:
                    yield BadRecord(
                        shard.id,
                        f"row group {row_group}, rows {row}-{group_end - 1}",
                        f"Parquet data unreadable: {type(err).__name__}: {err}",
                    )
                row = group_end

    def _check_columns(self, rel: str, columns: list[str]) -> None:
        """Raises a usage error when the job names columns the file lacks."""
        cfg = self.config
        missing = [name for name in (cfg.text_field, *cfg.metadata_fields) if name not in columns]
        if missing:
            fields = "source.text_field" if cfg.text_field in missing else "source.metadata_fields"
            raise ConnectorError(
                f"Parquet file {rel!r} of source {cfg.uri!r} has no column {', '.join(map(repr, missing))}; "
                f"its columns are: {', '.join(columns)}. Set {fields} to one of them."
            )


def _open(f: Any) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    return pq.ParquetFile(f)


def _group_row_groups(metadata: Any, target_bytes: int) -> list[tuple[int, int, int]]:
    """``(first, last, compressed bytes)`` of consecutive row groups of about ``target_bytes``."""
    if metadata.num_row_groups == 0:
        return [(0, -1, 0)]  # an empty file: one shard that reads nothing
    groups: list[tuple[int, int, int]] = []
    first, total = 0, 0
    for index in range(metadata.num_row_groups):
        row_group = metadata.row_group(index)
        size = sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
        if index > first and total + size > target_bytes:
            groups.append((first, index - 1, total))
            first, total = index, 0
        total += size
    groups.append((first, metadata.num_row_groups - 1, total))
    return groups
