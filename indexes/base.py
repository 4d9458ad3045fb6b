"""The sink contract: an explicit commit protocol, shard by shard.

Like Ray Data's ``Datasink`` and Hadoop's output committers::

    sink.open()                        # once: create or check the table
    sink.fence(lease.token)            # once: from now on only this lease's commits land
    sink.abort(shard_id)               # before redoing a shard: drop what a dead attempt left
    writer = sink.begin(shard_id)
    writer.write(table) ...            # any number of times, invisible to readers
    writer.commit()                    # atomically publish the whole shard
    ...                                # (the runner records completion only after this)
    sink.finish()                      # once at the end: compaction, indexes

A sink never exposes half a shard: rows written before ``commit`` are invisible to readers, and
``abort`` removes every trace of an attempt that never committed — and of one that committed but
whose completion was never recorded.

Fencing: a writer can stall past its lease (SIGSTOP, a frozen VM) while another run takes the
output over. ``fence(token)`` stores the new lease's token with the data and invalidates what older
writers staged; from then on each ``commit`` proves in the publishing step itself that the stored
token is still its own, so a stale writer's commit is refused (``LeaseLost``) and its staged rows
are removed. A check of the lease file followed by a publish would leave a window between the two;
each sink closes it with an atomic step of its storage (see ``LanceSink.fence``, ``ParquetSink.fence``).
"""

from __future__ import annotations

import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from embedder.checkpoint import shard_key
from embedder.config import OutputConfig
from embedder.errors import UsageError
from embedder.lease import LeaseLost
from embedder.schema import (
    PROVENANCE_KEY,
    fingerprint_differences,
    provenance_of,
    vector_dim_of,
    with_vector_dtype,
)

__all__ = [
    "STAGING_DIR",
    "ShardWriter",
    "adopt_quantization",
    "Sink",
    "SinkError",
    "check_compatible",
    "check_inside",
    "check_shard_rows",
    "shard_key",
]

STAGING_DIR = "_embedder/staging"
"""Where sinks keep their per-attempt staging state, under the output URI (dataset readers skip it)."""

class SinkError(UsageError, RuntimeError):
    """The output cannot be written (incompatible existing table, unreachable store...)."""


def check_inside(root: str, paths: Iterable[str], *, local: bool) -> list[str]:
    """Refuses any path outside the output before a sink deletes (or creates) it.

    Sinks build paths from the job (the table name) and from their own staging records; either
    could hold ``..`` or an absolute path. Every path a sink removes passes through here first, so
    a bad name fails with nothing touched instead of deleting beside the output.

    Args:
        root: The output's root path, as the sink's filesystem names it.
        paths: Paths the sink is about to touch.
        local: Whether ``root`` is on local disk (relative paths are then made absolute). The check
            is lexical (``..`` and ``.`` resolved), so a symlink the user put inside the output
            stays theirs to keep.

    Returns:
        ``paths`` as a list, unchanged.

    Raises:
        SinkError: naming the first path outside ``root``.
    """
    paths = list(paths)
    normalize = os.path.abspath if local else posixpath.normpath
    base = normalize(root.rstrip("/") or "/")
    for path in paths:
        resolved = normalize(path)
        if resolved != base and not resolved.startswith(base.rstrip("/") + "/"):
            raise SinkError(
                f"refusing to delete {path!r}: it is outside the output {root!r} "
                "(check output.table, a plain name, and the staging records under _embedder/staging)"
            )
    return paths


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
        schema: The output schema (``embedder.schema.output_schema``), provenance included; its vector
            column is stored as ``config.vector_dtype`` (``embedder.schema.with_vector_dtype``).
    """

    name: ClassVar[str] = ""

    def __init__(self, config: OutputConfig, schema: pa.Schema) -> None:
        self.config = config
        self.schema = with_vector_dtype(schema, getattr(config, "vector_dtype", "float32"))
        self.fence_token: str | None = None

    @classmethod
    def preload(cls) -> None:
        """Imports the libraries ``open`` and the writers need. The run calls it in its own thread
        right after the scheduler starts, so that on Ray importing them overlaps the encoder actors
        loading the model (LanceDB's import alone takes 1.6 s on a 2-core machine); never from a
        background thread, where it could race the model's imports. Default: nothing."""
        return None

    def fence(self, token: str) -> None:
        """Makes the holder of ``token`` (``Lease.token``) the only writer whose commits land.

        Called once after ``open`` and before any shard is written. The base class only remembers
        the token (a plugin sink without fencing relies on the lease alone); the built-in sinks
        store it with the data and invalidate older writers' staged rows.
        """
        self.fence_token = token

    def fenced_out(self, what: str, holder: str | None) -> LeaseLost:
        """The error a stale writer gets: another run took the output over (token ``holder``)."""
        return LeaseLost(
            f"{what} of {self.config.uri!r} refused: another job took this output over (lease "
            f"{str(holder)[:14]!s}, this job's was {str(self.fence_token)[:14]}) while this one was paused "
            "past runner.lease_ttl_s; nothing of it was committed and its staged rows were removed. "
            "The other job writes the output; if it failed, run this command again"
        )

    @property
    def location(self) -> str:
        """The output as refusals name it (``check_compatible``)."""
        return self.config.uri

    @abstractmethod
    def open(self) -> None:
        """Creates the output if absent; checks an existing one has a compatible schema."""

    def existing_schema(self) -> pa.Schema | None:
        """The schema of the rows the output already holds (None when it holds none), read without
        writing anything (``embedder run --dry-run`` checks the fingerprint with it)."""
        return None

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

    def reset(self) -> None:
        """Removes every row (a reembed pass starts from scratch; Lance keeps old versions)."""
        raise NotImplementedError(f"the {self.name} sink cannot reset its output")

    def delete_rows(self, by_shard: dict[str, list[str]]) -> int:
        """Deletes rows by id, grouped by the ``shard_id`` they carry; returns rows deleted.

        Used by incremental passes to drop replaced, shrunk and vanished chunks. Idempotent: ids
        already gone are ignored.
        """
        raise NotImplementedError(f"the {self.name} sink cannot delete rows (incremental runs need it)")

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


def check_compatible(existing: pa.Schema, wanted: pa.Schema, location: str) -> None:
    """Refuses to add rows to an output whose stored vectors another setting made.

    Every key of the vector fingerprint (``embedder.schema.FINGERPRINT_KEYS``: model, weights,
    pooling, normalization, prompts, sequence limit, chunking, output options), the vector size and
    the column set must match: rows of two settings in one index would silently rank against each
    other.

    Raises:
        SinkError: naming each differing key with both values, and the two ways out (``--mode
            reembed``, or a new output).
    """
    differences = []
    found = fingerprint_differences(provenance_of(existing), provenance_of(wanted))
    old_dim = vector_dim_of(existing) if existing.get_field_index("vector") >= 0 else None
    new_dim = vector_dim_of(wanted)
    if old_dim != new_dim:
        differences.append(f"vector dim: {old_dim} stored, {new_dim} in this job")
    elif _vector_dim(existing) != _vector_dim(wanted) and not any(key == "vector_dtype" for key, _, _ in found):
        differences.append(f"vector column: {existing.field('vector').type} stored, {wanted.field('vector').type} in this job")
    for key, old, new in found:
        if key == "dim" and old_dim != new_dim:
            continue
        differences.append(f"{key}: {old!r} stored, {new!r} in this job")
    if existing.names != wanted.names:
        differences.append(f"columns: {existing.names} stored, {wanted.names} in this job")
    if differences:
        raise SinkError(
            f"the output {location} holds vectors made with other settings ({'; '.join(differences)}); "
            "adding rows would mix two kinds of vectors in one index. Either embed everything again with "
            "this job's settings (--mode reembed, or output.mode: reembed: the old rows are replaced), "
            "or write to a new output (--output NEW_URI)."
        )


def adopt_quantization(existing: pa.Schema, wanted: pa.Schema) -> pa.Schema:
    """``wanted`` with the quantization parameters the existing rows were stored with (checked
    compatible first), so a resumed run writes its rows exactly as the first pass did."""
    import json

    stored = provenance_of(existing).get("quantization")
    provenance = provenance_of(wanted)
    if not stored or provenance.get("quantization") == stored:
        return wanted
    provenance["quantization"] = stored
    return wanted.with_metadata({**(wanted.metadata or {}), PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})


def _vector_dim(schema: pa.Schema) -> int | None:
    index = schema.get_field_index("vector")
    if index < 0:
        return None
    vector_type = schema.field(index).type
    return getattr(vector_type, "list_size", None)


def check_shard_rows(table: pa.Table, schema: pa.Schema, shard_id: str) -> None:
    """Refuses rows a sink could not later ``abort``: another schema, or another shard's ``shard_id``."""
    if not table.schema.equals(schema, check_metadata=False):
        expected = {f.name: _describe_field(f) for f in schema}
        got = {f.name: _describe_field(f) for f in table.schema}
        differences = [
            f"{name}: {got.get(name, 'missing')}, expected {expected.get(name, 'no such column')}"
            for name in dict.fromkeys([*expected, *got])
            if got.get(name) != expected.get(name)
        ] or [f"column order {table.schema.names}, expected {schema.names}"]
        raise SinkError(
            f"rows for shard {shard_id!r} do not have the sink's schema ({'; '.join(differences)}); "
            "build them with embedder.schema.chunks_to_table(chunks, vectors, schema)"
        )
    if table.num_rows and not pc.all(pc.equal(table.column("shard_id"), shard_id)).as_py():
        raise SinkError(f"rows written to shard {shard_id!r} must all carry shard_id={shard_id!r}")


def _describe_field(field: pa.Field) -> str:
    return f"{field.type}{'' if field.nullable else ' not null'}"
