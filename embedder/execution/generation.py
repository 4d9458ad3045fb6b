"""The generation record: which pass over the source an output is in (``_embedder/generation.json``).

A pass is ``full`` (embed what is not embedded yet), ``incremental`` (re-embed what changed) or
``reembed`` (replace every row). A run resumes the unfinished pass whatever mode it asks for (a
reembed request replaces an unfinished pass of another mode), extends a finished full pass with new
shards, or starts a new pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("embedder")

ShardBytes = int | None | Literal["config"]


@dataclass(slots=True)
class Generation:
    """One pass over the source.

    Attributes:
        id: The run id that started it (incremental passes suffix their shard ids with it).
        mode: ``full``, ``incremental`` or ``reembed``.
        complete: Its finish (compaction, indexes) is done.
        started_at: When it started (epoch seconds).
        shard_bytes: The output's shard size, fixed by its first pass (shard ids depend on it);
            ``"config"`` for outputs from before shard planning; None until planned.
        reset_done: Reembed: the old rows were removed (so a resume does not remove its own).
        new: Not stored yet (written once the sink accepted the output).
    """

    id: str
    mode: str
    complete: bool = False
    started_at: float = dataclasses.field(default_factory=time.time)
    shard_bytes: ShardBytes = None
    reset_done: bool = False
    new: bool = False

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Generation:
        """From ``generation.json`` (a record from before shard planning has no ``shard_bytes``)."""
        return cls(
            id=record["id"],
            mode=record["mode"],
            complete=bool(record.get("complete", False)),
            started_at=float(record.get("started_at") or 0.0),
            shard_bytes=record.get("shard_bytes", "config"),
            reset_done=bool(record.get("reset_done", False)),
        )

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        del record["new"]
        return record

    @property
    def describe(self) -> str:
        if self.new:
            return "a new pass"
        return "extends the finished pass (new shards only)" if self.complete else "resumes the unfinished pass"


def resolve_generation(current: dict[str, Any] | None, requested: str, run_id: str) -> Generation:
    """The pass a run with ``output.mode == requested`` works on, given the output's current record."""
    if current is not None:
        stored = Generation.from_record(current)
        if not stored.complete and not (requested == "reembed" and stored.mode != "reembed"):
            if requested != stored.mode:
                log.warning("resuming the unfinished %s run on this output (asked: %s)", stored.mode, requested)
            return stored
        if stored.complete and requested == "full":
            return stored  # extend the finished pass: new shards only
    mode = "full" if requested == "incremental" and current is None else requested
    # A new output plans its shard size (None); an existing one keeps its own (ids depend on it).
    shard_bytes: ShardBytes = None if current is None else current.get("shard_bytes", "config")
    return Generation(id=run_id, mode=mode, shard_bytes=shard_bytes, new=True)
