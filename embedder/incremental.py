"""Incremental passes: embed only what changed since the output was last written.

A chunk is identified by ``doc_id#chunk_index`` and its content by ``content_hash``. Against the
rows already in the output (written by the same model fingerprint — sinks refuse another):

* a chunk whose id holds the same hash is **unchanged**: not embedded, its row stays;
* a chunk whose id is new is **added**; one whose hash differs is **updated** (re-embedded; the old
  row is removed by the final prune);
* ids of a document beyond its new chunk count (the document shrank) are **deleted**;
* with ``deletes: true`` (the default), documents that no longer appear in the source are deleted.

The filter runs where chunks are made, before packing (the local runner's feeder thread, the Ray
runner's read tasks), so unchanged chunks never reach the GPU. What each shard saw and replaced is
stored with the shard's commit (``Checkpoint.write_changes``), so a resumed pass prunes exactly what
an uninterrupted one would. Rows written by a pass carry the shard id tagged with the pass
(``<shard>@<generation>``): aborting a shard of this pass never touches rows an earlier pass wrote.

What the output holds (``ExistingChunks``) is kept as sorted numpy arrays of hashes, not as dicts of
strings: 16 bytes per chunk and 28 per document instead of ~250 bytes of Python objects per chunk,
so the ~40M chunk ids of English Wikipedia fit in well under 1 GB, pickle as a few flat buffers, and
are shared zero-copy by every Ray worker of a node through the object store.

Hash collisions err on the side of re-embedding. A chunk id hashes (blake2b-128 of its utf-8 bytes;
stable across processes and machines, unlike ``hash()``) to a 64-bit *key*, the sorted search key,
and a 64-bit *check*; a row stores its key and ``check XOR content key`` (the content key is the
first 64 bits of the content hash). A chunk counts as unchanged only when a row has its key **and**
that row's stored value equals its own check XOR content key. Two different ids whose keys collide
still differ in their checks (independent bits of the digest), so the stored value matches with
probability 2^-64 only: the chunk is taken as changed and re-embedded (counted as updated, never
skipped). A changed chunk with the same id passes as unchanged only if its 128-bit content hash
agrees with the old one in its first 64 bits. Document ids use the same key + check pair (their
chunk counts and versions are looked up only on a match of both halves), so a collision of
document keys is told apart too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.records import Chunk

log = logging.getLogger("embedder")

ABSENT, SAME, CHANGED = 0, 1, 2
"""What ``ExistingChunks.match`` says of a chunk: id not in the output, same content, other content."""
NO_VERSION = np.iinfo(np.int64).min
"""``doc_versions`` entry of a document without a known integer version."""
BUILD_ROWS = 1 << 18
"""Rows hashed per step while building (bounds the Python strings alive at once)."""


def id_digests(strings: Iterable[str]) -> np.ndarray:
    """``(n, 2)`` uint64: the key and check halves of each string's blake2b-128 (utf-8 bytes).

    The same on every process and machine (``hash()`` is salted per process), so arrays built on
    the driver answer lookups made in workers.
    """
    raw = b"".join([blake2b(s.encode("utf-8"), digest_size=16).digest() for s in strings])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(-1, 2)


def content_keys(content_hashes: Iterable[str]) -> np.ndarray:
    """uint64 per content hash: its first 16 hex digits (our content hashes are blake2b hex), or a
    blake2b-64 of the string when it is not hex."""
    parts = []
    for text in content_hashes:
        text = text or ""
        try:
            raw = bytes.fromhex(text[:16])
        except ValueError:
            raw = b""
        parts.append(raw if len(raw) == 8 else blake2b(text.encode("utf-8"), digest_size=8).digest())
    return np.frombuffer(b"".join(parts), dtype=">u8").astype(np.uint64)


def _empty(dtype: Any) -> np.ndarray:
    return np.zeros(0, dtype)


def _lookup(
    keys: np.ndarray, values: np.ndarray, query_keys: np.ndarray, query_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of sorted ``keys`` matching each query on both key and value.

    Returns:
        The index of the matching row (-1: none), and whether any row has the query's key.
    """
    found = np.full(len(query_keys), -1, np.int64)
    if not len(keys) or not len(query_keys):
        return found, np.zeros(len(query_keys), bool)
    left = np.searchsorted(keys, query_keys, "left")
    right = np.searchsorted(keys, query_keys, "right")
    present = right > left
    first = np.minimum(left, len(keys) - 1)
    hit = present & (values[first] == query_values)
    found[hit] = first[hit]
    for i in np.flatnonzero(present & ~hit & (right - left > 1)):  # a key several rows share: rare
        rows = np.arange(left[i] + 1, right[i])
        matches = rows[values[rows] == query_values[i]]
        if len(matches):
            found[i] = matches[0]
    return found, present


@dataclass(slots=True)
class KnownVersions:
    """Document id → version already embedded, for a connector's ``known_versions``
    (``Connector.is_unchanged`` calls ``get``). Integer versions live in the shared arrays; any
    other version (rare: Wikipedia's are revision ids) in ``odd``.
    """

    doc_keys: np.ndarray
    doc_checks: np.ndarray
    versions: np.ndarray
    odd: dict[str, str]
    size: int

    def get(self, doc_id: str, default: str | None = None) -> str | None:
        if doc_id in self.odd:
            return self.odd[doc_id]
        digest = id_digests([doc_id])
        found, _ = _lookup(self.doc_keys, self.doc_checks, digest[:, 0], digest[:, 1])
        if found[0] < 0 or self.versions[found[0]] == NO_VERSION:
            return default
        return str(int(self.versions[found[0]]))

    def __getitem__(self, doc_id: str) -> str:
        version = self.get(doc_id)
        if version is None:
            raise KeyError(doc_id)
        return version

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self.get(doc_id) is not None

    def __len__(self) -> int:
        return self.size


@dataclass(slots=True)
class ExistingChunks:
    """What the output holds, as sorted hash arrays (see the module docstring for the layout and why
    collisions re-embed).

    Attributes:
        chunk_keys: Sorted key half of each chunk id's digest.
        chunk_values: Per row, the check half XOR the content key.
        doc_keys: Sorted key half of each document id's digest.
        doc_checks: Per document, the check half.
        doc_chunks: Per document, its chunk count (highest ``chunk_index`` + 1).
        doc_versions: Per document, its integer version or ``NO_VERSION`` (empty: no version column).
        odd_versions: Versions that are not canonical integers, by document id.
    """

    chunk_keys: np.ndarray = field(default_factory=lambda: _empty(np.uint64))
    chunk_values: np.ndarray = field(default_factory=lambda: _empty(np.uint64))
    doc_keys: np.ndarray = field(default_factory=lambda: _empty(np.uint64))
    doc_checks: np.ndarray = field(default_factory=lambda: _empty(np.uint64))
    doc_chunks: np.ndarray = field(default_factory=lambda: _empty(np.uint32))
    doc_versions: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    odd_versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pa.Table, version_field: str | None = None) -> ExistingChunks:
        """Builds the arrays from the output's ``id``, ``doc_id``, ``chunk_index``,
        ``content_hash`` (and ``version_field``) columns.

        A document's version is the one its rows carry. Rows of one document can carry different
        versions (an incremental pass re-embeds only the chunks that changed; the others keep the
        version they were written with): integer versions (Wikipedia revision ids, which only grow)
        take the newest; other versions are then unknown, so the document is read again.
        """
        keys, values = [], []
        for batch in table.select(["id", "content_hash"]).to_batches(max_chunksize=BUILD_ROWS):
            digests = id_digests(batch.column(0).to_pylist())
            keys.append(digests[:, 0])
            values.append(digests[:, 1] ^ content_keys(batch.column(1).to_pylist()))
        chunk_keys = np.concatenate(keys) if keys else _empty(np.uint64)
        chunk_values = np.concatenate(values) if values else _empty(np.uint64)
        order = np.argsort(chunk_keys, kind="stable")
        existing = cls(chunk_keys=chunk_keys[order], chunk_values=chunk_values[order])

        has_version = bool(version_field) and version_field in table.column_names
        aggregates: list[tuple[str, str]] = [("chunk_index", "max")]
        if has_version:
            aggregates += [(version_field, "min"), (version_field, "max")]
        columns = ["doc_id", "chunk_index", *([version_field] if has_version else [])]
        docs = table.select(columns).group_by("doc_id").aggregate(aggregates)
        doc_digests = np.concatenate(
            [id_digests(b.column("doc_id").to_pylist()) for b in docs.to_batches(max_chunksize=BUILD_ROWS)]
            or [_empty(np.uint64).reshape(0, 2)]
        )
        counts = docs.column("chunk_index_max").to_numpy(zero_copy_only=False).astype(np.int64) + 1
        order = np.argsort(doc_digests[:, 0], kind="stable")
        existing.doc_keys = doc_digests[order, 0].copy()
        existing.doc_checks = doc_digests[order, 1].copy()
        existing.doc_chunks = counts[order].astype(np.uint32)
        if has_version:
            versions, existing.odd_versions = _doc_versions(docs, version_field)
            existing.doc_versions = versions[order]
        return existing

    def __len__(self) -> int:
        return len(self.chunk_keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (``odd_versions`` aside)."""
        arrays = (self.chunk_keys, self.chunk_values, self.doc_keys, self.doc_checks, self.doc_chunks, self.doc_versions)
        return sum(a.nbytes for a in arrays)

    def match(self, ids: Sequence[str], content_hashes: Sequence[str]) -> np.ndarray:
        """``ABSENT``, ``SAME`` or ``CHANGED`` (int8) per chunk id and its content hash."""
        digests = id_digests(ids)
        values = digests[:, 1] ^ content_keys(content_hashes)
        found, present = _lookup(self.chunk_keys, self.chunk_values, digests[:, 0], values)
        status = np.where(present, CHANGED, ABSENT).astype(np.int8)
        status[found >= 0] = SAME
        return status

    def chunk_counts(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Chunks the output holds per document (0: unknown document)."""
        digests = id_digests(doc_ids)
        found, _ = _lookup(self.doc_keys, self.doc_checks, digests[:, 0], digests[:, 1])
        counts = np.zeros(len(found), np.int64)
        counts[found >= 0] = self.doc_chunks[found[found >= 0]]
        return counts

    def known_versions(self) -> KnownVersions | None:
        """The documents' versions for the connector (None: the output stores none)."""
        size = int(np.count_nonzero(self.doc_versions != NO_VERSION)) + len(self.odd_versions)
        if not size:
            return None
        versions = self.doc_versions if len(self.doc_versions) else np.full(len(self.doc_keys), NO_VERSION)
        return KnownVersions(self.doc_keys, self.doc_checks, versions, self.odd_versions, size)


def _doc_versions(docs: pa.Table, version_field: str) -> tuple[np.ndarray, dict[str, str]]:
    """Per grouped document: its integer version (``NO_VERSION`` when none), and the others."""
    low, high = docs.column(f"{version_field}_min"), docs.column(f"{version_field}_max")
    if pa.types.is_integer(high.type):
        try:
            return high.cast(pa.int64()).fill_null(NO_VERSION).to_numpy(), {}
        except pa.ArrowInvalid:  # uint64 beyond int64: treated as strings below
            pass
    versions = np.full(docs.num_rows, NO_VERSION, np.int64)
    odd: dict[str, str] = {}
    for i, (doc_id, lo, hi) in enumerate(zip(docs.column("doc_id").to_pylist(), low.to_pylist(), high.to_pylist())):
        if hi is None or lo != hi:
            continue  # none, or rows of several versions: unknown, the document is read again
        text = str(hi)
        try:
            number: int | None = int(text)
        except ValueError:
            number = None
        if number is not None and str(number) == text and NO_VERSION < number <= np.iinfo(np.int64).max:
            versions[i] = number
        else:
            odd[doc_id] = text
    return versions, odd


@dataclass(slots=True)
class _ShardChanges:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped_chunks: int = 0
    docs: set[str] = field(default_factory=set)
    replaced: list[str] = field(default_factory=list)  # ids re-embedded: their old rows go
    removed: list[str] = field(default_factory=list)  # ids of shrunk documents


class ChangeFilter:
    """Drops unchanged chunks before packing and keeps each shard's change counts.

    Args:
        existing: The output's current chunks.
    """

    def __init__(self, existing: ExistingChunks) -> None:
        self.existing = existing
        self._shards: dict[str, _ShardChanges] = {}

    def filter(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        """The chunks that need embedding (new or changed); counts the rest as unchanged."""
        if not chunks:
            return []
        status = self.existing.match([c.id for c in chunks], [c.content_hash for c in chunks])
        keep: list[Chunk] = []
        new_counts: dict[tuple[str, str], int] = {}
        for chunk, found in zip(chunks, status.tolist()):
            state = self._shards.get(chunk.shard_id)
            if state is None:
                state = self._shards[chunk.shard_id] = _ShardChanges()
            state.docs.add(chunk.doc_id)
            key = (chunk.shard_id, chunk.doc_id)
            new_counts[key] = max(new_counts.get(key, 0), chunk.chunk_index + 1)
            if found == SAME:
                state.unchanged += 1
                state.skipped_chunks += 1
                continue
            if found == ABSENT:
                state.added += 1
            else:
                state.updated += 1
                state.replaced.append(chunk.id)
            keep.append(chunk)
        # Documents arrive whole in a block (chunking works per document), so shrinkage is known here.
        old_counts = self.existing.chunk_counts([doc_id for _, doc_id in new_counts]).tolist()
        for ((shard_id, doc_id), count), old_count in zip(new_counts.items(), old_counts):
            if old_count > count:
                self._shards[shard_id].removed.extend(f"{doc_id}#{i}" for i in range(count, old_count))
        return keep

    def finish_shard(self, shard_id: str, chunks_read: int, unchanged_doc_ids: Iterable[str]) -> tuple[int, dict[str, Any]]:
        """Returns (chunks to expect from the encoder, the shard's changes record)."""
        state = self._shards.pop(shard_id, None) or _ShardChanges()
        unchanged_doc_ids = list(unchanged_doc_ids)
        state.docs.update(unchanged_doc_ids)
        unchanged_docs_chunks = int(self.existing.chunk_counts(unchanged_doc_ids).sum())
        record = {
            "added": state.added,
            "updated": state.updated,
            "unchanged": state.unchanged + unchanged_docs_chunks,
            "removed": state.removed,
            "replaced": state.replaced,
            "docs": sorted(state.docs),
        }
        return chunks_read - state.skipped_chunks, record


def plan_prune(
    table: pa.Table, changes: Iterable[dict[str, Any]], current_shards: set[str], deletes: bool
) -> tuple[dict[str, list[str]], int]:
    """Which rows the end of a pass removes, grouped by the shard id they carry.

    Old rows of re-embedded chunks (same id, a shard id not of this pass), rows of shrunk documents
    and, with ``deletes``, rows of documents the source no longer has.

    Returns:
        ``{row shard_id: [ids]}`` to delete, and how many of them count as deleted chunks (replaced
        rows are updates, not deletions).
    """
    replaced: set[str] = set()
    removed: set[str] = set()
    seen_docs: set[str] = set()
    for change in changes:
        replaced.update(change["replaced"])
        removed.update(change["removed"])
        seen_docs.update(change["docs"])
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    shard_ids = np.asarray(table.column("shard_id").to_pylist(), dtype=object)
    doc_ids = table.column("doc_id").to_pylist()
    old = np.fromiter((s not in current_shards for s in shard_ids), bool, len(shard_ids))
    is_replaced = np.fromiter((i in replaced for i in ids), bool, len(ids)) & old
    is_removed = np.fromiter((i in removed for i in ids), bool, len(ids))
    is_gone = np.fromiter((d not in seen_docs for d in doc_ids), bool, len(doc_ids)) if deletes else np.zeros(len(ids), bool)
    dead = is_replaced | is_removed | is_gone
    plan: dict[str, list[str]] = {}
    for i in np.flatnonzero(dead):
        plan.setdefault(shard_ids[i], []).append(ids[i])
    return plan, int((dead & ~is_replaced).sum())
