"""The change-filter stage of incremental passes: between chunking and packing, chunks the output
already holds with the same content are dropped, and each shard's ``ShardEnd`` gets its final chunk
count and change record (what the pass saw, added and replaced; see ``embedder.incremental``).

It runs where the chunks are: the local scheduler's packer thread, a Ray read task (each with the
``ExistingChunks`` of the output). A full pass has no filter and the stream passes unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from embedder.records import Chunk, ShardEnd

if TYPE_CHECKING:
    from embedder.incremental import ChangeFilter


def filter_changes(
    items: Iterable[list[Chunk] | ShardEnd], change_filter: ChangeFilter | None
) -> Iterator[list[Chunk] | ShardEnd]:
    """``read_and_chunk``'s stream with unchanged chunks dropped (empty blocks are skipped) and each
    ``ShardEnd`` completed with the shard's change record. Streams of several shards may interleave;
    each shard's chunks must all come before its end, as ``read_and_chunk`` yields them."""
    if change_filter is None:
        yield from items
        return
    for item in items:
        if isinstance(item, ShardEnd):
            item.chunks, item.changes = change_filter.finish_shard(item.shard_id, item.chunks, item.unchanged_doc_ids)
            yield item
            continue
        kept = change_filter.filter(item)
        if kept:
            yield kept
