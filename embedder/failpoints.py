"""Named crash points for the crash-matrix tests: ``EMBEDDER_FAILPOINT=name[@n]`` kills the process
with SIGKILL the n-th time (default 1st) the run passes ``failpoint(name)``.

Points: ``after_read`` (a shard fully read), ``mid_encode`` (a batch encoded), ``after_sink_write``
(rows staged, shard not committed), ``after_commit`` (shard committed, completion not recorded),
``during_finish`` (inside the final compaction). Unset, ``failpoint`` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("EMBEDDER_FAILPOINT", "")
_name, _, _count = _spec.partition("@")
_remaining = int(_count) if _count else 1
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Kills this process if the failpoint ``name`` is armed and its count is reached."""
    global _remaining
    if not _name or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
