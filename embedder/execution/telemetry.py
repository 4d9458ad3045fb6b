"""What a run measures as it goes: tokens/s, host memory (the runner's and its readers' RSS) and GPU
utilization over time, for the run record and the report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from embedder.execution.result import RunResult


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process in MB, from ``/proc`` (None where there is no ``/proc``, or the
    process is gone)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


class TimelineSampler:
    """Samples tokens/s, host memory (the runner's and its readers' RSS) and GPU utilization (where
    NVML answers) every few seconds for the run record: a run whose memory grows shows it there.

    Args:
        encoder: The run's encoder (its device and computed-token counter).
        reader_pids: Returns the pids of the reader processes alive now (local runner).
    """

    PERIOD_S = 2.0
    MAX_POINTS = 2000

    def __init__(self, encoder: Any, reader_pids: Callable[[], list[int]] | None = None) -> None:
        self.encoder = encoder
        self.reader_pids = reader_pids
        self.t0 = time.perf_counter()
        self.next_at = self.t0
        self.utilization: list[float] = []
        self.computed_at_start = getattr(encoder, "tokens_computed", None)

    def sample(self, result: RunResult) -> None:
        now = time.perf_counter()
        if now < self.next_at:
            return
        self.next_at = now + self.PERIOD_S
        result.timeline.append([round(now - self.t0, 3), result.tokens])
        if len(result.timeline) > self.MAX_POINTS:
            result.timeline[:] = result.timeline[::2]
        runner = rss_mb()
        if runner is not None:
            readers = sum(rss_mb(pid) or 0.0 for pid in self.reader_pids()) if self.reader_pids else 0.0
            result.memory_timeline.append([round(now - self.t0, 3), round(runner, 1), round(readers, 1)])
            if len(result.memory_timeline) > self.MAX_POINTS:
                result.memory_timeline[:] = result.memory_timeline[::2]
        if getattr(self.encoder, "device", None) is not None and self.encoder.device.type == "cuda":
            try:
                import torch

                self.utilization.append(float(torch.cuda.utilization(self.encoder.device)))
            except Exception:  # NVML missing: utilization is not measurable here
                pass

    def finish(self, result: RunResult) -> None:
        if not result.timeline or result.timeline[-1][1] != result.tokens:
            self.next_at = 0.0
            self.sample(result)
        result.gpu_seconds = result.encode_seconds
        if self.utilization:
            result.gpu_utilization = sum(self.utilization) / len(self.utilization)
        computed = getattr(self.encoder, "tokens_computed", None)
        if computed is not None and self.computed_at_start is not None:
            result.tokens_computed = computed - self.computed_at_start
            real = result.tokens_computed and result.tokens
            if real:
                # real tokens include each sequence's specials and prompt: what the model must compute
                needed = result.tokens + result.chunks * self.encoder.layout.overhead
                result.padding_waste = max(0.0, 1.0 - needed / result.tokens_computed)


class EncoderGroup:
    """Several encoders seen as one by the timeline sampler: the first one's device and layout, the
    computed tokens of all."""

    def __init__(self, encoders: list[Any]) -> None:
        self.encoders = encoders
        self.device = getattr(encoders[0], "device", None)
        self.layout = getattr(encoders[0], "layout", None)

    @property
    def tokens_computed(self) -> int | None:
        counts = [getattr(e, "tokens_computed", None) for e in self.encoders]
        return None if any(c is None for c in counts) else sum(counts)
