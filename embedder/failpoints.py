"""Test hooks at named points of a run, for the crash-matrix and drain tests.

``EMBEDDER_FAILPOINT=name[@n]`` kills the process with SIGKILL the n-th time (default: the first)
the run passes ``failpoint(name)``. ``EMBEDDER_FAILPOINT_DELAY=name:seconds`` sleeps there each
time instead (to keep a job running long enough for a test to interrupt it).
``EMBEDDER_FAILPOINT_STOP=name`` stops the whole process with SIGSTOP the first time it passes
there (every thread, heartbeat included: a frozen VM); the test resumes it with SIGCONT.

Points: ``after_read`` (a shard fully read), ``mid_encode`` (a batch encoded), ``after_sink_write``
(rows staged, shard not committed), ``after_commit`` (shard committed, completion not recorded),
``before_publish`` (the sink checked its fencing token and is about to publish a shard: the
window a stale writer must not slip through), ``lease_renew`` (the lease heartbeat read the lease
file and is about to renew it), ``during_finish`` (before the final compaction),
``during_compaction`` (Lance: fragments compacted, indexes and cleanup not done yet). Unset, a
call costs one comparison.

``EMBEDDER_TEST_CORRUPT_VECTORS=1`` perturbs every encoded vector (``corrupt``): the canary test's
deliberately broken encoder.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

_kill_name, _, _count = os.environ.get("EMBEDDER_FAILPOINT", "").partition("@")
_remaining = int(_count) if _count else 1
_delay_name, _, _delay = os.environ.get("EMBEDDER_FAILPOINT_DELAY", "").partition(":")
_delay_s = float(_delay) if _delay else 0.0
_stop_name = os.environ.get("EMBEDDER_FAILPOINT_STOP", "")


def failpoint(name: str) -> None:
    """Kills this process (or sleeps) if a test armed the failpoint ``name``."""
    global _remaining, _stop_name
    if name == _delay_name and _delay_s:
        time.sleep(_delay_s)
    if name == _stop_name:
        _stop_name = ""
        os.kill(os.getpid(), signal.SIGSTOP)
    if name != _kill_name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


_corrupt = os.environ.get("EMBEDDER_TEST_CORRUPT_VECTORS") == "1"


def corrupt(vectors: np.ndarray) -> np.ndarray:
    """Returns ``vectors``, or a perturbed copy when a test asked for a broken encoder."""
    if not _corrupt:
        return vectors
    rng = np.random.default_rng(0)
    return (vectors + rng.normal(0.0, 0.05, size=vectors.shape)).astype(np.float32)
