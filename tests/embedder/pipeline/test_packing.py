"""Packing: token budget respected, no padding, positions restart, every chunk exactly once."""

from __future__ import annotations

import numpy as np

from embedder.packing import MAX_SEQUENCES, SequenceLayout, TokenBudgetPacker, build_batch
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


def test_window_ramps_up_so_the_first_batch_leaves_early() -> None:
    """The GPU gets a first batch once a quarter budget is buffered; then the window is one budget
    and doubles with each emission up to the configured window (which sorts lengths best)."""
    layout = SequenceLayout(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    packer = TokenBudgetPacker(layout, token_budget=1000, window_batches=4)
    assert list(packer.add(_chunks([100] * 2))) == []  # 200 < 250
    assert [b.num_tokens for b in packer.add(_chunks([100]))] == [300]  # a quarter budget: out at once
    assert list(packer.add(_chunks([100] * 9))) == []  # 900 < 1,000
    assert [b.num_tokens for b in packer.add(_chunks([100] * 2))] == [1000]  # one budget; 100 kept
    assert list(packer.add(_chunks([100] * 18))) == []  # 1,900 < 2,000
    assert [b.num_tokens for b in packer.add(_chunks([100] * 2))] == [1000, 1000]  # two budgets
    assert list(packer.add(_chunks([100] * 38))) == []  # 3,900 < 4,000: the full window from now on
    assert [b.num_tokens for b in packer.add(_chunks([100] * 2))] == [1000] * 4
    assert list(packer.add(_chunks([100] * 38))) == []  # stays at the window (4,000)


def test_batches_hold_at_most_max_sequences_by_default() -> None:
    """FlashAttention-2's varlen kernel launches one grid row per sequence, at most 65,535: a big
    budget of very short chunks is cut by sequence count as well as by tokens, every chunk once."""
    layout = SequenceLayout(np.array([101]), np.zeros(0, np.int64), np.array([102]))
    chunks = _chunks([1] * 70_000)  # 3 tokens a sequence: 210,000 tokens fit one 262,144 budget
    packer = TokenBudgetPacker(layout, token_budget=262_144)
    batches = [*packer.add(chunks), *packer.flush()]
    assert packer.max_sequences == MAX_SEQUENCES == 65_535
    assert max(b.num_sequences for b in batches) == MAX_SEQUENCES
    assert sorted(cid for b in batches for cid in b.chunk_ids) == sorted(c.id for c in chunks)
    uncapped = TokenBudgetPacker(layout, token_budget=262_144, max_sequences=None)
    assert [b.num_sequences for b in [*uncapped.add(chunks), *uncapped.flush()]] == [70_000]
