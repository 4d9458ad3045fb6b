"""Packing: token budget respected, no padding, positions restart, every chunk exactly once."""

from __future__ import annotations

import numpy as np

from embedder.packing import SequenceLayout, TokenBudgetPacker, build_batch
from embedder.records import Chunk


def _chunks(lengths: list[int]) -> list[Chunk]:
    return [Chunk(f"d{i}", 0, "t", np.arange(n, dtype=np.int32) + 1000, "h") for i, n in enumerate(lengths)]


def test_build_batch_layout_xlmr_positions() -> None:
    layout = SequenceLayout(np.array([0]), np.array([5, 6]), np.array([2]), position_offset=2)
    batch = build_batch(_chunks([3, 1]), layout)
    assert batch.cu_seqlens.tolist() == [0, 7, 12]
    assert batch.input_ids.tolist() == [0, 5, 6, 1000, 1001, 1002, 2, 0, 5, 6, 1000, 2]
    assert batch.position_ids.tolist() == [2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6]
    assert batch.max_seqlen == 7 and batch.cu_seqlens.dtype == np.int32
    assert batch.chunk_ids == ["d0#0", "d1#0"]


def test_packer_budget_and_exactly_once() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 254, size=2000).tolist()
    layout = SequenceLayout(np.array([101]), np.zeros(0, np.int64), np.array([102]))
    packer = TokenBudgetPacker(layout, token_budget=2048, window_batches=4)
    batches = []
    chunks = _chunks(lengths)
    for i in range(0, len(chunks), 37):
        batches.extend(packer.add(chunks[i : i + 37]))
    batches.extend(packer.flush())
    ids = [cid for b in batches for cid in b.chunk_ids]
    assert sorted(ids) == sorted(c.id for c in chunks)  # every chunk once
    assert all(b.num_tokens <= 2048 for b in batches)
    assert all(len(b.input_ids) == b.num_tokens for b in batches)  # no padding
    # Length bucketing: batches are nearly full, so few batches beyond the minimum.
    total = sum(lengths) + 2 * len(lengths)
    assert len(batches) <= total / 2048 * 1.15 + 2


def test_first_batch_leaves_after_one_budget_then_the_window_sorts() -> None:
    """The GPU gets its first batch once one budget of chunks is buffered (not a whole window);
    after that batches wait for the full window, which sorts lengths better."""
    layout = SequenceLayout(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    packer = TokenBudgetPacker(layout, token_budget=1000, window_batches=4)
    first = list(packer.add(_chunks([100] * 9)))  # 900 tokens: under one budget
    assert first == []
    first = list(packer.add(_chunks([100] * 2)))  # 1,100 tokens: one full batch can leave
    assert [b.num_tokens for b in first] == [1000]
    later = list(packer.add(_chunks([100] * 20)))  # 2,100 buffered: under the 4,000-token window
    assert later == []
    later = list(packer.add(_chunks([100] * 20)))  # 4,100: the window is full
    assert [b.num_tokens for b in later] == [1000] * 4
