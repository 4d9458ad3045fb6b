"""What a run is about to execute: its pass, its shards, and everything the schedulers need to run
the stages over them (the encoder's facts, the sink, and for incremental passes what the output
holds). Built by the skeleton's planning phase; the schedulers only read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedder.execution.generation import Generation
from embedder.records import Shard

if TYPE_CHECKING:
    from embedder.checkpoint import Checkpoint
    from embedder.incremental import ChangeFilter, KnownVersions
    from indexes.base import Sink


@dataclass(slots=True)
class RunPlan:
    """One run's work.

    Attributes:
        generation: The pass the run works on.
        shards: Every shard of the source, as listed (incremental: ids suffixed with the pass).
        pending: Those not committed yet, in listing order: what the scheduler executes.
        encoder: An ``Encoder`` or the driver's ``EncoderFacts`` (tokenizer, limits, layout).
        sink: The opened sink (only the skeleton writes to it).
        checkpoint: The output's checkpoint (only the skeleton writes to it).
        change_filter: Incremental passes: drops unchanged chunks (``embedder.pipeline.change``).
        known_versions: Incremental passes: document versions the output holds, so connectors
            skip unchanged documents without parsing them.
    """

    generation: Generation
    shards: list[Shard]
    pending: list[Shard]
    encoder: Any
    sink: Sink
    checkpoint: Checkpoint
    change_filter: ChangeFilter | None = None
    known_versions: KnownVersions | None = None
