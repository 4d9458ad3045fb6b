"""The local runner: one process drives the whole flow on this machine (CPU or one GPU).

::

    reader processes (N)            feeder thread          encoder thread        main thread
    read shard → chunk+tokenize ──▶ pack by token budget ──▶ encode (GPU/CPU) ──▶ write rows, commit
             (mp queue, bounded)        (bounded queue)         (bounded queue)    shard, quarantine,
                                                                                  completion record

Every queue is bounded, so memory does not grow with the corpus; rows are handed to the sink in
blocks as they are encoded, and a shard is committed once all its chunks are written.

Stopping: SIGTERM/SIGINT (or a spot notice) starts a drain — readers take no new shard, in-flight
shards finish and commit within ``runner.grace_period_s``, the rest is abandoned (a rerun redoes
it) and the run ends ``interrupted`` (CLI exit 75).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from embedder.config import Job
from embedder.failpoints import failpoint
from embedder.records import Chunk, PackedBatch, Shard
from embedder.runners.stages import ShardEnd, make_connector, read_and_chunk, resolve_job, sink_registry

log = logging.getLogger("embedder")

ROWS_PER_WRITE = 4096
QUEUE_POLL_S = 0.2


@dataclass(slots=True)
class RunResult:
    """What a run did. ``state`` is ``done``, ``failed`` or ``interrupted``."""

    run_id: str
    output: str
    state: str = "running"
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    rows_written: int = 0
    bad_records: int = 0
    trimmed_documents: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    model: str = ""
    sink: str = ""
    unfinished_shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunFailed(RuntimeError):
    """The run stopped on an error; the output keeps every shard committed before it."""


# --- reader processes -----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this child when its parent dies (e.g. a SIGKILLed job)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reader_main(
    job_json: str,
    tokenizer_json: str,
    max_seq_length: int,
    overhead: int,
    tokenizer_threads: int,
    tasks: Any,
    results: Any,
    stop: Any,
) -> None:
    """Reads shards from ``tasks`` and streams their chunks to ``results`` (runs in a child process)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how to stop
    os.environ["RAYON_NUM_THREADS"] = str(tokenizer_threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(tokenizer_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads > 1 else "false"
    import tokenizers

    from embedder.chunking import Chunker

    job = Job.model_validate_json(job_json)
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    chunker = Chunker.from_settings(tokenizer, max_seq_length, overhead, job.chunking)
    connector = make_connector(job)
    while not stop.is_set():
        try:
            shard = tasks.get(timeout=QUEUE_POLL_S)
        except queue.Empty:
            continue
        if shard is None:
            return
        results.put(("start", shard.id))
        try:
            for item in read_and_chunk(connector, chunker, shard):
                results.put(item)
        except Exception:
            results.put(("error", shard.id, traceback.format_exc()))
            return


# --- the run --------------------------------------------------------------------------------


@dataclass(slots=True)
class _ShardState:
    shard: Shard
    writer: Any = None
    ended: bool = False
    expected_chunks: int = 0
    received_chunks: int = 0
    rows: int = 0
    end: ShardEnd | None = None
    pending_chunks: list[Chunk] = field(default_factory=list)
    pending_vectors: list[np.ndarray] = field(default_factory=list)


class _Stop(Exception):
    pass


class LocalRunner:
    """Runs a job on this machine.

    Args:
        job: The job (``auto`` fields are resolved here).
        on_progress: Called from the main thread with the running ``RunResult`` after each commit
            and encoded batch (the CLI draws its progress bars from it).
        force_unlock: Remove another job's lease on the output first (with a warning).
    """

    def __init__(
        self,
        job: Job,
        on_progress: Callable[[RunResult, int], None] | None = None,
        force_unlock: bool = False,
    ) -> None:
        self.job = resolve_job(job)
        self.on_progress = on_progress
        self.force_unlock = force_unlock
        self._abort = threading.Event()  # stop now: an error, a lost lease, the grace period over
        self._drain = threading.Event()  # stop taking shards, finish in-flight ones
        self._drain_deadline = float("inf")
        self._lease_lost = False

    def request_stop(self, reason: str = "stop requested") -> None:
        """Starts a drain (what SIGTERM, SIGINT and a spot notice do)."""
        if not self._drain.is_set():
            log.warning("%s: finishing in-flight shards (up to %.0f s), then stopping", reason, self.job.runner.grace_period_s)
            self._drain_deadline = time.monotonic() + self.job.runner.grace_period_s
            self._drain.set()

    def _lost_lease(self) -> None:
        self._lease_lost = True
        self._abort.set()

    # The run ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        from embedder.checkpoint import Checkpoint
        from embedder.chunking import Chunker
        from embedder.lease import Lease
        from embedder.models.encoder import Encoder
        from embedder.schema import output_schema

        job = self.job
        result = RunResult(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], output=job.output.uri)
        result.model, result.sink = job.model.name, job.output.sink
        # The lease comes first: a second job on this output is refused before it loads anything.
        lease = Lease(job.output.uri, job.output.storage_options, job.runner.lease_ttl_s, on_lost=self._lost_lease)
        lease.acquire(force=self.force_unlock)
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        restore = self._install_signal_handlers()
        watcher = None
        started = time.perf_counter()
        try:
            if job.runner.spot_watch:
                from embedder.spot import SpotWatcher

                watcher = SpotWatcher(
                    job.runner.spot_url, lambda _: self.request_stop("spot interruption notice"), job.runner.spot_poll_s
                ).start()
            connector = make_connector(job)
            shards = connector.list_shards()
            encoder = Encoder.load(job.model)
            chunker = Chunker.for_encoder(encoder, job.chunking)
            provenance = {**encoder.provenance(), "chunking": chunker.settings()}
            schema = output_schema(encoder.dim, job.source.metadata_fields, provenance)
            sink = sink_registry().SINKS.get(job.output.sink)(job.output, schema)
            sink.open()
            checkpoint.save_job(job.to_yaml())
            done = checkpoint.completed()
            pending = [s for s in shards if s.id not in done]
            result.shards_total = len(shards)
            result.shards_skipped = len(shards) - len(pending)
            checkpoint.write_run(result.to_dict())
            if pending and not self._drain.is_set():
                sink.abort_many([s.id for s in pending])
                self._run_pipeline(pending, encoder, sink, checkpoint, result)
            if self._drain.is_set():
                result.state = "interrupted"
            else:
                failpoint("during_finish")
                sink.finish()
                result.state = "done"
        except BaseException as err:
            result.state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            result.error = f"{type(err).__name__}: {err}"
            if self._lease_lost:
                result.error = "the output's lease was taken over by another job (this job's heartbeat was late)"
                raise RunFailed(result.error) from err
            raise
        finally:
            if watcher is not None:
                watcher.stop()
            restore()
            result.seconds = time.perf_counter() - started
            result.tokens_per_second = result.tokens / result.seconds if result.seconds > 0 else 0.0
            result.ended_at = time.time()
            try:
                if result.shards_total or result.state != "failed":
                    checkpoint.write_run(result.to_dict())
            finally:
                lease.release()
        return result

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: Any) -> None:
            if self._drain.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.request_stop(signal.Signals(signum).name)

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, previous in old.items():
                signal.signal(sig, previous)

        return restore

    def _workers(self, pending: list[Shard]) -> int:
        setting = self.job.runner.workers
        if setting != "auto":
            return max(1, int(setting))
        cpus = os.cpu_count() or 1
        return max(1, min(len(pending), cpus - 1 if cpus > 2 else 1))

    def _run_pipeline(self, pending: list[Shard], encoder: Any, sink: Any, checkpoint: Any, result: RunResult) -> None:
        from embedder.packing import TokenBudgetPacker
        from embedder.schema import chunks_to_table

        workers = self._workers(pending)
        ctx = mp.get_context("spawn")
        tasks = ctx.Queue()
        results = ctx.Queue(maxsize=max(8, 4 * workers))
        reader_stop = ctx.Event()
        for shard in pending:
            tasks.put(shard)
        for _ in range(workers):
            tasks.put(None)
        tokenizer_threads = max(1, (os.cpu_count() or 1) // workers)
        procs = [
            ctx.Process(
                target=_reader_main,
                args=(
                    self.job.model_dump_json(),
                    encoder.tokenizer_json,
                    encoder.max_seq_length,
                    encoder.layout.overhead,
                    tokenizer_threads,
                    tasks,
                    results,
                    reader_stop,
                ),
                daemon=True,
                name=f"embedder-reader-{i}",
            )
            for i in range(workers)
        ]
        for p in procs:
            p.start()

        batches: queue.Queue = queue.Queue(maxsize=4)
        encoded: queue.Queue = queue.Queue(maxsize=4)
        states = {s.id: _ShardState(s) for s in pending}
        failure: list[BaseException] = []

        def put(q: queue.Queue, item: Any) -> None:
            while True:
                if self._abort.is_set():
                    raise _Stop
                try:
                    q.put(item, timeout=QUEUE_POLL_S)
                    return
                except queue.Full:
                    continue

        def feeder() -> None:
            """mp results → packer → batches queue; passes ShardEnds through in order."""
            try:
                packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)
                started_shards = ended = 0
                while ended < len(pending):
                    if self._drain.is_set():
                        reader_stop.set()
                    try:
                        item = results.get(timeout=QUEUE_POLL_S)
                    except queue.Empty:
                        if self._abort.is_set():
                            raise _Stop from None
                        if not any(p.is_alive() for p in procs) and results.empty():
                            if self._drain.is_set() and ended == started_shards:
                                break  # drained: every started shard has ended
                            raise RunFailed("reader processes exited before finishing their shards")
                        continue
                    if isinstance(item, tuple) and item[0] == "start":
                        started_shards += 1
                        continue
                    if isinstance(item, tuple) and item[0] == "error":
                        raise RunFailed(f"reading shard {item[1]!r} failed:\n{item[2]}")
                    if isinstance(item, ShardEnd):
                        ended += 1
                        put(batches, item)
                        continue
                    packer.token_budget = encoder.token_budget  # follows the encoder's OOM back-off
                    for batch in packer.add(item):
                        put(batches, batch)
                for batch in packer.flush():
                    put(batches, batch)
                put(batches, None)
            except _Stop:
                return
            except BaseException as err:
                failure.append(err)
                self._abort.set()

        def encode_loop() -> None:
            try:
                while True:
                    try:
                        item = batches.get(timeout=QUEUE_POLL_S)
                    except queue.Empty:
                        if self._abort.is_set():
                            return
                        continue
                    if isinstance(item, PackedBatch):
                        t0 = time.perf_counter()
                        vectors = encoder.encode(item)
                        result.encode_seconds += time.perf_counter() - t0
                        failpoint("mid_encode")
                        put(encoded, (item, vectors))
                    else:
                        put(encoded, item)
                        if item is None:
                            return
            except _Stop:
                return
            except BaseException as err:
                failure.append(err)
                self._abort.set()

        threads = [
            threading.Thread(target=feeder, name="embedder-pack", daemon=True),
            threading.Thread(target=encode_loop, name="embedder-encode", daemon=True),
        ]
        for t in threads:
            t.start()

        def flush_rows(state: _ShardState) -> None:
            if not state.pending_chunks:
                return
            if state.writer is None:
                state.writer = sink.begin(state.shard.id)
            table = chunks_to_table(state.pending_chunks, np.concatenate(state.pending_vectors), sink.schema)
            state.writer.write(table)
            state.rows += table.num_rows
            state.pending_chunks, state.pending_vectors = [], []

        def maybe_commit(state: _ShardState) -> None:
            if not state.ended or state.received_chunks < state.expected_chunks:
                return
            flush_rows(state)
            failpoint("after_sink_write")
            if self._abort.is_set():
                raise _Stop  # never commit after a lost lease or an error elsewhere
            if state.writer is not None:
                state.writer.commit()
            failpoint("after_commit")
            end = state.end or ShardEnd(state.shard.id)
            quarantined = checkpoint.write_quarantine(state.shard.id, end.bad_records)
            checkpoint.record_completion(
                state.shard.id,
                {
                    "rows": state.rows,
                    "documents": end.documents,
                    "chunks": end.chunks,
                    "tokens": end.tokens,
                    "bad_records": quarantined,
                    "trimmed_documents": end.trimmed_documents,
                    "run_id": result.run_id,
                },
            )
            result.shards_done += 1
            result.rows_written += state.rows
            result.bad_records += quarantined
            result.documents += end.documents
            result.trimmed_documents += end.trimmed_documents
            del states[state.shard.id]
            if self.on_progress:
                self.on_progress(result, 0)

        try:
            while True:
                if failure:
                    raise failure[0]
                if self._abort.is_set():
                    raise RunFailed("stopped: " + ("lease lost" if self._lease_lost else "aborted"))
                if self._drain.is_set() and time.monotonic() > self._drain_deadline:
                    log.warning("grace period over: abandoning %d in-flight shard(s); a rerun redoes them", len(states))
                    break
                try:
                    item = encoded.get(timeout=QUEUE_POLL_S)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and encoded.empty():
                        if failure:
                            raise failure[0]
                        raise RunFailed(f"pipeline ended with {len(states)} shard(s) unfinished")
                    continue
                if item is None:  # end of stream
                    break
                if isinstance(item, ShardEnd):
                    failpoint("after_read")
                    state = states[item.shard_id]
                    state.ended, state.end, state.expected_chunks = True, item, item.chunks
                    maybe_commit(state)
                    continue
                batch, vectors = item
                touched: dict[str, _ShardState] = {}
                for i, chunk in enumerate(batch.chunks or []):
                    state = states[chunk.shard_id]
                    state.pending_chunks.append(chunk)
                    state.pending_vectors.append(vectors[i : i + 1])
                    state.received_chunks += 1
                    touched[chunk.shard_id] = state
                result.chunks += batch.num_sequences
                result.tokens += int(sum(len(c.token_ids) for c in batch.chunks or []))
                for state in touched.values():
                    if len(state.pending_chunks) >= ROWS_PER_WRITE:
                        flush_rows(state)
                    maybe_commit(state)
                if self.on_progress:
                    self.on_progress(result, batch.num_sequences)
            if states and not self._drain.is_set():
                raise RunFailed(f"pipeline ended with {len(states)} shard(s) unfinished")
        finally:
            self._abort.set()
            reader_stop.set()
            result.unfinished_shards = sorted(states)
            for state in states.values():
                if state.writer is not None:
                    try:
                        state.writer.discard()
                    except Exception:  # best effort: abort() on the next run removes leftovers
                        log.debug("discard failed for %s", state.shard.id, exc_info=True)
            for t in threads:
                t.join(timeout=5)
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():
                    p.terminate()
            results.cancel_join_thread()
            tasks.cancel_join_thread()


def run_local(
    job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
) -> RunResult:
    """Runs ``job`` with the local runner (see ``LocalRunner``)."""
    return LocalRunner(job, on_progress=on_progress, force_unlock=force_unlock).run()


__all__ = ["LocalRunner", "RunFailed", "RunResult", "run_local"]
