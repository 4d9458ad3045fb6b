"""The scheduler contract: where a run's stages execute.

The run skeleton (``embedder.execution.skeleton.Run``) owns the sequence of a run and is the only part
that writes (sink, checkpoint, assembler). A scheduler answers four questions and streams events:

* ``setup`` / ``teardown`` — before anything is listed, and last whatever happened (Ray: connect
  and plan the actor pool; local: start the reader processes' fork server);
* ``load_encoder`` — what the run chunks for and describes in provenance (the model itself, or on
  Ray the facts an actor measured);
* ``read_parallelism`` — how many readers will run (the shard plan gives each of them work);
* ``execute(plan)`` — read, chunk, change-filter, pack and encode ``plan.pending``, yielding
  ``embedder.execution.events`` until every shard has ended (or the skeleton closes the stream).

``stats`` reports what the encoders did once the stream is over; ``sampler`` measures the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from embedder.config import Job
from embedder.execution.events import EncoderStats, Event
from embedder.execution.telemetry import TimelineSampler

if TYPE_CHECKING:
    from embedder.execution.control import RunControl
    from embedder.execution.plan import RunPlan


def default_read_parallelism(job: Job) -> int:
    """Reader processes this machine runs: ``runner.workers``, or one per CPU but one."""
    setting = job.runner.workers
    if setting != "auto":
        return max(1, int(setting))
    cpus = os.cpu_count() or 1
    return max(1, cpus - 1 if cpus > 2 else 1)


class Scheduler:
    """Places the stages of one run. Subclasses implement ``load_encoder`` and ``execute``.

    Args:
        job: The resolved job.
        control: The run's stop switches: stop taking shards on ``control.draining``, stop at once
            on ``control.abort``.
    """

    name = "base"
    """Stored in run records (``runner``)."""

    def __init__(self, job: Job, control: RunControl) -> None:
        self.job = job
        self.control = control
        self.marks: dict[str, float] = {}
        """Milestones the scheduler reached (``time.perf_counter()``), for the run record's ``startup``."""

    def setup(self) -> None:
        """Called under the lease before anything is listed or loaded."""

    def teardown(self) -> None:
        """Called last, whatever happened."""

    def load_encoder(self) -> Any:
        raise NotImplementedError

    def read_parallelism(self) -> int:
        return default_read_parallelism(self.job)

    def planned_read_parallelism(self) -> int:
        """The readers a run would plan its shards for, known without ``setup`` (``--dry-run``)."""
        return default_read_parallelism(self.job)

    def billed_gpus(self) -> float:
        """GPUs the run pays for, for ``$ per 1M tokens``."""
        return 1.0

    def sampler(self, encoder: Any) -> TimelineSampler:
        """The run's timeline sampler (tokens/s, memory, GPU utilization)."""
        return TimelineSampler(encoder)

    def execute(self, plan: RunPlan) -> Iterator[Event]:
        raise NotImplementedError

    def stats(self) -> EncoderStats:
        return EncoderStats()
