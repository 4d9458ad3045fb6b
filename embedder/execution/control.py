"""How a run stops: one drain policy for every scheduler, and the abort switch.

A drain (SIGTERM, SIGINT, a spot notice, ``request_stop``) lets the shards in flight when it began
finish and commit within ``runner.grace_period_s``; readers take no new shard; what is left is
abandoned (a rerun redoes it) and the run ends ``interrupted`` (CLI exit 75). An abort (an error in
any thread, a lost lease) stops everything now and commits nothing more.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger("embedder")


class RunControl:
    """The stop switches every part of a run reads: ``abort`` (stop now) and ``drain`` (stop taking
    shards, finish those in flight).

    Args:
        grace_period_s: How long a drain waits for in-flight shards.
    """

    def __init__(self, grace_period_s: float) -> None:
        self.grace_period_s = grace_period_s
        self.abort = threading.Event()
        self.drain = threading.Event()
        self.deadline = float("inf")
        self.lease_lost = False
        self._in_flight: set[str] | None = None

    @property
    def draining(self) -> bool:
        return self.drain.is_set()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Starts a drain (what SIGTERM, SIGINT and a spot notice do)."""
        if not self.drain.is_set():
            log.warning("%s: finishing in-flight shards (up to %.0f s), then stopping", reason, self.grace_period_s)
            self.deadline = time.monotonic() + self.grace_period_s
            self.drain.set()

    def lose_lease(self) -> None:
        """The lease's heartbeat found another job holding the output: stop now."""
        self.lease_lost = True
        self.abort.set()

    def drained(self, started: Collection[str], unfinished: Collection[str]) -> bool:
        """True once a drain may end the stream: every shard in flight when it began (started, not
        committed) has committed, or the grace period is over (a warning names what is abandoned)."""
        if not self.drain.is_set():
            return False
        left = set(unfinished)
        if self._in_flight is None:
            self._in_flight = set(started) & left
        waiting = self._in_flight & left
        if not waiting:
            return True
        if time.monotonic() > self.deadline:
            log.warning("grace period over: abandoning %d in-flight shard(s); a rerun redoes them", len(waiting))
            return True
        return False

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM and SIGINT start a drain (a second Ctrl-C stops at once); returns the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: Any) -> None:
            if self.drain.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.request_stop(signal.Signals(signum).name)

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, previous in old.items():
                signal.signal(sig, previous)

        return restore
