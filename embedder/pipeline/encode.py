"""The encode stage: the one loop that keeps batches in flight on the device.

``Encoder.encode_async`` returns as soon as a batch is launched; its vectors are read back only when
``IN_FLIGHT_BATCHES`` later batches have been submitted, so the host packs and copies the next
batch while the device computes. Every caller that encodes a stream of packed batches — the local
scheduler's encoder threads, the Ray encoder actors, ``Encoder.encode_texts``, the estimate — runs
this loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder.records import PackedBatch

IN_FLIGHT_BATCHES = 2


@dataclass(slots=True)
class EncodeMeter:
    """What one encoder did: real tokens encoded (specials and prompts left out) and the seconds its
    caller spent launching batches and waiting for their vectors."""

    tokens: int = 0
    seconds: float = 0.0


def encode_stream(
    encoder: Any,
    batches: Iterable[PackedBatch | None],
    meter: EncodeMeter | None = None,
    depth: int = IN_FLIGHT_BATCHES,
) -> Iterator[tuple[PackedBatch, np.ndarray]]:
    """Encodes ``batches`` with up to ``depth`` + 1 in flight, yielding ``(batch, vectors)`` in order.

    A ``None`` in ``batches`` says the input is idle (a slow reader): every batch in flight is
    finished and handed over first, so vectors never wait for input that is not coming yet.

    Args:
        encoder: An ``Encoder`` (``encode_async``, ``layout``).
        batches: Packed batches, with optional ``None`` idle marks.
        meter: Adds the tokens and the seconds spent in the encoder's calls.
        depth: Batches submitted ahead of the one read back.
    """
    in_flight: collections.deque = collections.deque()
    overhead = encoder.layout.overhead

    def finish_one() -> tuple[PackedBatch, np.ndarray]:
        batch, handle = in_flight.popleft()
        started = time.perf_counter()
        vectors = handle.result()
        if meter is not None:
            meter.seconds += time.perf_counter() - started
            meter.tokens += batch.num_tokens - batch.num_sequences * overhead
        return batch, vectors

    for batch in batches:
        if batch is None:
            while in_flight:
                yield finish_one()
            continue
        started = time.perf_counter()
        in_flight.append((batch, encoder.encode_async(batch)))
        if meter is not None:
            meter.seconds += time.perf_counter() - started
        if len(in_flight) > depth:
            yield finish_one()
    while in_flight:
        yield finish_one()
