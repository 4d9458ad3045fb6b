"""The typed events a scheduler streams to the run skeleton.

A scheduler (``embedder.runners``) reads, chunks and encodes wherever it runs those stages; all the
skeleton sees of it is this one stream, in any interleaving across shards:

* ``ShardStarted`` — a reader began a shard (its duration starts; the drain waits for it);
* ``EncodedBlock`` — chunks and their vectors, ``vectors[i]`` for ``chunks[i]``;
* ``ShardFinished`` — a shard read to its end: its ``ShardEnd`` (counts, bad records, changes),
  possibly before its last vectors;
* ``Idle`` — nothing happened for a poll interval (the skeleton checks drain and abort on it).

A chunk may come twice (Ray retries are at-least-once): the skeleton's assembler takes it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedder.records import Chunk, ShardEnd


@dataclass(slots=True, frozen=True)
class ShardStarted:
    shard_id: str
    at: float  # time.time() when the reader started it


@dataclass(slots=True)
class EncodedBlock:
    chunks: list[Chunk]
    vectors: np.ndarray  # [len(chunks), dim] float32


@dataclass(slots=True, frozen=True)
class ShardFinished:
    end: ShardEnd


@dataclass(slots=True, frozen=True)
class Idle:
    pass


IDLE = Idle()

Event = ShardStarted | EncodedBlock | ShardFinished | Idle


@dataclass(slots=True)
class EncoderStats:
    """What a scheduler's encoders did, reported once its stream has ended.

    Attributes:
        encoders: Encoders that ran (local: one per device; Ray: actors).
        tokens_per_second: Each encoder's real tokens over the stream's wall time (local).
        encode_seconds: Time the encoders spent launching batches and waiting on their devices.
    """

    encoders: int = 1
    tokens_per_second: list[float] | None = None
    encode_seconds: float = 0.0
