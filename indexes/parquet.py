"""The Parquet sink: one ``part-<key>.parquet`` file per shard, directly under the output URI.

The files form one dataset for any Parquet reader::

    import pyarrow.dataset as ds
    table = ds.dataset("out/parquet", format="parquet").to_table()

Readers skip ``_embedder/`` (names starting with ``_`` or ``.``), where the checkpoint and the staging
files live. A shard's file name is derived from its id (``part-<sha1(shard_id)[:16]>.parquet``), so
redoing a shard replaces its file instead of adding a second one.

Atomic commit, per storage:

* local disk: the writer streams to ``<uri>/_embedder/staging/part-<key>.<attempt>.parquet``;
  ``commit`` fsyncs it and ``os.replace``-s it to its final name (atomic on one filesystem).
* object stores: the writer streams to the final key with ``fs.open(path, "wb", autocommit=False)``
  (a multipart upload on S3); ``commit`` completes the upload, the moment the object appears whole.
  A dead attempt leaves an incomplete upload that no reader lists; ``abort`` aborts it on S3.

Fencing (``fence``): the run's lease token is written to ``_embedder/fence.json``, then every file
staged by earlier writers is deleted (local) or every incomplete upload of a part file aborted
(S3). A commit checks that the fence file holds its own token and then publishes by consuming its
staged file (``os.replace`` of it, or completing its upload). A stale writer that passed the check
just before another run fenced finds its staged file gone (``FileNotFoundError``, ``NoSuchUpload``):
the publish itself fails, so no check-then-act window is left.

Filters (``read`` and Parquet search): ``None``, a ``pyarrow.compute`` expression, or a small SQL
subset (see ``parse_filter``) that means the same as in Lance for the same predicate.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.config import OutputConfig
from embedder.errors import UsageError
from embedder.failpoints import failpoint
from embedder.lease import LeaseLost
from embedder.storage import filesystem, is_local, join, read_bytes, write_bytes_atomic
from indexes.base import (
    STAGING_DIR,
    ShardWriter,
    Sink,
    SinkError,
    adopt_quantization,
    check_compatible,
    check_inside,
    check_shard_rows,
    shard_key,
)
from indexes.registry import register_sink

if TYPE_CHECKING:
    import fsspec
    import pyarrow.dataset as pads

ROW_GROUP_ROWS = 65_536
"""Most rows per row group; each ``write()`` call ends at least one row group."""

PART_GLOB = "part-*.parquet"

FENCE_FILE = "_embedder/fence.json"
"""Holds the fencing token of the run allowed to publish part files (``ParquetSink.fence``)."""


class FilterError(UsageError, ValueError):
    """A filter string outside the SQL subset the Parquet sink understands."""


def part_name(shard_id: str) -> str:
    """The part file of a shard: deterministic, so a redone shard replaces its file."""
    return f"part-{shard_key(shard_id)}.parquet"


def open_dataset(
    fs: fsspec.AbstractFileSystem, root: str, schema: pa.Schema | None = None
) -> pads.Dataset | None:
    """The committed part files under ``root`` as one pyarrow dataset, or None when there are none.

    Lists ``part-*.parquet`` directly under ``root`` (fresh listing, no cache), so staging files
    and incomplete uploads never enter.
    """
    import pyarrow.dataset as pads

    local = is_local(fs)
    if not local:
        fs.invalidate_cache(root)
    files = sorted(fs.glob(join(root, PART_GLOB)))
    if not files:
        return None
    return pads.dataset(files, schema=schema, format="parquet", filesystem=None if local else fs)


@register_sink("parquet")
class ParquetSink(Sink):
    """Writes the output table as Parquet part files, one per shard, each committed atomically.

    Args:
        config: The job's ``output`` section (``uri`` is the dataset folder; ``table`` is unused).
        schema: The output schema, provenance included (kept in every file's metadata).

    Example:
        >>> sink = ParquetSink(OutputConfig(uri="out/parquet"), schema)
        >>> sink.open()
        >>> writer = sink.begin("docs.jsonl@0-1000")
        >>> writer.write(rows)
        >>> writer.commit()
    """

    def __init__(self, config: OutputConfig, schema: pa.Schema) -> None:
        super().__init__(config, schema)
        self.fs, self.root = filesystem(config.uri, config.storage_options)
        self.local = is_local(self.fs)
        self.staging_dir = join(self.root, STAGING_DIR)

    def existing_schema(self) -> pa.Schema | None:
        if not self.fs.exists(self.root):
            return None
        if not self.local:
            self.fs.invalidate_cache(self.root)
        existing = sorted(self.fs.glob(join(self.root, PART_GLOB)))
        if not existing:
            return None
        with self.fs.open(existing[0], "rb") as f:
            return pq.read_schema(f)

    def open(self) -> None:
        """Creates the folder (local disk) or checks that the part files there are compatible."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        else:
            self.fs.invalidate_cache(self.root)
        existing = sorted(self.fs.glob(join(self.root, PART_GLOB)))
        if existing:
            with self.fs.open(existing[0], "rb") as f:
                stored = pq.read_schema(f)
            check_compatible(stored, self.schema, self.location)
            self.schema = adopt_quantization(stored, self.schema)

    def fence(self, token: str) -> None:
        """Writes ``token`` to the fence file, then removes every file earlier writers staged
        (local) or aborts their incomplete part uploads (S3): their publish can no longer happen."""
        self.fence_token = token
        write_bytes_atomic(self.fs, join(self.root, FENCE_FILE), json.dumps({"token": token}).encode())
        if self.local:
            if os.path.isdir(self.staging_dir):
                staged = [join(self.staging_dir, e) for e in os.listdir(self.staging_dir) if e.startswith("part-")]
                for path in check_inside(self.root, staged, local=True):
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
        else:
            self._abort_uploads(None)

    def check_fence(self, what: str) -> None:
        """Raises ``LeaseLost`` when another run's token is in the fence file (this sink being fenced)."""
        if self.fence_token is None:
            return
        holder = self._stored_fence()
        if holder != self.fence_token:
            raise self.fenced_out(what, holder)

    def _stored_fence(self) -> str | None:
        """The token in the fence file (None: no file, or one that is not a fence record)."""
        path = join(self.root, FENCE_FILE)
        if not self.local:
            self.fs.invalidate_cache(path)
        raw = read_bytes(self.fs, path)
        try:
            return json.loads(raw)["token"] if raw else None
        except (ValueError, KeyError, TypeError):
            return None

    def begin(self, shard_id: str) -> ParquetShardWriter:
        return ParquetShardWriter(self, shard_id)

    def abort(self, shard_id: str) -> None:
        self.abort_many([shard_id])

    def abort_many(self, shard_ids: list[str]) -> None:
        """Deletes the shards' part files, staging leftovers and (S3) incomplete uploads, in one listing each."""
        names = {part_name(s) for s in shard_ids}
        if not names:
            return
        self.check_fence("aborting shards")
        stems = {name.removesuffix(".parquet") for name in names}
        if not self.local:
            self.fs.invalidate_cache(self.root)
        doomed = [p for p in self.fs.glob(join(self.root, PART_GLOB)) if p.rsplit("/", 1)[-1] in names]
        if self.local and os.path.isdir(self.staging_dir):
            doomed += [
                join(self.staging_dir, entry)
                for entry in os.listdir(self.staging_dir)
                if entry.split(".", 1)[0] in stems
            ]
        if doomed:
            self.fs.rm(check_inside(self.root, doomed, local=self.local))
        if not self.local:
            self._abort_uploads(names)

    def _abort_uploads(self, names: set[str] | None) -> None:
        """Aborts incomplete multipart uploads of the given part files (all of them: None) (S3 only;
        other stores expire them)."""
        call_s3 = getattr(self.fs, "call_s3", None)
        if call_s3 is None:
            return
        bucket, _, prefix = self.root.partition("/")
        key_prefix = f"{prefix.rstrip('/')}/part-" if prefix else "part-"
        response = call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix)
        for upload in response.get("Uploads", []) or []:
            if names is None or upload["Key"].rsplit("/", 1)[-1] in names:
                self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])

    def reset(self) -> None:
        """Deletes every part file and staging leftover."""
        if not self.local:
            self.fs.invalidate_cache(self.root)
        doomed = list(self.fs.glob(join(self.root, PART_GLOB)))
        if self.local and os.path.isdir(self.staging_dir):
            doomed += [join(self.staging_dir, entry) for entry in os.listdir(self.staging_dir)]
        if doomed:
            self.fs.rm(check_inside(self.root, doomed, local=self.local))

    def delete_rows(self, by_shard: dict[str, list[str]]) -> int:
        """Rewrites each affected part file without the given ids (one atomic replace per file)."""
        self.check_fence("deleting rows")
        deleted = 0
        for shard_id, ids in by_shard.items():
            path = join(self.root, part_name(shard_id))
            if not self.fs.exists(path):
                continue
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f)
            keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string())))
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            deleted += table.num_rows - kept.num_rows
            if kept.num_rows == 0:
                self.fs.rm(check_inside(self.root, [path], local=self.local))
                continue
            kept = kept.replace_schema_metadata(table.schema.metadata)
            if self.local:
                os.makedirs(self.staging_dir, exist_ok=True)
                tmp = join(self.staging_dir, f"{part_name(shard_id)}.{uuid.uuid4().hex}.rewrite")
                pq.write_table(kept, tmp, **_column_encodings(self.schema))
                os.replace(tmp, path)
            else:
                with self.fs.open(path, "wb") as f:  # one PUT/upload: the object is replaced whole
                    pq.write_table(kept, f, **_column_encodings(self.schema))
        return deleted

    def read(self, columns: list[str] | None = None, filter: str | pc.Expression | None = None) -> pa.Table:
        """Committed rows; ``filter`` is None, a pyarrow expression or a SQL subset string (``parse_filter``)."""
        dataset = open_dataset(self.fs, self.root)
        expression = to_expression(filter)
        if dataset is None:
            empty = self.schema.empty_table()
            return empty.select(columns) if columns is not None else empty
        return dataset.to_table(columns=columns, filter=expression)

    def count_rows(self) -> int:
        dataset = open_dataset(self.fs, self.root)
        return 0 if dataset is None else dataset.count_rows()


class ParquetShardWriter(ShardWriter):
    """Streams a shard's rows into one Parquet file, which ``commit`` publishes whole."""

    def __init__(self, sink: ParquetSink, shard_id: str) -> None:
        self._sink = sink
        self.shard_id = shard_id
        self._final = join(sink.root, part_name(shard_id))
        self._rows = 0
        self._done = False
        if sink.local:
            os.makedirs(sink.staging_dir, exist_ok=True)
            stem = part_name(shard_id).removesuffix(".parquet")
            self._staging: str | None = join(sink.staging_dir, f"{stem}.{uuid.uuid4().hex}.parquet")
            self._file: Any = open(self._staging, "wb")  # noqa: SIM115 - closed by commit/discard
        else:
            self._staging = None
            self._file = sink.fs.open(self._final, "wb", autocommit=False)
        self._writer = pq.ParquetWriter(self._file, sink.schema, **_column_encodings(sink.schema))

    def write(self, table: pa.Table) -> None:
        """Appends the rows as row groups of the shard's file (not visible until ``commit``)."""
        if self._done:
            raise SinkError(f"shard {self.shard_id!r}: this writer already committed or discarded; call sink.begin() again")
        check_shard_rows(table, self._sink.schema, self.shard_id)
        if table.num_rows:
            self._writer.write_table(table.replace_schema_metadata(self._sink.schema.metadata), ROW_GROUP_ROWS)
            self._rows += table.num_rows

    def commit(self) -> int:
        """Publishes the file: ``os.replace`` on local disk, completing the upload on object stores."""
        if self._done:
            raise SinkError(f"shard {self.shard_id!r}: this writer already committed or discarded")
        what = f"committing shard {self.shard_id!r}"
        try:
            self._sink.check_fence(what)
        except LeaseLost:
            self.discard()
            raise
        self._done = True
        self._writer.close()
        try:
            if self._staging is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                failpoint("before_publish")
                os.replace(self._staging, self._final)  # fails if a fence removed the staged file
                _fsync_dir(os.path.dirname(self._final))
            else:
                self._file.close()
                failpoint("before_publish")
                self._file.commit()  # fails (NoSuchUpload) if a fence aborted the upload
        except Exception:
            try:
                self._sink.check_fence(what)
            except LeaseLost as lost:
                if self._staging is not None:
                    _remove_if_present(self._staging)
                raise lost from None
            raise
        return self._rows

    def discard(self) -> None:
        """Drops the attempt: deletes the staging file, or aborts the incomplete upload."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.close()
        finally:
            self._file.close()
            if self._staging is not None:
                _remove_if_present(self._staging)
            else:
                self._file.discard()


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _column_encodings(schema: pa.Schema) -> dict[str, Any]:
    """Parquet settings per column: vectors stored plain, the rest zstd-compressed.

    Float vectors neither compress nor dictionary-encode, and min/max statistics of their values
    help no reader; skipping all three writes about 6x faster than zstd everywhere (measured:
    54k vs 8k rows/s at dim 1024) for a file of the same size. Dictionaries go to the columns that
    repeat (titles, shard ids, passthrough metadata), not to unique ones.
    """
    names = [name for name in schema.names if name != "vector"]
    unique = {"id", "text", "content_hash"}
    # int8 and packed-bit vectors: Parquet has no 8-bit physical type and would store each value in
    # an INT32 (4 bytes); a dictionary of at most 256 values packs them back into <= 8 bits each
    # (int8 of unit vectors: ~0.7 byte a value after zstd), measured in bench_vector_dtypes.py.
    small_ints = pa.types.is_integer(schema.field("vector").type.value_type)
    values = "vector.list.element"  # Parquet's path of the list's values: options keyed "vector" miss them
    return {
        "compression": {**dict.fromkeys(names, "zstd"), values: "zstd" if small_ints else "none"},
        "use_dictionary": [name for name in names if name not in unique] + ([values] if small_ints else []),
        "write_statistics": names,
    }


def _fsync_dir(path: str) -> None:
    """Makes a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- filters -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<quoted>"(?:[^"]|"")*"|`[^`]*`)
      | (?P<number>-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)
      | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"}
_COMPARE = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
FILTER_HELP = (
    "supported: column = 'text' (also != <> < <= > >=), column IN ('a', 'b'), column NOT IN (...), "
    "column IS [NOT] NULL, column [NOT] LIKE 'A%', AND / OR / NOT and parentheses; "
    "or pass a pyarrow.compute expression"
)


def to_expression(filter: str | pc.Expression | None) -> pc.Expression | None:
    """A pyarrow expression for ``filter`` (None, an expression, or a SQL subset string)."""
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    if isinstance(filter, str):
        return parse_filter(filter) if filter.strip() else None
    raise FilterError(f"filter must be a string or a pyarrow.compute.Expression, got {type(filter).__name__}")


def parse_filter(text: str) -> pc.Expression:
    """Parses the SQL subset that Parquet outputs support into a pyarrow expression.

    It covers what search filters need and means what Lance's SQL means for the same predicate
    (NULLs included: ``NULL = 'x'`` and ``NULL NOT IN (...)`` select nothing). Beyond it (functions,
    arithmetic, casts) pass a ``pyarrow.compute`` expression, or use the Lance sink.

    Example:
        >>> parse_filter("title = 'Paris' AND (url LIKE 'https://%' OR url IS NULL)")

    Raises:
        FilterError: with the position of the problem and the supported forms.
    """
    return _FilterParser(text).parse()


def filter_columns(text: str) -> list[str]:
    """The columns a filter string names, in order of first use (to check them against a schema).

    Raises:
        FilterError: when ``text`` does not parse (see ``parse_filter``).
    """
    parser = _FilterParser(text)
    parser.parse()
    return list(dict.fromkeys(parser.columns))


class _FilterParser:
    """Recursive descent over tokens: or → and → not → predicate."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            match = _TOKEN.match(text, pos)
            if not match:
                self._fail(f"unexpected character {text[pos:].lstrip()[:1]!r}", pos)
            kind = match.lastgroup or ""
            value, start = match.group(kind), match.start(kind)
            if kind == "word" and value.upper() in _KEYWORDS:
                kind, value = "keyword", value.upper()
            self.tokens.append((kind, value, start))
            pos = match.end()
        self.index = 0
        self.columns: list[str] = []

    def parse(self) -> pc.Expression:
        expression = self._or()
        if self.index < len(self.tokens):
            self._fail(f"unexpected {self.tokens[self.index][1]!r}", self.tokens[self.index][2])
        return expression

    # grammar

    def _or(self) -> pc.Expression:
        expression = self._and()
        while self._accept("keyword", "OR"):
            expression = expression | self._and()
        return expression

    def _and(self) -> pc.Expression:
        expression = self._not()
        while self._accept("keyword", "AND"):
            expression = expression & self._not()
        return expression

    def _not(self) -> pc.Expression:
        if self._accept("keyword", "NOT"):
            return ~self._not()
        return self._predicate()

    def _predicate(self) -> pc.Expression:
        if self._accept("op", "("):
            expression = self._or()
            self._expect("op", ")")
            return expression
        left = self._operand()
        if self._accept("keyword", "IS"):
            negate = self._accept("keyword", "NOT")
            self._expect("keyword", "NULL")
            return ~left.is_null() if negate else left.is_null()
        negate = self._accept("keyword", "NOT")
        if self._accept("keyword", "IN"):
            # SQL: NULL IN (...) is NULL, so neither IN nor NOT IN selects a NULL row.
            found = pc.is_in(left, value_set=self._value_list(), skip_nulls=True)
            expression = pc.if_else(left.is_valid(), found, pa.scalar(None, pa.bool_()))
            return ~expression if negate else expression
        if self._accept("keyword", "LIKE"):
            pattern = self._literal()
            if not isinstance(pattern, str):
                self._fail("LIKE needs a quoted pattern", self._position())
            expression = pc.match_like(left, pattern)
            return ~expression if negate else expression
        if negate:
            self._fail("expected IN or LIKE after NOT", self._position())
        kind, value, pos = self._next()
        if kind != "op" or value not in _COMPARE:
            self._fail(f"expected a comparison after the column, got {value!r}", pos)
        return _COMPARE[value](left, self._operand())

    def _operand(self) -> pc.Expression:
        kind, value, pos = self._peek()
        if kind in ("word", "quoted"):
            self.index += 1
            if kind == "quoted":
                value = value[1:-1].replace('""', '"') if value[0] == '"' else value[1:-1]
            self.columns.append(value)
            return pc.field(value)
        return pc.scalar(self._literal())

    def _literal(self) -> Any:
        kind, value, pos = self._next()
        if kind == "string":
            return value[1:-1].replace("''", "'")
        if kind == "number":
            return float(value) if any(c in value for c in ".eE") else int(value)
        if kind == "keyword" and value in ("TRUE", "FALSE"):
            return value == "TRUE"
        self._fail(f"expected a column or a value, got {value or 'the end'!r}", pos)

    def _value_list(self) -> pa.Array:
        self._expect("op", "(")
        values = [self._literal()]
        while self._accept("op", ","):
            values.append(self._literal())
        self._expect("op", ")")
        return pa.array(values)

    # tokens

    def _peek(self) -> tuple[str, str, int]:
        if self.index < len(self.tokens):
            return self.tokens[self.index]
        return ("end", "", len(self.text))

    def _next(self) -> tuple[str, str, int]:
        token = self._peek()
        self.index += 1
        return token

    def _position(self) -> int:
        return self._peek()[2]

    def _accept(self, kind: str, value: str) -> bool:
        token_kind, token_value, _ = self._peek()
        if token_kind == kind and token_value == value:
            self.index += 1
            return True
        return False

    def _expect(self, kind: str, value: str) -> None:
        if not self._accept(kind, value):
            got = self._peek()[1] or "the end"
            self._fail(f"expected {value!r}, got {got!r}", self._position())

    def _fail(self, message: str, position: int) -> NoReturn:
        raise FilterError(f"cannot parse filter {self.text!r} at position {position}: {message}. {FILTER_HELP}")
