"""The LanceDB sink: a LanceDB database whose table (``chunks`` by default) receives one commit per shard.

How a shard is written (Lance's distributed-write pattern, in one process):

1. ``write()`` buffers rows up to ``stage_bytes`` and then *stages* them as a Lance fragment with
   ``lance.fragment.write_fragments``: data files land under ``<table>.lance/data/`` but no manifest
   refers to them, so no reader sees them. Memory stays bounded by ``stage_bytes``, not the shard.
2. Each staged fragment is recorded in ``<uri>/_embedder/staging/<table>/<shard key>/`` so that a
   later ``abort`` (after a crash) can find and delete the data files of an attempt that never
   committed.
3. ``commit()`` appends every staged fragment of the shard in one ``LanceDataset.commit(Append)``:
   one new table version holds the whole shard, or none of it.

Fencing (``fence``): the run's lease token goes into the table's config (``FENCE_KEY``), then a
``Restore`` of the latest version is committed, a transaction Lance finds incompatible with every
transaction staged against an older version. ``commit()`` opens the latest version, refuses it
unless its stored token is the writer's own, and commits with ``read_version`` = that version. A
stale writer thus fails either at the check (the new token is stored) or at the commit (the
``Restore`` lies between its read version and the head: ``CommitConflictError``); there is no
window between the two in which another run's fence could slip unnoticed. Deletes (``abort``,
incremental prunes) and compaction work the same way.

``abort`` deletes committed rows of the shards (``shard_id IN (...)``, one scan and one delete, and
no new version when nothing matches) and the staged files of dead attempts. ``finish`` compacts
small fragments, builds the search indexes (below) and removes old versions and unreferenced files,
so versions stay bounded.

Indexes built by ``finish`` (``build_indexes``), so that search is fast and hybrid search works:

* a **vector index** on ``vector`` (cosine), chosen by table size (``plan_vector_index``):
  none below ``INDEX_MIN_ROWS`` rows (exact search over that few vectors takes tens of
  milliseconds, and an approximate index would only cost recall); ``IVF_HNSW_SQ`` up to
  ``PQ_MIN_ROWS`` (graph search, 8-bit scalar quantization: ~99% recall, a byte per dimension);
  ``IVF_PQ`` beyond (product quantization keeps a 35M-chunk Wikipedia table's index in a few GB;
  queries re-rank the candidates with the full vectors, ``refine_factor``).
* a **full-text index** on ``text`` (Lance's native inverted index: BM25, English stemming and
  stop words; works on object storage too), for ``fts`` and ``hybrid`` search.

A later run that adds rows folds them into the existing indexes (``optimize_indices``); an index is
rebuilt when the table has outgrown it (twice the rows it was trained on, or a size that calls for
the other index type).

Storage options: the job's ``output.storage_options`` are fsspec (s3fs) options, because the
checkpoint reads the same output through fsspec. ``embedder.storage.object_store_options`` derives Lance's
(object_store) options from them and the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from embedder.config import OutputConfig
from embedder.failpoints import failpoint
from embedder.lease import LeaseLost
from embedder.storage import filesystem, is_local, join, object_store_options, read_bytes, write_bytes_atomic
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
    import lance
    import lancedb
    from lance.fragment import FragmentMetadata

STAGE_BYTES = 64 << 20
"""Bytes of rows a shard writer buffers before staging them as one fragment (bounds memory per shard)."""

PRUNE_EVERY = 64
"""Commits between two prunings of old table versions during a run (``finish`` prunes them all)."""

DELETE_BATCH = 1000
"""Ids per delete predicate in incremental prunes."""

RETAIN_VERSIONS = 16
"""Versions a pruning keeps: commits in flight read the latest one, so a few recent ones suffice."""

FENCE_KEY = "embedder.lease_token"
"""Table config key holding the fencing token of the run allowed to commit (``LanceSink.fence``)."""

log = logging.getLogger("embedder")

INDEX_MIN_ROWS = 100_000
"""Rows from which ``finish`` builds a vector index (env ``EMBEDDER_INDEX_MIN_ROWS`` overrides).
Below it, exact search is fast (LanceDB: brute force over 100K vectors takes ~20 ms) and exact."""

PQ_MIN_ROWS = 5_000_000
"""Rows from which the vector index is ``IVF_PQ`` rather than ``IVF_HNSW_SQ`` (env
``EMBEDDER_PQ_MIN_ROWS`` overrides): an 8-bit SQ index of 5M 1024-d vectors is already ~5 GB."""

HNSW_ROWS_PER_PARTITION = 500_000
"""IVF_HNSW_SQ: rows per IVF partition (one HNSW graph each; queries probe every partition)."""

HNSW_M, HNSW_EF_CONSTRUCTION = 16, 200
"""HNSW graph degree and build beam: the usual recall/build-time balance (hnswlib's defaults)."""

PQ_NPROBE_FRACTION, PQ_MIN_NPROBES, PQ_REFINE_FACTOR = 0.02, 20, 10
"""IVF_PQ queries scan 2% of the partitions (at least 20) and re-rank 10x ``k`` candidates exactly."""

VECTOR_INDEX_NAME, TEXT_INDEX_NAME = "vector_idx", "text_idx"
VectorIndexKind = Literal["IVF_HNSW_SQ", "IVF_PQ", "IVF_FLAT"]
_LANCE_INDEX_TYPES = {
    "IvfHnswSq": "IVF_HNSW_SQ", "IVF_HNSW_SQ": "IVF_HNSW_SQ", "IvfPq": "IVF_PQ", "IVF_PQ": "IVF_PQ",
    "IvfFlat": "IVF_FLAT", "IVF_FLAT": "IVF_FLAT",
}

def connect_database(uri: str, storage_options: Mapping[str, Any] | None = None) -> lancedb.DBConnection:
    """Connects to the LanceDB database at ``uri`` (local path or object store URL)."""
    try:
        import lancedb
    except ImportError as err:  # pragma: no cover - lancedb is a core dependency
        raise SinkError("the lance sink needs lancedb: pip install lancedb pylance") from err
    return lancedb.connect(uri, storage_options=object_store_options(uri, storage_options))


def table_exists(db: lancedb.DBConnection, name: str) -> bool:
    """Whether the database has a table ``name`` (follows the listing's pages)."""
    page_token = None
    while True:
        page = db.list_tables(page_token=page_token)
        if name in page.tables:
            return True
        page_token = page.page_token
        if not page_token:
            return False


def sql_string(value: str) -> str:
    """``value`` as a SQL string literal: quotes doubled, everything else (``\\``, ``#``, ``/``) literal."""
    return "'" + value.replace("'", "''") + "'"


def shard_filter(shard_ids: Iterable[str]) -> str:
    """The SQL predicate selecting rows of the given shards."""
    return f"shard_id IN ({', '.join(sql_string(s) for s in shard_ids)})"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SinkError(f"{name}={raw!r} is not an integer (a row count)") from None


@dataclass(slots=True, frozen=True)
class VectorIndexPlan:
    """The vector index a table of a given size gets, and how queries should use it.

    Attributes:
        kind: ``IVF_HNSW_SQ`` or ``IVF_PQ`` (float vectors, cosine), ``IVF_FLAT`` (binary vectors, Hamming).
        num_partitions: IVF partitions (k-means centroids).
        num_sub_vectors: PQ sub-vectors (``IVF_PQ`` only).
        nprobes: Partitions a query scans.
        refine_factor: ``IVF_PQ``: candidates re-ranked with the full vectors, as a multiple of ``k``.
    """

    kind: VectorIndexKind
    num_partitions: int
    num_sub_vectors: int | None = None
    nprobes: int = 1
    refine_factor: int | None = None


def pq_sub_vectors(dim: int) -> int:
    """PQ sub-vectors for ``dim``: 8 dimensions each (``dim / 8``) when 8 divides ``dim``, else the
    largest divisor of ``dim`` that keeps sub-vectors at least 8 long (1 for tiny vectors).

    One byte per sub-vector: ``dim / 8`` keeps 1024-d vectors in 128 bytes (32x smaller) with the
    recall of fine sub-spaces; queries re-rank candidates with the full vectors anyway.
    """
    if dim % 8 == 0:
        return dim // 8
    return max([d for d in range(1, dim // 8 + 1) if dim % d == 0], default=1)


def vector_index_for(kind: VectorIndexKind, rows: int, dim: int) -> VectorIndexPlan:
    """Parameters of a ``kind`` index over ``rows`` vectors of ``dim`` (see ``plan_vector_index``)."""
    if kind == "IVF_HNSW_SQ":
        partitions = max(1, math.ceil(rows / HNSW_ROWS_PER_PARTITION))
        return VectorIndexPlan("IVF_HNSW_SQ", partitions, nprobes=partitions)
    partitions = max(1, round(math.sqrt(rows)))
    nprobes = min(partitions, max(PQ_MIN_NPROBES, math.ceil(partitions * PQ_NPROBE_FRACTION)))
    if kind == "IVF_FLAT":
        return VectorIndexPlan("IVF_FLAT", partitions, nprobes=nprobes)
    return VectorIndexPlan("IVF_PQ", partitions, pq_sub_vectors(dim), nprobes, PQ_REFINE_FACTOR)


def plan_vector_index(
    rows: int, dim: int, min_rows: int | None = None, pq_min_rows: int | None = None, vector_dtype: str = "float32"
) -> VectorIndexPlan | None:
    """The vector index for a table of ``rows`` vectors of ``dim``, or None when it needs none.

    By ``vector_dtype`` (``output.vector_dtype``): float32 and float16 as below; ``binary``:
    ``IVF_FLAT`` with the Hamming metric (the only index Lance builds over packed bits: exact
    distances within the probed partitions, ``sqrt(rows)`` partitions, 2% probed); ``int8``: none
    (Lance indexes and searches only float and packed-bit vectors, so int8 outputs are searched
    exactly by ``embedder search``).

    * ``rows < min_rows`` (default ``INDEX_MIN_ROWS``): none; exact search is fast enough.
    * up to ``pq_min_rows`` (default ``PQ_MIN_ROWS``): ``IVF_HNSW_SQ``, a partition per
      ``HNSW_ROWS_PER_PARTITION`` rows, all probed: near-exact recall, a byte per dimension.
    * beyond: ``IVF_PQ`` with ``sqrt(rows)`` partitions (the usual IVF rule: as many partitions
      as rows per partition), ``pq_sub_vectors(dim)`` sub-vectors, 2% of partitions probed and
      10x ``k`` candidates re-ranked exactly.

    Example:
        >>> plan_vector_index(35_000_000, 1024)
        VectorIndexPlan(kind='IVF_PQ', num_partitions=5916, num_sub_vectors=128, nprobes=119, refine_factor=10)
    """
    min_rows = _env_int("EMBEDDER_INDEX_MIN_ROWS", INDEX_MIN_ROWS) if min_rows is None else min_rows
    pq_min_rows = _env_int("EMBEDDER_PQ_MIN_ROWS", PQ_MIN_ROWS) if pq_min_rows is None else pq_min_rows
    if rows <= 0 or rows < min_rows or vector_dtype == "int8":
        return None
    if vector_dtype == "binary":
        return vector_index_for("IVF_FLAT", rows, dim)
    return vector_index_for("IVF_PQ" if rows >= pq_min_rows else "IVF_HNSW_SQ", rows, dim)


def index_kind(index_type: str) -> str:
    """Our name (``IVF_PQ``...) of a Lance index type as ``list_indices`` reports it (``IvfPq``...)."""
    return _LANCE_INDEX_TYPES.get(index_type, index_type)


def build_indexes(
    table: lancedb.table.Table,
    *,
    vector: bool = True,
    text: bool = True,
    min_rows: int | None = None,
    pq_min_rows: int | None = None,
) -> dict[str, Any]:
    """Builds or refreshes the table's vector index (by size) and full-text index on ``text``.

    Existing indexes are kept and given the rows added since they were built; a vector index is
    rebuilt when the table has outgrown it (twice the rows it was trained on, or another kind).

    Args:
        table: A LanceDB table with the output schema.
        vector: Build/refresh the vector index (when the size calls for one).
        text: Build/refresh the full-text index on ``text``.
        min_rows: Rows from which a vector index is built (default ``INDEX_MIN_ROWS`` or env).
        pq_min_rows: Rows from which it is ``IVF_PQ`` (default ``PQ_MIN_ROWS`` or env).

    Returns:
        What was done, e.g. ``{"vector": "built IVF_HNSW_SQ", "text": "updated", "seconds": 1.2}``.
    """
    from lancedb.index import FTS, IvfFlat, IvfHnswSq, IvfPq

    from embedder.schema import vector_dim_of, vector_dtype_of

    started = time.perf_counter()
    done: dict[str, Any] = {}
    rows = table.count_rows()
    if rows == 0:
        return done
    existing = {idx.name: idx for idx in table.list_indices()}
    refresh: list[str] = []
    if vector:
        schema = table.schema
        vector_dtype = vector_dtype_of(schema)
        plan = plan_vector_index(rows, vector_dim_of(schema), min_rows, pq_min_rows, vector_dtype)
        if vector_dtype == "int8" and plan_vector_index(rows, vector_dim_of(schema), min_rows, pq_min_rows):
            done["vector"] = "none: Lance has no vector index over int8 vectors (exact search)"
        old = existing.get(VECTOR_INDEX_NAME)
        if plan is not None:
            old_stats = table.index_stats(VECTOR_INDEX_NAME) if old is not None else None
            outgrown = old_stats is None or 2 * old_stats.num_indexed_rows < rows
            if old is not None and index_kind(old.index_type) == plan.kind and not outgrown:
                if old_stats.num_unindexed_rows:
                    refresh.append(VECTOR_INDEX_NAME)
                    done["vector"] = f"updated {plan.kind}"
            else:
                if plan.kind == "IVF_FLAT":
                    config: Any = IvfFlat(distance_type="hamming", num_partitions=plan.num_partitions)
                elif plan.kind == "IVF_PQ":
                    config = IvfPq(
                        distance_type="cosine", num_partitions=plan.num_partitions, num_sub_vectors=plan.num_sub_vectors
                    )
                else:
                    config = IvfHnswSq(
                        distance_type="cosine", num_partitions=plan.num_partitions, m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION
                    )
                table.create_index("vector", config=config, replace=True, name=VECTOR_INDEX_NAME)
                done["vector"] = f"built {plan.kind} ({plan.num_partitions} partitions)"
        elif old is not None and table.index_stats(VECTOR_INDEX_NAME).num_unindexed_rows:
            refresh.append(VECTOR_INDEX_NAME)
            done["vector"] = "updated"
    if text:
        if TEXT_INDEX_NAME in existing:
            if table.index_stats(TEXT_INDEX_NAME).num_unindexed_rows:
                refresh.append(TEXT_INDEX_NAME)
                done["text"] = "updated"
        else:
            table.create_index("text", config=FTS(), replace=True, name=TEXT_INDEX_NAME)
            done["text"] = "built"
    if refresh:
        table.to_lance().optimize.optimize_indices(index_names=refresh)
    if done:
        done["seconds"] = round(time.perf_counter() - started, 3)
        log.info("indexes of %s (%d rows): %s", table.name, rows, done)
    return done


@register_sink("lance")
class LanceSink(Sink):
    """Writes the output table into a LanceDB database, one atomic commit per shard.

    Args:
        config: The job's ``output`` section (``uri`` is the database, ``table`` the table).
        schema: The output schema, provenance included.
        stage_bytes: Bytes of rows buffered per shard before they are staged as a fragment.
        prune_every: Commits between two prunings of old versions (each commit adds a version,
            whose manifest lists every fragment: without pruning, a long run keeps thousands).
        index_min_rows: Rows from which ``finish`` builds a vector index (default
            ``INDEX_MIN_ROWS``, env ``EMBEDDER_INDEX_MIN_ROWS``).
        fts_index: Whether ``finish`` builds the full-text index on ``text`` (default: the
            output config's ``fts_index`` where it has one, else True).

    Example:
        >>> sink = LanceSink(OutputConfig(uri="out/db"), schema)
        >>> sink.open()
        >>> writer = sink.begin("docs.jsonl@0-1000")
        >>> writer.write(rows)
        >>> writer.commit()
    """

    def __init__(
        self,
        config: OutputConfig,
        schema: pa.Schema,
        *,
        stage_bytes: int = STAGE_BYTES,
        prune_every: int = PRUNE_EVERY,
        index_min_rows: int | None = None,
        fts_index: bool | None = None,
    ) -> None:
        super().__init__(config, schema)
        from indexes.lancedb_embedding import with_embedding_function

        self.schema = with_embedding_function(self.schema)
        self.stage_bytes = stage_bytes
        self.prune_every = prune_every
        self.index_min_rows = index_min_rows
        self.vector_index = getattr(config, "vector_index", "auto") != "none"
        self.fts_index = bool(getattr(config, "fts_index", True)) if fts_index is None else fts_index
        self.index_report: dict[str, Any] = {}
        self._commits = 0
        self.storage_options = object_store_options(config.uri, config.storage_options)
        self.dataset_uri = join(config.uri, f"{config.table}.lance")
        self._fs, root = filesystem(config.uri, config.storage_options)
        self._root = root
        self._data_dir = join(root, f"{config.table}.lance", "data")
        self._staging_dir = join(root, STAGING_DIR, config.table)
        self._opened = False

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def preload(cls) -> None:
        import lance  # noqa: F401
        import lancedb  # noqa: F401

    @property
    def location(self) -> str:
        return f"{self.config.uri} (table {self.config.table!r})"

    def existing_schema(self) -> pa.Schema | None:
        if not self._fs.exists(self.dataset_uri):
            return None
        db = connect_database(self.config.uri, self.config.storage_options)
        return db.open_table(self.config.table).schema if table_exists(db, self.config.table) else None

    def open(self) -> None:
        """Creates the table (empty, with the schema) or checks that the existing one is compatible."""
        db = connect_database(self.config.uri, self.config.storage_options)
        if table_exists(db, self.config.table):
            table = db.open_table(self.config.table)
            check_compatible(table.schema, self.schema, self.location)
            self.schema = adopt_quantization(table.schema, self.schema)
        else:
            table = db.create_table(self.config.table, schema=self.schema)
        if not table.to_lance().uri.rstrip("/").endswith(f"{self.config.table}.lance"):
            raise SinkError(f"unexpected LanceDB layout: table {self.config.table!r} is not at {self.dataset_uri}")
        self._opened = True

    def fence(self, token: str) -> None:
        """Stores ``token`` in the table's config, then commits a ``Restore`` of the head version,
        so every transaction an older writer staged against an earlier version conflicts."""
        self._require_open()
        self.fence_token = token
        self.dataset().update_config({FENCE_KEY: token})
        self.dataset().restore()

    def fenced_dataset(self, what: str) -> lance.LanceDataset:
        """The latest version, after checking it holds this run's fencing token (when fenced).

        Commit or delete against it (``read_version`` = its version): a fence after this check
        makes that transaction conflict.

        Raises:
            LeaseLost: another run's token is stored.
        """
        dataset = self.dataset()
        if self.fence_token is not None:
            holder = dataset.config().get(FENCE_KEY)
            if holder != self.fence_token:
                raise self.fenced_out(what, holder)
        return dataset

    def _refused(self, what: str, err: BaseException) -> BaseException:
        """``LeaseLost`` when a failed transaction failed because another run fenced the table, else ``err``."""
        if self.fence_token is None:
            return err
        try:
            self.fenced_dataset(what)
        except LeaseLost as lost:
            return lost
        except Exception:  # the table itself is unreadable: report the original error
            return err
        return err

    def begin(self, shard_id: str) -> LanceShardWriter:
        self._require_open()
        return LanceShardWriter(self, shard_id)

    def abort(self, shard_id: str) -> None:
        self.abort_many([shard_id])

    def abort_many(self, shard_ids: list[str]) -> None:
        """Deletes committed rows of the shards (one scan, one delete) and their staged files."""
        self._require_open()
        shard_ids = list(dict.fromkeys(shard_ids))
        if not shard_ids:
            return
        dataset = self.fenced_dataset("aborting shards")
        predicate = shard_filter(shard_ids)
        if dataset.count_rows(filter=predicate) > 0:
            try:
                dataset.delete(predicate)
            except OSError as err:
                raise self._refused("aborting shards", err) from err
            dataset = self.dataset()
        self._remove_staged({shard_key(s) for s in shard_ids}, referenced=_data_files(dataset))

    def finish(self) -> None:
        """Compacts small fragments, builds the search indexes, then drops old versions and files no
        version refers to.

        Run it when no shard is being written (the runner calls it once, under the output's
        lease). Data files no version refers to are left to ``abort`` (their staging records name
        them) or to Lance's own age limit: another run that took the output over may be staging
        them right now (fencing). The indexes are
        ``build_indexes``'s: a vector index once the table has ``index_min_rows`` rows, and the
        full-text index on ``text`` unless ``fts_index`` is off; ``index_report`` says what was done.
        """
        self._require_open()
        dataset = self.fenced_dataset("finishing")
        if len(dataset.get_fragments()) > 1:
            try:
                dataset.optimize.compact_files()
            except OSError as err:
                raise self._refused("finishing", err) from err
            failpoint("during_compaction")
        table = connect_database(self.config.uri, self.config.storage_options).open_table(self.config.table)
        self.index_report = build_indexes(
            table, vector=self.vector_index, text=self.fts_index, min_rows=self.index_min_rows
        )
        self.fenced_dataset("finishing").cleanup_old_versions(older_than=timedelta(0))

    def _committed(self) -> None:
        """Counts a commit; every ``prune_every`` commits drops all but the last ``RETAIN_VERSIONS`` versions.

        Safe while other shards are being written: files no version refers to yet (staged
        fragments) are left alone; only ``finish`` deletes those.
        """
        self._commits += 1
        if self.prune_every > 0 and self._commits % self.prune_every == 0:
            self.dataset().cleanup_old_versions(retain_versions=RETAIN_VERSIONS)

    # -- reading ---------------------------------------------------------------------------------

    def dataset(self) -> lance.LanceDataset:
        """The table's Lance dataset at its latest version."""
        import lance

        return lance.dataset(self.dataset_uri, storage_options=self.storage_options)

    def read(self, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Committed rows; ``filter`` is a SQL predicate as Lance takes it (``title = 'X'``)."""
        self._require_open()
        return self.dataset().to_table(columns=columns, filter=filter)

    def count_rows(self) -> int:
        self._require_open()
        return self.dataset().count_rows()

    # -- incremental passes ----------------------------------------------------------------------

    def reset(self) -> None:
        """Drops the table and everything staged for it; ``open`` then creates it afresh.

        Both folders are checked to lie inside the output before either is touched.
        """
        table_dir = join(self._root, f"{self.config.table}.lance")
        staging = self._staging_dir
        check_inside(self._root, [table_dir, staging], local=is_local(self._fs))
        db = connect_database(self.config.uri, self.config.storage_options)
        if table_exists(db, self.config.table):
            db.drop_table(self.config.table)
        if self._fs.exists(staging):
            self._fs.rm(staging, recursive=True)
        self._opened = False

    def delete_rows(self, by_shard: dict[str, list[str]]) -> int:
        """Deletes rows by id within the shard tag they carry (``shard_id = s AND id IN (...)``)."""
        self._require_open()
        deleted = 0
        dataset = self.fenced_dataset("deleting rows")
        for shard_id, ids in by_shard.items():
            for start in range(0, len(ids), DELETE_BATCH):
                part = ids[start : start + DELETE_BATCH]
                predicate = f"shard_id = {sql_string(shard_id)} AND id IN ({', '.join(sql_string(i) for i in part)})"
                count = dataset.count_rows(filter=predicate)
                if count:
                    try:
                        dataset.delete(predicate)
                    except OSError as err:
                        raise self._refused("deleting rows", err) from err
                    deleted += count
                    dataset = self.dataset()
        return deleted

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "table": self.config.table}

    # -- staging records -------------------------------------------------------------------------

    def _record_staged(self, shard_id: str, attempt: str, fragments: list[FragmentMetadata]) -> str:
        path = join(self._staging_dir, shard_key(shard_id), f"{attempt}.json")
        files = [data_file.path for fragment in fragments for data_file in fragment.files]
        write_bytes_atomic(self._fs, path, json.dumps({"shard_id": shard_id, "files": files}).encode())
        return path

    def _remove_staged(self, keys: set[str], referenced: set[str]) -> None:
        """Deletes staged data files of the given shard keys (never one a version refers to) and their records."""
        if not is_local(self._fs):
            self._fs.invalidate_cache(self._staging_dir)
        try:
            records = self._fs.find(self._staging_dir)
        except FileNotFoundError:
            return
        doomed: list[str] = []
        for record in records:
            if record.rstrip("/").split("/")[-2] not in keys:
                continue
            raw = read_bytes(self._fs, record)
            files = json.loads(raw)["files"] if raw else []
            doomed += [join(self._data_dir, name) for name in files if name not in referenced]
            doomed.append(record)
        _remove_quietly(self._fs, self._root, doomed)

    def _require_open(self) -> None:
        if not self._opened:
            raise SinkError("call sink.open() before writing, reading or aborting shards")


class LanceShardWriter(ShardWriter):
    """Stages a shard's rows as Lance fragments and appends them all in one commit."""

    def __init__(self, sink: LanceSink, shard_id: str) -> None:
        self._sink = sink
        self.shard_id = shard_id
        self._attempt = uuid.uuid4().hex
        self._buffer: list[pa.Table] = []
        self._buffered_bytes = 0
        self._fragments: list[FragmentMetadata] = []
        self._records: list[str] = []
        self._rows = 0
        self._done = False

    def write(self, table: pa.Table) -> None:
        """Buffers rows; stages them as a fragment (invisible to readers) once ``stage_bytes`` are buffered."""
        self._require_active()
        check_shard_rows(table, self._sink.schema, self.shard_id)
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered_bytes += table.nbytes
        self._rows += table.num_rows
        if self._buffered_bytes >= self._sink.stage_bytes:
            self._stage()

    def commit(self) -> int:
        """Appends every staged fragment in one table version; returns the shard's row count."""
        import lance

        self._require_active()
        self._stage()
        if self._fragments:
            sink = self._sink
            what = f"committing shard {self.shard_id!r}"
            try:
                read_version = sink.fenced_dataset(what).version
                failpoint("before_publish")
                lance.LanceDataset.commit(
                    sink.dataset_uri,
                    lance.LanceOperation.Append(self._fragments),
                    read_version=read_version,
                    storage_options=sink.storage_options,
                )
            except LeaseLost:
                self.discard()
                raise
            except OSError as err:  # CommitConflictError is one; so is a version cleaned away
                refused = sink._refused(what, err)
                if isinstance(refused, LeaseLost):
                    self.discard()
                    raise refused from None
                raise
            sink._committed()
        self._done = True
        _remove_quietly(self._sink._fs, self._sink._root, self._records)
        return self._rows

    def discard(self) -> None:
        """Deletes this attempt's staged files; the shard stays uncommitted."""
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        files = [join(self._sink._data_dir, f.path) for fragment in self._fragments for f in fragment.files]
        _remove_quietly(self._sink._fs, self._sink._root, files + self._records)

    def _stage(self) -> None:
        from lance.fragment import write_fragments

        if not self._buffer:
            return
        data = pa.concat_tables(self._buffer).replace_schema_metadata(self._sink.schema.metadata)
        self._buffer.clear()
        self._buffered_bytes = 0
        fragments = write_fragments(
            data, self._sink.dataset_uri, schema=self._sink.schema, storage_options=self._sink.storage_options
        )
        self._fragments += fragments
        attempt = f"{self._attempt}-{len(self._records):05d}"
        self._records.append(self._sink._record_staged(self.shard_id, attempt, fragments))

    def _require_active(self) -> None:
        if self._done:
            raise SinkError(f"shard {self.shard_id!r}: this writer already committed or discarded; call sink.begin() again")


def _data_files(dataset: lance.LanceDataset) -> set[str]:
    """Names of the data files the dataset's current version refers to."""
    return {f.path for fragment in dataset.get_fragments() for f in fragment.metadata.files}


def _remove_quietly(fs: Any, root: str, paths: list[str]) -> None:
    """Deletes files under the output ``root``, ignoring the ones already gone (a cleanup may run
    twice); refuses the lot if any lies outside ``root`` (``check_inside``)."""
    if not paths:
        return
    check_inside(root, paths, local=is_local(fs))
    try:
        fs.rm(paths)
    except FileNotFoundError:
        for path in paths:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass
