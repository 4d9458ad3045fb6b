"""The commit stage: encoded chunks back into shards, each staged in the sink, committed once all of
its chunks are in, then its quarantine and completion record written — and what a run quarantined,
counted by reason."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.execution.result import RunFailed, RunResult
from embedder.failpoints import failpoint
from embedder.records import BadRecord, Chunk, Shard, ShardEnd

if TYPE_CHECKING:
    from embedder.checkpoint import Checkpoint
    from embedder.validate import CanarySampler
    from indexes.base import ShardWriter, Sink

log = logging.getLogger("embedder")
ROWS_PER_WRITE = 4096
LENGTH_BIN = 16
COMMIT_QUEUE = 16  # complete shards waiting for the committer thread before the main thread waits


MAX_REASONS = 50
_NUMBERS = re.compile(r"\d+")


def reason_kind(reason: str) -> str:
    """A quarantine reason with its numbers blanked, so "line 3 column 7" and "line 9 column 1" count
    as one kind."""
    return _NUMBERS.sub("N", reason)[:300]


def count_reasons(counts: dict[str, int], reasons: Iterable[str]) -> None:
    """Adds reasons to ``counts`` by kind (at most ``MAX_REASONS`` kinds; the rest count as "other")."""
    for reason in reasons:
        kind = reason_kind(reason)
        if kind not in counts and len(counts) >= MAX_REASONS:
            kind = "other reasons"
        counts[kind] = counts.get(kind, 0) + 1


def top_reasons(counts: dict[str, int], n: int = 3) -> str:
    """``"no text field 'text' (40); empty text (2)"``: the commonest reasons with their counts."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    more = len(counts) - len(ranked)
    return "; ".join(f"{reason} ({count:,})" for reason, count in ranked) + (f"; {more} more kinds" if more > 0 else "")


def field_hint(counts: dict[str, int], records: Iterable[dict[str, Any]] = ()) -> str:
    """What to set when records were quarantined for a missing id or text field."""
    fields = next((r.get("fields") for r in records if r.get("fields")), None)
    seen = f"records have fields {', '.join(fields)}: " if fields else ""
    if any(k.startswith("no text field") for k in counts):
        return f"{seen}set source.text_field (--set source.text_field=NAME) to the field holding the text"
    if any(k.startswith("no id field") for k in counts):
        return f"{seen}set source.id_field (--set source.id_field=NAME) to a field with a unique id per record"
    return ""


def empty_output_error(result: RunResult, checkpoint: Checkpoint, source_uri: str) -> str:
    """The failure message of a run that leaves an output with no row: why, and what to change.

    An embedding job that ends "done" with nothing embedded tells its user nothing; it fails instead
    (exit 1) with the commonest quarantine reasons and a hint built from the records it saw.
    """
    records = checkpoint.quarantine()
    counts: dict[str, int] = {}
    count_reasons(counts, (r.get("reason", "") for r in records))
    where = f"{checkpoint.output_uri.rstrip('/')}/_embedder/quarantine/"
    if not records:
        return (
            f"nothing was embedded: the source {source_uri!r} gave no document "
            f"({result.shards_total} shard(s)); check source.uri and source.format"
        )
    hint = field_hint(counts, records)
    return (
        f"nothing was embedded: all {len(records):,} record(s) were quarantined ({top_reasons(counts)}); "
        + (f"{hint}; " if hint else "")
        + f"the records and reasons are in {where}"
    )


@dataclass(slots=True)
class _ShardState:
    shard_id: str
    writer: ShardWriter | None = None
    end: ShardEnd | None = None
    received: set[str] = field(default_factory=set)
    rows: int = 0
    pending_chunks: list[Chunk] = field(default_factory=list)
    pending_vectors: list[np.ndarray] = field(default_factory=list)
    bad_vectors: list[BadRecord] = field(default_factory=list)
    length_bins: Counter[int] = field(default_factory=Counter)  # rows per LENGTH_BIN-token bin of their length


class ShardAssembler:
    """Turns encoded chunks back into shards: stages rows in the sink, commits a shard once all of
    its chunks are in, then writes its quarantine and completion record — in that order, so a
    crash anywhere leaves either a fully recorded shard or one the next run redoes.

    Chunks may arrive in any order and interleaved across shards (batches are length-sorted), and
    a shard's ``ShardEnd`` may come before its last vectors. A chunk delivered twice (a retried
    task on a cluster) is written once.

    Args:
        shards: The shards this run processes.
        sink: The opened sink.
        checkpoint: The job's checkpoint.
        result: The run's result, updated in place.
        abort: When set, nothing more is committed (an error elsewhere, a lost lease).
        on_commit: Called after each committed shard.
        canaries: Optional sampler offered every written chunk (for the end-of-run canary check).
        background: Commit complete shards on a committer thread, so the thread that drains the
            encoder never waits on storage (fsyncs, renames, object-store PUTs). Call ``wait()``
            at the end of the stream and ``close()`` when stopping.

    Vectors with NaN/Inf values or zero norm are never written: they go to the shard's quarantine.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        sink: Sink,
        checkpoint: Checkpoint,
        result: RunResult,
        abort: threading.Event,
        on_commit: Callable[[RunResult], None] | None = None,
        canaries: CanarySampler | None = None,
        background: bool = False,
    ) -> None:
        self.sink = sink
        self.canaries = canaries
        self._lock = threading.Lock()
        self._committing: dict[str, _ShardState] = {}
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._committer: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=COMMIT_QUEUE)
            self._committer = threading.Thread(target=self._commit_loop, name="embedder-commit", daemon=True)
            self._committer.start()
        self.checkpoint = checkpoint
        self.result = result
        self.abort = abort
        self.on_commit = on_commit
        self._states = {s.id: _ShardState(s.id) for s in shards}
        self._sizes = {s.id: s.size_bytes for s in shards}  # in completion records: a changed source is noticed
        self.started: dict[str, float] = {}  # shard id → when a reader started it (for durations)
        self.generation: str | None = None  # the pass this run belongs to (stored in completion records)

    @property
    def unfinished(self) -> list[str]:
        """Shards not committed yet (still receiving, or waiting for the committer)."""
        with self._lock:
            return [*self._states, *self._committing]

    def check(self) -> None:
        """Raises the committer thread's error, if it had one."""
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Commits every complete shard handed to the committer, then stops it (end of stream)."""
        if self._committer is not None and self._committer.is_alive():
            self._queue.put(None)
            self._committer.join()
        self.check()

    def close(self) -> None:
        """Stops the committer without committing what is still queued (the run is stopping)."""
        if self._committer is not None and self._committer.is_alive():
            self.abort.set()
            while True:
                try:
                    self._queue.put(None, timeout=0.2)
                    break
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
            self._committer.join(timeout=60)

    def _commit_loop(self) -> None:
        while True:
            state = self._queue.get()
            if state is None:
                return
            if self._error is not None or self.abort.is_set():
                continue  # stopping: leave it uncommitted (a rerun redoes it)
            try:
                self._commit(state)
            except BaseException as err:  # handed to the main thread by check()
                self._error = err

    def add_vectors(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Takes encoded chunks (``vectors[i]`` belongs to ``chunks[i]``)."""
        from embedder.validate import vector_problems

        touched: dict[str, _ShardState] = {}
        problems = vector_problems(vectors)
        for i, chunk in enumerate(chunks):
            state = self._states.get(chunk.shard_id)
            if state is None or chunk.id in state.received:
                continue  # a duplicate delivery of a committed or already-seen chunk
            state.received.add(chunk.id)
            touched[chunk.shard_id] = state
            self.result.chunks += 1
            self.result.tokens += len(chunk.token_ids)
            if problems[i]:
                state.bad_vectors.append(BadRecord(chunk.shard_id, f"chunk {chunk.id}", problems[i], doc_id=chunk.doc_id))
                continue
            state.pending_chunks.append(chunk)
            state.pending_vectors.append(vectors[i : i + 1])
            state.length_bins[len(chunk.token_ids) // LENGTH_BIN] += 1
            if self.canaries is not None:
                self.canaries.offer(chunk.id, chunk.text, vectors[i], len(chunk.token_ids))
        for state in touched.values():
            if len(state.pending_chunks) >= ROWS_PER_WRITE:
                self._flush(state)
            self._maybe_commit(state)

    def end_shard(self, end: ShardEnd) -> None:
        """Takes a shard's ``ShardEnd`` (its chunk count and bad records)."""
        state = self._states.get(end.shard_id)
        if state is None or state.end is not None:
            return
        state.end = end
        self._maybe_commit(state)

    def discard_all(self) -> None:
        """Drops staged rows of every unfinished shard (best effort; the next run's abort cleans up)."""
        self.close()
        with self._lock:
            states = [*self._states.values(), *self._committing.values()]
        for state in states:
            if state.writer is not None:
                try:
                    state.writer.discard()
                except Exception:
                    log.debug("discard failed for %s", state.shard_id, exc_info=True)

    def _flush(self, state: _ShardState) -> None:
        from embedder.schema import chunks_to_table

        if not state.pending_chunks:
            return
        started = time.perf_counter()
        if state.writer is None:
            state.writer = self.sink.begin(state.shard_id)
        table = chunks_to_table(state.pending_chunks, np.concatenate(state.pending_vectors), self.sink.schema)
        state.writer.write(table)
        state.rows += table.num_rows
        state.pending_chunks, state.pending_vectors = [], []
        with self._lock:
            self.result.write_seconds += time.perf_counter() - started

    def _maybe_commit(self, state: _ShardState) -> None:
        end = state.end
        if end is None or len(state.received) < end.chunks:
            return
        with self._lock:
            del self._states[state.shard_id]
            self._committing[state.shard_id] = state
        if self._queue is None:
            self._commit(state)
        else:
            self.check()
            self._queue.put(state)  # bounded: if storage lags far behind, the stream waits for it

    def _commit(self, state: _ShardState) -> None:
        end = state.end
        assert end is not None
        self._flush(state)
        started = time.perf_counter()
        failpoint("after_sink_write")
        if self.abort.is_set():
            raise RunFailed("stopped before committing shard " + state.shard_id)
        if state.writer is not None:
            state.writer.commit()
        failpoint("after_commit")
        bad = [*end.bad_records, *state.bad_vectors]
        quarantined = self.checkpoint.write_quarantine(state.shard_id, bad)
        if end.changes is not None:
            self.checkpoint.write_changes(state.shard_id, end.changes)
        self.checkpoint.record_completion(
            state.shard_id,
            {
                "rows": state.rows,
                "documents": end.documents,
                "chunks": end.chunks,
                "tokens": end.tokens,
                "bad_records": quarantined,
                "trimmed_documents": end.trimmed_documents,
                "run_id": self.result.run_id,
                "generation": self.generation,
                "seconds": time.time() - self.started[state.shard_id] if state.shard_id in self.started else None,
                "size_bytes": self._sizes.get(state.shard_id),
            },
        )
        result = self.result
        with self._lock:  # the main thread reads these for progress while the committer writes them
            result.commit_seconds += time.perf_counter() - started
            result.shards_done += 1
            result.rows_written += state.rows
            result.bad_records += quarantined
            result.bad_vectors += len(state.bad_vectors)
            count_reasons(result.quarantine_reasons, (r.reason for r in bad))
            hist = result.length_histogram  # committed rows only: a shard thrown away counts nothing
            for length_bin, rows in state.length_bins.items():
                if length_bin >= len(hist):
                    hist.extend([0] * (length_bin + 1 - len(hist)))
                hist[length_bin] += rows
            if end.changes is not None:
                result.added += end.changes["added"]
                result.updated += end.changes["updated"]
                result.unchanged += end.changes["unchanged"]
            else:
                result.added += state.rows
            result.documents += end.documents
            result.trimmed_documents += end.trimmed_documents
            del self._committing[state.shard_id]
        if self.on_commit:
            self.on_commit(result)
