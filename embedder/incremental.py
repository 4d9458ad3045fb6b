"""Incremental passes: embed only what changed since the output was last written.

A chunk is identified by ``doc_id#chunk_index`` and its content by ``content_hash``. Against the
rows already in the output (written by the same model fingerprint — sinks refuse another):

* a chunk whose id holds the same hash is **unchanged**: not embedded, its row stays;
* a chunk whose id is new is **added**; one whose hash differs is **updated** (re-embedded; the old
  row is removed by the final prune);
* ids of a document beyond its new chunk count (the document shrank) are **deleted**;
* with ``deletes: true`` (the default), documents that no longer appear in the source are deleted.

The filter runs on the driver between chunking and packing, so unchanged chunks never reach the
GPU. What each shard saw and replaced is stored with the shard's commit
(``Checkpoint.write_changes``), so a resumed pass prunes exactly what an uninterrupted one would.
Rows written by a pass carry the shard id tagged with the pass (``<shard>@<generation>``): aborting a
shard of this pass never touches rows an earlier pass wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedder.records import Chunk

log = logging.getLogger("embedder")


@dataclass(slots=True)
class ExistingChunks:
    """What the output holds: content hash per chunk id, chunk count per document."""

    hashes: dict[str, str] = field(default_factory=dict)
    doc_chunks: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pa.Table, version_field: str | None = None) -> ExistingChunks:
        ids = table.column("id").to_pylist()
        existing = cls(hashes=dict(zip(ids, table.column("content_hash").to_pylist())))
        doc_ids = table.column("doc_id").to_pylist()
        for doc_id, index in zip(doc_ids, table.column("chunk_index").to_pylist()):
            if index + 1 > existing.doc_chunks.get(doc_id, 0):
                existing.doc_chunks[doc_id] = index + 1
        if version_field and version_field in table.column_names:
            for doc_id, version in zip(doc_ids, table.column(version_field).to_pylist()):
                if version is not None:
                    existing.versions[doc_id] = str(version)
        return existing


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
        keep: list[Chunk] = []
        hashes = self.existing.hashes
        new_counts: dict[tuple[str, str], int] = {}
        for chunk in chunks:
            state = self._shards.get(chunk.shard_id)
            if state is None:
                state = self._shards[chunk.shard_id] = _ShardChanges()
            state.docs.add(chunk.doc_id)
            key = (chunk.shard_id, chunk.doc_id)
            new_counts[key] = max(new_counts.get(key, 0), chunk.chunk_index + 1)
            old = hashes.get(chunk.id)
            if old == chunk.content_hash:
                state.unchanged += 1
                state.skipped_chunks += 1
                continue
            if old is None:
                state.added += 1
            else:
                state.updated += 1
                state.replaced.append(chunk.id)
            keep.append(chunk)
        # Documents arrive whole in a block (chunking works per document), so shrinkage is known here.
        for (shard_id, doc_id), count in new_counts.items():
            old_count = self.existing.doc_chunks.get(doc_id, 0)
            if old_count > count:
                self._shards[shard_id].removed.extend(f"{doc_id}#{i}" for i in range(count, old_count))
        return keep

    def finish_shard(self, shard_id: str, chunks_read: int, unchanged_doc_ids: Iterable[str]) -> tuple[int, dict[str, Any]]:
        """Returns (chunks to expect from the encoder, the shard's changes record)."""
        state = self._shards.pop(shard_id, None) or _ShardChanges()
        state.docs.update(unchanged_doc_ids)
        unchanged_docs_chunks = sum(self.existing.doc_chunks.get(d, 0) for d in unchanged_doc_ids)
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
