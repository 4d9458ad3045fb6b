"""In-memory sources: a Python object in, an Arrow IPC spool file out, read by the ``memory`` connector.

``run(Job(source=df, ...))`` takes a list of strings or of dicts, a pandas DataFrame, a pyarrow Table,
RecordBatch or RecordBatchReader, a ``datasets.Dataset``, or any object with ``__arrow_c_stream__``
(polars, DuckDB) as the source, with the same field mapping as files (``source.text_field``,
``id_field``, ``title_field``, ``metadata_fields``).

Why a spool file. The local runner's readers are separate processes (the Ray runner's are Ray
tasks) that rebuild the job's connector from the job's JSON: a DataFrame cannot travel in it, and
pickling it to every reader would copy it once per reader. So ``run`` first writes the columns the
job reads (text, id, title, metadata; nothing else) once to an Arrow IPC file in the spool directory
(``source.options.spool_dir``, default ``<temp dir>/embedder-spool``), in record batches of
``SPOOL_BATCH_ROWS`` rows, and the readers memory-map it: each reads only its shard's rows, the
pages are shared through the page cache, and no process holds the table. The file is named by the
fingerprint of its content (blake2b), which is also the source's ``uri`` in the job saved under
``<output>/_embedder/job.yaml`` (``memory://pandas.DataFrame/<fingerprint>``): a description of the
data, never the data. ``run`` removes the file it wrote when the run ends; a killed run leaves it
in the temp directory (a rerun with the same data rewrites the same name).

Memory while spooling: Arrow inputs (Table, RecordBatchReader, Dataset, Arrow streams) are written
batch by batch; a DataFrame or a list is converted once, its needed columns only (about their Arrow
size on top of the object itself).

Types. Arrow columns keep their type; the connector hands their Python values to the shared field
mapping, so a non-string text is a quarantine record (``text field 'text' is int, not a string``),
as in a Parquet file. A list or DataFrame column whose values Arrow cannot put in one type (a text
column holding strings and numbers) is spooled as JSON text and read back as the original values,
so each bad row is quarantined and the others are embedded.

Ids. Without an id field each row's id is its position (``"0"``, ``"1"``, ...): stable across
reruns only when the same rows come in the same order. Shards are ranges of
``source.options.shard_rows`` rows (default ``DEFAULT_SHARD_ROWS``), with ids ``rows0-9999``:
deterministic for the same number of rows, so an interrupted run resumes exactly once when it is
given the same data again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from embedder.config import ConfigError, SourceConfig, in_memory_kind

if TYPE_CHECKING:
    import pyarrow as pa

SPOOL_BATCH_ROWS = 1024
"""Rows per record batch of a spool file: a reader decodes at most this many rows past its shard."""
DEFAULT_SHARD_ROWS = 10_000
"""Rows per shard of an in-memory source (``source.options.shard_rows``)."""
SPOOL_METADATA_KEY = b"embedder.spool"
JSON_FIELD_KEY = b"embedder.json"
"""Field metadata of a column spooled as JSON text (values Arrow could not type as one column)."""
_SCHEME = "memory://"


class InMemorySourceError(ConfigError):
    """An in-memory source that cannot be read as the job asks (a missing field, an unknown kind)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Spool:
    """A spooled in-memory source.

    Attributes:
        uri: ``memory://<kind>/<fingerprint>``, the source's uri while the job runs.
        path: The spool file.
        created: True when this call wrote the file (False: one with the same content was there).
    """

    uri: str
    path: str
    created: bool


def spool_dir(source: SourceConfig) -> str:
    """The folder spool files go to: ``source.options.spool_dir`` or ``<temp dir>/embedder-spool``.

    Readers on other machines (a Ray cluster of several nodes) need a folder every node sees (NFS).
    """
    folder = source.options.get("spool_dir") or os.path.join(tempfile.gettempdir(), "embedder-spool")
    if not isinstance(folder, str) or "://" in folder:
        raise InMemorySourceError(f"source.options.spool_dir must be a local folder path, got {folder!r}")
    return folder


def parse_uri(uri: str) -> tuple[str, str]:
    """``(kind, fingerprint)`` of ``memory://<kind>/<fingerprint>``.

    Raises:
        InMemorySourceError: the uri is not one ``run`` made (a YAML job cannot name in-memory data).
    """
    kind, _, fingerprint = uri.removeprefix(_SCHEME).partition("/")
    if not uri.startswith(_SCHEME) or not kind or not fingerprint or not fingerprint.isalnum():
        raise InMemorySourceError(
            f"source {uri!r}: format 'memory' reads an in-memory object (a DataFrame, a list, an Arrow table...) "
            "given to embedder.run(job, source=obj) or Job(source=obj) in Python; a YAML job or the command "
            "line cannot name one: write the data to Parquet or JSONL and use that format"
        )
    return kind, fingerprint


def spool_path(source: SourceConfig) -> str:
    """Where the spool file of ``source`` (a spooled ``memory://`` uri) is."""
    _, fingerprint = parse_uri(source.uri)
    return os.path.join(spool_dir(source), f"{fingerprint}.arrow")


def spool(source: SourceConfig) -> Spool:
    """Writes ``source.data`` (the in-memory object) to a spool file; returns its uri and path.

    Raises:
        InMemorySourceError: the object lacks the text field or a metadata field (the message lists
            the fields it has), or is not a kind embedder reads.
    """
    import pyarrow as pa

    data = source.data
    if data is None:
        raise InMemorySourceError("source has no in-memory object to spool")
    try:
        kind = in_memory_kind(data)
    except ValueError as err:
        raise InMemorySourceError(str(err)) from None
    batches = _record_batches(data, kind, source)
    first = next(batches, None)
    if first is None:
        schema = pa.schema([pa.field(source.text_field, pa.string())])
    else:
        schema = first.schema
    meta = {SPOOL_METADATA_KEY: json.dumps({"kind": kind, "batch_rows": SPOOL_BATCH_ROWS}).encode()}
    schema = schema.with_metadata({**(schema.metadata or {}), **meta})
    folder = spool_dir(source)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}.arrow")
    hashing = _HashingFile(open(temp, "wb"))
    try:
        sink = pa.PythonFile(hashing, mode="w")
        with pa.ipc.new_file(sink, schema) as writer:
            if first is not None:
                rest = (b.replace_schema_metadata(schema.metadata) for b in _fixed_rows(first, batches))
                for batch in rest:
                    writer.write_batch(batch)
        sink.close()
    except BaseException:
        hashing.file.close()
        os.unlink(temp)
        raise
    hashing.file.close()
    fingerprint = hashing.hexdigest()
    path = os.path.join(folder, f"{fingerprint}.arrow")
    created = not os.path.exists(path)
    if created:
        os.replace(temp, path)
    else:
        os.unlink(temp)
    return Spool(uri=f"{_SCHEME}{kind}/{fingerprint}", path=path, created=created)


# --- conversion -----------------------------------------------------------------------------


def _fields(source: SourceConfig) -> tuple[list[str], list[str]]:
    """``(required, optional)`` field names the job reads: text and metadata must exist; id and title
    may (rows then get their position as id, and no title)."""
    required = list(dict.fromkeys([source.text_field, *source.metadata_fields]))
    optional = [f for f in (source.id_field, source.title_field) if f and f not in required]
    return required, optional


def _columns_to_read(available: list[str], source: SourceConfig, kind: str) -> list[str]:
    """The fields of ``available`` to spool, in a fixed order.

    Raises:
        InMemorySourceError: a required field is missing; names the fix.
    """
    required, optional = _fields(source)
    missing = [name for name in required if name not in available]
    if missing:
        setting = "source.text_field" if source.text_field in missing else "source.metadata_fields"
        shown = ", ".join(map(str, available[:30])) + (", …" if len(available) > 30 else "")
        raise InMemorySourceError(
            f"the in-memory {kind} source has no field {', '.join(map(repr, missing))}; its fields are: "
            f"{shown or 'none'}. Set {setting} to one of them, e.g. Job(source={{'uri': data, 'text_field': ...}})"
        )
    return [name for name in [*required, *optional] if name in available]


def _record_batches(data: Any, kind: str, source: SourceConfig) -> Iterator[pa.RecordBatch]:
    """The object's needed columns as record batches of one schema."""
    import pyarrow as pa

    if kind == "list":
        yield from _python_table(_list_columns(list(data), source)).to_batches()
    elif kind == "pandas.DataFrame":
        frame = data
        if source.id_field not in frame.columns and frame.index.name == source.id_field:
            frame = frame.reset_index()  # df.set_index("id"): the index is the id field
        names = _columns_to_read([str(c) for c in frame.columns], source, kind)
        by_name = {str(c): c for c in frame.columns}
        yield from _python_table({n: frame[by_name[n]] for n in names}, pandas=True).to_batches()
    elif kind in ("pyarrow.Table", "pyarrow.RecordBatch"):
        names = _columns_to_read(data.schema.names, source, kind)
        table = data.select(names)
        yield from (table.to_batches() if kind == "pyarrow.Table" else [table])
    elif kind == "datasets.Dataset":
        names = _columns_to_read(list(data.column_names), source, kind)
        dataset = data.select_columns(names).with_format("arrow")
        for start in range(0, len(dataset), 8 * SPOOL_BATCH_ROWS):
            yield from dataset[start : start + 8 * SPOOL_BATCH_ROWS].to_batches()
    else:  # a RecordBatchReader, or any Arrow C stream (polars, DuckDB...)
        reader = data if isinstance(data, pa.RecordBatchReader) else pa.RecordBatchReader.from_stream(data)
        names = _columns_to_read(reader.schema.names, source, kind)
        for batch in reader:
            yield batch.select(names)


def _list_columns(items: list[Any], source: SourceConfig) -> dict[str, list[Any]]:
    """The columns of a list of strings (the text field) or of dicts (their fields).

    Raises:
        InMemorySourceError: the list mixes dicts and other items, or no dict has the text field.
    """
    mappings = [isinstance(item, Mapping) for item in items]
    if any(mappings) and not all(mappings):
        at = mappings.index(not mappings[0])
        raise InMemorySourceError(
            f"a list source holds strings or dicts, not both: item 0 is {type(items[0]).__name__}, item {at} is "
            f"{type(items[at]).__name__}"
        )
    if not all(mappings) or not items:  # strings (a non-string item is quarantined when read)
        if source.metadata_fields:
            raise InMemorySourceError(
                f"a list of strings has no field {source.metadata_fields[0]!r}: give a list of dicts to keep "
                "metadata_fields"
            )
        return {source.text_field: items}
    seen: dict[str, None] = {}
    for item in items:
        seen.update(dict.fromkeys(map(str, item.keys())))
    names = _columns_to_read(list(seen), source, "list of dicts")
    return {name: [item.get(name) for item in items] for name in names}


def _python_table(columns: Mapping[str, Any], pandas: bool = False) -> pa.Table:
    """A table of Python (or pandas) columns; a column Arrow cannot give one type is JSON text."""
    import pyarrow as pa

    arrays, fields = [], []
    for name, values in columns.items():
        try:
            array = pa.array(values, from_pandas=True) if pandas else pa.array(values)
            if pa.types.is_null(array.type):
                array = array.cast(pa.string())
            field = pa.field(name, array.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            listed = [None if v is None or (isinstance(v, float) and v != v) else v  # NaN: pandas' null
                      for v in (values.tolist() if pandas else values)]
            array = pa.array([None if v is None else json.dumps(v, default=_unsupported) for v in listed], pa.string())
            field = pa.field(name, pa.string(), metadata={JSON_FIELD_KEY: b"1"})
        arrays.append(array)
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _unsupported(value: Any) -> dict[str, str]:
    """A value JSON cannot hold (bytes, an object), spooled as a dict: read back, it is still not a
    string, so a text or id of that kind is quarantined rather than embedded as its ``repr``."""
    return {"unsupported_type": type(value).__name__, "repr": repr(value)[:200]}


def _fixed_rows(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The rows of ``first`` then ``rest``, re-cut into batches of exactly ``SPOOL_BATCH_ROWS``
    rows (the last may be shorter), so a row's batch is ``row // SPOOL_BATCH_ROWS``."""
    import pyarrow as pa

    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in _chain(first, rest):
        if batch.schema != first.schema:
            batch = batch.cast(first.schema)  # pragma: no cover - one source gives one schema
        pending.append(batch)
        rows += batch.num_rows
        while rows >= SPOOL_BATCH_ROWS:
            table = pa.Table.from_batches(pending, schema=first.schema)
            yield table.slice(0, SPOOL_BATCH_ROWS).combine_chunks().to_batches()[0]
            rest_table = table.slice(SPOOL_BATCH_ROWS)
            pending = rest_table.to_batches()
            rows = rest_table.num_rows
    if rows:
        yield pa.Table.from_batches(pending, schema=first.schema).combine_chunks().to_batches()[0]


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


class _HashingFile:
    """A binary file that hashes what is written to it (the spool's fingerprint, in one pass)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.closed = False
        self._hash = hashlib.blake2b(digest_size=16)

    def write(self, data: Any) -> int:
        self._hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
