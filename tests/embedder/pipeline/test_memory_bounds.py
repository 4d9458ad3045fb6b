"""Bounded memory over a long stream: what the runner holds must not grow with the corpus.

The property users see: a shard commits (and its staged rows leave memory) soon after its last
chunk is read, however long the run — not at the end of the stream.
"""

from __future__ import annotations

import numpy as np

from embedder.packing import MAX_HOLDS, SequenceLayout, TokenBudgetPacker
from embedder.records import Chunk

LAYOUT = SequenceLayout(np.array([101]), np.zeros(0, np.int64), np.array([102]))


def _stream(n: int, seed: int) -> list[Chunk]:
    """Chunks with Wikipedia-like lengths: most full windows, a long tail of short ones."""
    rng = np.random.default_rng(seed)
    full = rng.random(n) < 0.5
    lengths = np.where(full, 254, rng.integers(1, 254, size=n))
    return [Chunk(f"d{i}", 0, "t", np.zeros(int(k), np.int32), "h") for i, k in enumerate(lengths)]


def test_packer_releases_every_chunk_within_a_bounded_number_of_windows() -> None:
    """The shortest chunks sort last in every window; the packer used to hold them back each time,
    so a 5-token chunk read first stayed until the end of the stream and kept its shard uncommitted
    (every row staged for that shard stayed in memory: O(corpus))."""
    budget, window_batches = 4096, 4
    packer = TokenBudgetPacker(LAYOUT, token_budget=budget, window_batches=window_batches)
    chunks = _stream(60_000, seed=1)
    arrived_at: dict[str, int] = {}  # chunk id -> tokens added before it
    tokens_in = 0
    worst_delay = 0
    most_buffered = 0
    emitted = 0
    largest_block = 0
    for start in range(0, len(chunks), 64):
        block = chunks[start : start + 64]
        largest_block = max(largest_block, sum(len(c.token_ids) + LAYOUT.overhead for c in block))
        for c in block:
            arrived_at[c.id] = tokens_in
            tokens_in += len(c.token_ids) + LAYOUT.overhead
        for batch in packer.add(block):
            emitted += batch.num_sequences
            for cid in batch.chunk_ids:
                worst_delay = max(worst_delay, tokens_in - arrived_at.pop(cid))
        most_buffered = max(most_buffered, packer.buffered_chunks)
    emitted += sum(b.num_sequences for b in packer.flush())

    window_tokens = budget * window_batches
    assert emitted == len(chunks)
    # Every chunk leaves within MAX_HOLDS + 1 windows (each at most a window plus the block that
    # filled it) of tokens read after it, however long the stream: 60,000 chunks are ~700 windows.
    assert worst_delay <= (MAX_HOLDS + 1) * (window_tokens + largest_block)
    # What the packer holds is a window's worth, not a growing backlog.
    assert most_buffered <= 2 * window_tokens // (1 + LAYOUT.overhead)


def test_packer_still_fills_batches() -> None:
    """Holding back at most MAX_HOLDS times costs at most a few part-full batches."""
    budget = 4096
    packer = TokenBudgetPacker(LAYOUT, token_budget=budget, window_batches=8)
    chunks = _stream(20_000, seed=2)
    batches = []
    for start in range(0, len(chunks), 256):
        batches.extend(packer.add(chunks[start : start + 256]))
    batches.extend(packer.flush())
    total = sum(len(c.token_ids) + LAYOUT.overhead for c in chunks)
    assert sum(b.num_sequences for b in batches) == len(chunks)
    assert all(b.num_tokens <= budget for b in batches)
    assert len(batches) <= total / budget * 1.03 + 2


def test_heap_trimmer_trims_at_most_once_per_interval() -> None:
    """Shards that commit many times a second must not each pay a whole-heap trim (10-20 ms)."""
    import platform
    import sys

    from embedder.memory import HeapTrimmer, trim_heap

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert trim_heap() is glibc  # a no-op (False) on macOS, Windows, musl
    trimmer = HeapTrimmer(min_interval_s=3600.0)
    for _ in range(100):
        trimmer.maybe_trim()
    assert trimmer.calls == (1 if trimmer.available else 0)
