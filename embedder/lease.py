"""One writer per output: a lease file with owner, host, pid, heartbeat and expiry.

A job takes the lease before it writes anything and renews it from a heartbeat thread. A second
job on the same output is refused with a message naming the owner. A lease whose heartbeat stopped
(the machine died) expires after ``ttl_s`` and the next job takes it over. Creating and taking over
use create-only writes (``storage.create_exclusive``: hard link locally, ``If-None-Match`` on S3),
so of two jobs racing for a free or expired lease exactly one wins.

A lease file that cannot be read as a lease (0 bytes, truncated JSON: a disk that filled up, a
hand edit) holds no owner and no heartbeat: it counts as dead and is taken over with a warning
naming the file, like an expired one.

Fencing: each lease has a ``generation`` (one more than the lease it replaced) and a ``token``
(generation and owner) that no other lease ever has. A heartbeat can be late by any amount (a
SIGSTOP, a frozen VM), so holding the lease file proves nothing at the moment of a commit. The run
therefore hands its token to the sink (``Sink.fence``), which stores it with the data and
invalidates whatever an older writer staged; every commit proves the stored token is still its own,
in the same atomic step that publishes it (see ``indexes.base.Sink.fence``). A writer paused past
``ttl_s`` whose lease was taken over is refused there with ``LeaseLost``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from embedder.errors import EmbedderError
from embedder.failpoints import failpoint
from embedder.storage import create_exclusive, filesystem, join, read_bytes, write_bytes_atomic

log = logging.getLogger("embedder")

LEASE_FILE = "_embedder/lease.json"


class LeaseHeld(EmbedderError, RuntimeError):
    """Another live job holds the output's lease."""


class LeaseLost(EmbedderError, RuntimeError):
    """This job's lease was taken over (its heartbeat was late); it must stop writing."""


class Lease:
    """The output's write lease.

    Args:
        output_uri: The job's output URI.
        storage_options: fsspec options.
        ttl_s: Seconds without a heartbeat after which the lease counts as dead.
        on_lost: Called (from the heartbeat thread) when the lease was taken over.
    """

    def __init__(
        self,
        output_uri: str,
        storage_options: dict[str, Any] | None = None,
        ttl_s: float = 60.0,
        on_lost: Any = None,
    ) -> None:
        self.fs, self.path = filesystem(join(output_uri, LEASE_FILE), storage_options)
        self.output_uri = output_uri
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self.owner = uuid.uuid4().hex
        self.generation = 0  # set by acquire: one more than the lease it replaced
        self._replaced: str | None = None  # owner of the lease acquire took over, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner,
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat_at": now,
            "expires_at": now + self.ttl_s,
            "ttl_s": self.ttl_s,
        }

    @property
    def token(self) -> str:
        """This lease's fencing token (``<generation>:<owner>``), unique to it; sinks store it and
        refuse commits of any other token (``Sink.fence``)."""
        return f"{self.generation}:{self.owner}"

    def read(self) -> dict[str, Any] | None:
        """The current lease record, or None when there is no lease file.

        A file that is not a lease record (empty, truncated, not a JSON object) reads as an expired
        record with ``broken`` saying why; its ``owner`` is derived from the bytes, so removing it
        (``_remove_if_owner``) never removes a lease another job wrote meanwhile.
        """
        self.fs.invalidate_cache(self.path)
        raw = read_bytes(self.fs, self.path)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("expires_at", 0), (int, float)):
            return record
        why = "0 bytes" if not raw else f"{len(raw)} bytes that are not a lease record (truncated JSON?)"
        return {"owner": f"broken:{hashlib.sha1(raw).hexdigest()}", "expires_at": 0, "broken": why}

    def describe(self, record: dict[str, Any]) -> str:
        if record.get("broken"):
            return f"nobody: the lease file {self.path} is corrupt ({record['broken']})"
        left = record.get("expires_at", 0) - time.time()
        return (
            f"pid {record.get('pid')} on host {record.get('host')} (owner {str(record.get('owner'))[:8]}, "
            f"heartbeat {max(0.0, time.time() - record.get('heartbeat_at', 0)):.0f} s ago, expires in {max(0.0, left):.0f} s)"
        )

    def acquire(self, force: bool = False) -> None:
        """Takes the lease, or raises ``LeaseHeld`` naming the live owner.

        Args:
            force: Remove any existing lease first (``--force-unlock``), with a warning.
        """
        for _ in range(3):
            current = self.read()
            previous = current.get("generation", 0) if current is not None else 0
            self.generation = (previous if isinstance(previous, int) else 0) + 1
            if current is not None:
                expired = current.get("expires_at", 0) < time.time()
                if current.get("broken"):
                    log.warning(
                        "the lease file %s is corrupt (%s); taking the output over as from a dead job",
                        self.path, current["broken"],
                    )
                elif force:
                    log.warning("--force-unlock: removing the lease of %s", self.describe(current))
                elif not expired:
                    raise LeaseHeld(
                        f"output {self.output_uri!r} is being written by another job: {self.describe(current)}. "
                        "Wait for it, or if that job is dead run again with --force-unlock"
                    )
                else:
                    log.warning("taking over the expired lease of %s", self.describe(current))
                self._remove_if_owner(current.get("owner"))
            if create_exclusive(self.fs, self.path, json.dumps(self._record()).encode()):
                self._replaced = None if current is None or current.get("broken") else current.get("owner")
                self._start_heartbeat()
                return
            force = False  # someone else created it meanwhile: re-read and judge again
        current = self.read() or {}
        raise LeaseHeld(f"output {self.output_uri!r} is being written by another job: {self.describe(current)}")

    def _remove_if_owner(self, owner: str | None) -> None:
        current = self.read()
        if current is not None and current.get("owner") == owner:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def check_held(self, what: str) -> None:
        """Raises ``LeaseLost`` unless the lease file still names this job.

        The run calls it before it opens (and, re-embedding, resets) the output and again after
        ``Sink.fence``: a job frozen between taking the lease and fencing (past ``ttl_s``, while
        another job took over and fenced) must not reset the newer job's output nor store its
        token over the newer one's, and one whose fence landed late anyway stops before it writes
        anything (the newer job's commits are then refused: it stops with the fence's message and
        a rerun resumes).
        """
        current = self.read()
        if current is None or current.get("owner") != self.owner:
            raise LeaseLost(
                f"{what} of {self.output_uri!r} stopped: the output's lease was taken over by another job "
                f"({self.describe(current or {})}) while this one was paused past runner.lease_ttl_s; nothing was "
                "written. The other job writes the output; if it failed, run this command again"
            )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="embedder-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renews the lease every ``ttl_s / 4`` while the file names this job; stops at the first
        read that names another (``on_lost``).

        A renewal is a read, then a write: a thread frozen between the two (SIGSTOP, a suspended VM)
        past the expiry would write its record over the lease of the job that took over meanwhile.
        So the write happens only while this job's last record has not expired; otherwise the file
        is read again first. The rest of that window (a second freeze right there) is closed on the
        other side: a job that finds its lease overwritten by the job it took the lease over from
        puts its own record back (``_reclaim``) instead of stopping; that writer's commits are
        refused by the sink's fence whatever the file says.
        """
        interval = max(0.2, self.ttl_s / 4)
        expires_at = time.time() + self.ttl_s
        while not self._stop.wait(interval):
            try:
                current = self.read()
                failpoint("lease_renew")
                if time.time() >= expires_at:  # frozen past our own expiry: what was read may be stale
                    current = self.read()
                if current is None or current.get("owner") != self.owner:
                    if self._reclaim(current):
                        continue
                    log.error("the output's lease was taken over by %s; stopping", self.describe(current or {}))
                    if self.on_lost:
                        self.on_lost()
                    return
                record = self._record()
                write_bytes_atomic(self.fs, self.path, json.dumps(record).encode())
                expires_at = record["expires_at"]
            except Exception:  # a transient storage error: try again at the next beat
                log.warning("lease heartbeat failed; retrying", exc_info=True)

    def _reclaim(self, current: dict[str, Any] | None) -> bool:
        """Puts this job's record back when ``current`` is the lease this job took over (its owner,
        frozen mid-renewal, wrote it back late); False for any other owner, or no lease file.

        Only that owner is known to be older than this job: generations restart at 1 after a
        corrupt lease file, so they cannot tell which of two jobs came later.
        """
        if current is None or self._replaced is None or current.get("owner") != self._replaced:
            return False
        log.warning(
            "the job this one took the output over from (%s) renewed its old lease late; putting ours back "
            "(its commits are refused by the fence)", self.describe(current),
        )
        write_bytes_atomic(self.fs, self.path, json.dumps(self._record()).encode())
        return True

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if this job still owns it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._remove_if_owner(self.owner)
        except Exception:
            log.warning("could not remove the lease file; it expires by itself", exc_info=True)
