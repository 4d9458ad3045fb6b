"""Length bucketing and token-budget packing: chunks → ``PackedBatch``es with no padding.

Chunks arrive in document order with all lengths mixed. The packer keeps a window of them (a few
token budgets' worth), sorts the window by length and cuts it into batches of at most
``token_budget`` tokens. Sorting keeps sequences of a batch of similar length (cheaper attention,
better kernel shapes); the window bound keeps memory flat, and a chunk is held back for a later
batch at most ``MAX_HOLDS`` times, so every chunk leaves within a few windows and shards complete
(and their staged rows leave memory) in bounded time, however long the stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from embedder.records import Chunk, PackedBatch


@dataclass(slots=True, frozen=True)
class SequenceLayout:
    """How the encoder's model wants one sequence laid out around a chunk's own tokens.

    ``[prefix_ids] + [prompt_ids] + chunk.token_ids + [suffix_ids]``, positions counted from
    ``position_offset`` (0 for BERT, ``padding_idx + 1`` for XLM-RoBERTa).
    """

    prefix_ids: np.ndarray
    prompt_ids: np.ndarray
    suffix_ids: np.ndarray
    position_offset: int = 0

    @property
    def overhead(self) -> int:
        """Tokens each sequence carries besides the chunk's own."""
        return len(self.prefix_ids) + len(self.prompt_ids) + len(self.suffix_ids)


def build_batch(chunks: Sequence[Chunk], layout: SequenceLayout) -> PackedBatch:
    """Packs chunks end to end, in the given order, into one ``PackedBatch``."""
    head = np.concatenate([layout.prefix_ids, layout.prompt_ids]).astype(np.int64)
    tail = layout.suffix_ids.astype(np.int64)
    pieces: list[np.ndarray] = []
    for chunk in chunks:  # one step per chunk, never per token
        pieces.append(head)
        pieces.append(chunk.token_ids)
        pieces.append(tail)
    input_ids = np.concatenate(pieces).astype(np.int64, copy=False) if pieces else np.zeros(0, np.int64)
    lengths = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks)) + layout.overhead
    cu_seqlens = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    starts = np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
    position_ids = np.arange(len(input_ids), dtype=np.int64) - starts + layout.position_offset
    prompt_lengths = np.full(len(chunks), len(layout.prompt_ids), dtype=np.int32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()) if len(chunks) else 0,
        chunk_ids=[c.id for c in chunks],
        prompt_lengths=prompt_lengths,
        chunks=list(chunks),
    )


def plan_batches(lengths: np.ndarray, token_budget: int, max_sequences: int | None = None) -> list[np.ndarray]:
    """Splits sequence indices, longest first, into groups of at most ``token_budget`` tokens.

    A sequence longer than the budget gets a group of its own (the budget is always at least the
    model's max length in practice, so this only guards odd configs).
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    groups: list[np.ndarray] = []
    start = 0
    n = len(order)
    cum = np.concatenate([[0], np.cumsum(sorted_lengths)])
    while start < n:
        # largest end with cum[end] - cum[start] <= budget
        end = int(np.searchsorted(cum, cum[start] + token_budget, side="right")) - 1
        end = max(end, start + 1)
        if max_sequences:
            end = min(end, start + max_sequences)
        groups.append(order[start:end])
        start = end
    return groups


MAX_SEQUENCES = 65_535
"""Default cap on sequences per batch. FlashAttention-2's varlen kernel (behind
``torch.nn.attention.varlen.varlen_attn``) puts a batch's sequences on CUDA's second grid axis,
which holds at most 65,535 blocks: a bigger batch of short chunks (a token budget above ~200k with
3-token chunks) would fail to launch. The cap only binds on such batches; the padded fallback
gains a bound on its batch dimension too."""

MAX_HOLDS = 4
"""Windows a chunk may be held back for to fill a later batch: every chunk leaves within
``MAX_HOLDS + 1`` windows. Each forced release can emit one part-full batch; 4 keeps those rare."""


class TokenBudgetPacker:
    """Buffers chunks in a window, emits length-sorted batches of at most ``token_budget`` tokens.

    Args:
        layout: The encoder's sequence layout (adds specials and prompt to each chunk).
        token_budget: Max tokens per batch (specials and prompt included).
        window_batches: Window size in budgets: more sorts better, holds more chunks. The window
            ramps up to it: the first batch leaves once a quarter budget is buffered (the GPU starts
            as soon as a few documents are tokenized, not after a whole window), then the window
            is one budget and doubles with each emission — each fill overlaps the GPU's work on
            the batches before it.
        max_sequences: Cap on sequences per batch (``MAX_SEQUENCES`` by default; ``None`` for
            none, for forwards with no such limit).

    Example:
        >>> packer = TokenBudgetPacker(layout, token_budget=16384)
        >>> for batch in packer.add(chunks): ...
        >>> for batch in packer.flush(): ...
    """

    def __init__(
        self,
        layout: SequenceLayout,
        token_budget: int,
        window_batches: int = 8,
        max_sequences: int | None = MAX_SEQUENCES,
    ) -> None:
        if token_budget < 1:
            raise ValueError("token_budget must be positive")
        if max_sequences is not None and max_sequences < 1:
            raise ValueError("max_sequences must be positive (or None for no cap)")
        self.layout = layout
        self.token_budget = token_budget
        self.window_tokens = token_budget * window_batches
        self.max_sequences = max_sequences
        self._ramp_tokens = max(1, token_budget // 4)  # the window while it ramps up (see window_batches)
        self._buffer: list[Chunk] = []
        self._buffered_tokens = 0
        # How many windows each of the first ``len(_held_for)`` chunks of the buffer was held back for.
        self._held_for = np.zeros(0, dtype=np.int64)

    @property
    def buffered_chunks(self) -> int:
        return len(self._buffer)

    def add(self, chunks: Sequence[Chunk]) -> Iterator[PackedBatch]:
        """Adds chunks; yields batches whenever a full window is buffered."""
        overhead = self.layout.overhead
        for chunk in chunks:
            self._buffer.append(chunk)
            self._buffered_tokens += len(chunk.token_ids) + overhead
        if self._buffered_tokens >= min(self.window_tokens, self._ramp_tokens):
            self._ramp_tokens = max(2 * self._ramp_tokens, self.token_budget)
            yield from self._emit(final=False)

    def flush(self) -> Iterator[PackedBatch]:
        """Yields every buffered chunk."""
        yield from self._emit(final=True)

    def _emit(self, final: bool) -> Iterator[PackedBatch]:
        if not self._buffer:
            return
        buffer = self._buffer
        lengths = np.fromiter((len(c.token_ids) for c in buffer), dtype=np.int64, count=len(buffer)) + self.layout.overhead
        groups = plan_batches(lengths, self.token_budget, self.max_sequences)
        held_for = np.zeros(len(buffer), dtype=np.int64)
        held_for[: len(self._held_for)] = self._held_for
        keep: list[Chunk] = []
        keep_tokens = 0
        self._held_for = held_for[:0]
        if not final and len(groups) > 1 and int(held_for[groups[-1]].max()) < MAX_HOLDS:
            # The last (shortest) group is usually not full: keep it to fill with later chunks, but
            # only MAX_HOLDS times: the shortest chunks sort last in every window, and held back
            # each time they would stay until the end of the stream and keep their shards (and
            # every row staged for them) from committing.
            last = groups.pop()
            keep = [buffer[i] for i in last]
            keep_tokens = int(lengths[last].sum())  # overhead included, as in _buffered_tokens
            self._held_for = held_for[last] + 1
        self._buffer = keep
        self._buffered_tokens = keep_tokens
        for group in groups:
            yield build_batch([buffer[i] for i in group], self.layout)
