"""Stage functions shared by every runner: resolve the job, read+chunk a shard, build output rows.

Runners differ in how they schedule these (threads and processes locally, Ray tasks and actors on a
cluster) but call the same functions, so both produce the same output for the same job.
"""

from __future__ import annotations

import importlib
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.config import ConfigError, Job
from embedder.errors import EmbedderError
from embedder.failpoints import failpoint
from embedder.records import BadRecord, Chunk, Document, Shard, UnchangedDocument

if TYPE_CHECKING:
    from connectors.base import Connector
    from embedder.checkpoint import Checkpoint
    from embedder.chunking import Chunker
    from embedder.validate import CanarySampler
    from indexes.base import ShardWriter, Sink

log = logging.getLogger("embedder")
ROWS_PER_WRITE = 4096
LENGTH_BIN = 16
COMMIT_QUEUE = 16  # complete shards waiting for the committer thread before the main thread waits


@dataclass(slots=True)
class RunResult:
    """What a run did. ``state`` is ``done``, ``failed`` or ``interrupted``.

    ``seconds`` is the whole run; ``load_seconds`` the part spent listing shards and loading the
    model; ``pipeline_seconds`` the embedding itself (read, chunk, encode, write, commit), over which
    ``tokens_per_second`` is measured (the end-of-run canary check and compaction are outside it).
    """

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
    load_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    encode_seconds: float = 0.0
    tokens_per_second: float = 0.0
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    model: str = ""
    sink: str = ""
    runner: str = "local"
    unfinished_shards: list[str] = field(default_factory=list)  # not committed when the run ended
    interrupted_shards: list[str] = field(default_factory=list)  # of those, started (in flight or failed)
    bad_vectors: int = 0
    mode: str = "full"
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    canary: dict[str, Any] | None = None
    indexes: dict[str, Any] | None = None  # what the sink's finish built (vector / full-text index)
    length_histogram: list[int] = field(default_factory=list)  # committed rows per 16-token bin of their length
    timeline: list[list[float]] = field(default_factory=list)  # [seconds since start, tokens so far]
    # [seconds since start, runner RSS MB, reader processes' RSS MB] (Linux; the readers' is 0 on Ray)
    memory_timeline: list[list[float]] = field(default_factory=list)
    tokens_computed: int | None = None  # tokens the forward computed (specials, prompts, padding included)
    padding_waste: float | None = None  # share of computed tokens that were padding
    gpu_seconds: float = 0.0  # time the encoder thread waited on the device
    write_seconds: float = 0.0  # staging rows in the sink (all threads together)
    commit_seconds: float = 0.0  # committing shards: sink commit, quarantine, change and completion records
    heap_trim_seconds: float = 0.0  # returning freed heap to the OS after commits (embedder.memory)
    gpu_utilization: float | None = None  # mean of nvidia-smi-style samples, when measurable
    gpu_hourly_usd: float | None = None
    usd: float | None = None
    usd_per_million_tokens: float | None = None
    documents_read: int = 0  # documents read and chunked so far (progress; equals documents once all commit)
    bytes_total: int = 0  # input bytes of this run's pending shards (progress, ETA)
    bytes_read: int = 0  # input bytes of the shards read to their end so far
    dtype: str | None = None  # the compute precision of this run's encoder
    shard_bytes: int | None = None  # target input bytes per shard of this output (fixed by its first pass)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # reason → records, this run's commits
    quarantine_uri: str | None = None  # where the quarantine files are
    canary_seconds: float = 0.0  # the end-of-run reference check
    canary_device: str | None = None
    output_rows: int | None = None  # rows the output holds at the end of the run
    encoders: int = 1  # encoders that ran (local: one per GPU with runner.encoders auto; Ray: actors)
    encoder_tokens_per_second: list[float] = field(default_factory=list)  # each encoder's share of the rate

    def add_cost(self, gpu_hourly_usd: float | None) -> None:
        """Prices the run: the GPU is billed for the whole run, model loading included."""
        self.gpu_hourly_usd = gpu_hourly_usd
        if gpu_hourly_usd is None:
            return
        self.usd = self.seconds / 3600.0 * gpu_hourly_usd
        self.usd_per_million_tokens = self.usd / self.tokens * 1e6 if self.tokens else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunFailed(EmbedderError, RuntimeError):
    """The run stopped on an error; the output keeps every shard committed before it."""


DOCS_PER_BLOCK = 256
CHARS_PER_BLOCK = 2_000_000


@dataclass(slots=True)
class ShardEnd:
    """The last message of a shard's read+chunk stage: its counts and bad records."""

    shard_id: str
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    trimmed_documents: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)
    unchanged_doc_ids: list[str] = field(default_factory=list)  # skipped by version (incremental)
    changes: dict[str, Any] | None = None  # incremental: what the pass saw and replaced (see embedder.incremental)


def connector_registry():  # noqa: ANN201 - registry type lives in connectors
    return importlib.import_module("connectors.registry")


def sink_registry():  # noqa: ANN201
    return importlib.import_module("indexes.registry")


def resolve_job(job: Job) -> Job:
    """Fills ``auto`` choices (source format, sink) from the URIs; returns a new Job."""
    job = job.model_copy(deep=True)
    if job.source.format == "auto":
        job.source.format = _detect_source_format(job)
    if job.output.sink == "auto":
        job.output.sink = sink_registry().detect_sink(job.output.uri)
    connector_registry().CONNECTORS.get(job.source.format)  # unknown names: RegistryError listing the valid
    sink_registry().SINKS.get(job.output.sink)
    sink_registry().check_output_location(job.output.uri, job.output.storage_options)
    return job


def plugin_modules(job: Job) -> list[str]:
    """Modules that other processes (readers, Ray tasks) import so the job's connector is registered
    there: the module of a connector registered by the user's own code (built-ins register themselves).

    Raises:
        ConfigError: the connector is defined in the script being run (``__main__``), which other
            processes cannot import; the message says to move it into a module.
    """
    registry = connector_registry()
    cls = registry.CONNECTORS.get(job.source.format)
    module = cls.__module__
    if module.startswith("connectors."):
        return []
    if module in ("__main__", "__mp_main__"):
        raise ConfigError(
            f"connector {job.source.format!r} is defined in the script being run (__main__), which reader "
            "processes cannot import: move the class into a module (e.g. my_connectors.py) and import it"
        )
    return [module]


def import_plugins(modules: Sequence[str]) -> None:
    """Imports plugin modules in a reader process or Ray task (see ``plugin_modules``)."""
    for module in modules:
        importlib.import_module(module)


def _detect_source_format(job: Job) -> str:
    registry = connector_registry()
    uri = job.source.uri
    fmt = registry.detect_format(uri)
    if fmt:
        return fmt
    from embedder.storage import filesystem

    fs, path = filesystem(uri, job.source.storage_options)
    if not fs.exists(path):
        raise ConfigError(f"source {uri!r} does not exist: check source.uri / --source")
    if fs.isdir(path):
        if fs.exists(f"{path.rstrip('/')}/data") and fs.exists(f"{path.rstrip('/')}/_versions"):
            return "lance"
        counts: Counter[str] = Counter()
        for i, found in enumerate(fs.find(path)):
            if i >= 2000:
                break
            name = found.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            detected = registry.detect_format(found)
            if detected:
                counts[detected] += 1
        if counts:
            return counts.most_common(1)[0][0]
    valid = ", ".join(n for n in registry.CONNECTORS.names())
    raise ConfigError(f"cannot tell the format of {uri!r}; set source.format / --format (valid: {valid})")


def make_connector(job: Job, shard_bytes: int | None = None) -> Connector:
    """The job's connector, found through the registry (``shard_bytes``: the output's planned shard
    size, see ``plan_shards``)."""
    cls = connector_registry().CONNECTORS.get(job.source.format)
    connector = cls(job.source)
    connector.shard_bytes_override = shard_bytes
    return connector


def read_and_chunk(connector: Connector, chunker: Chunker, shard: Shard) -> Iterator[list[Chunk] | ShardEnd]:
    """Reads one shard and yields blocks of chunks, then one ``ShardEnd`` with its counts.

    Documents are tokenized in blocks (one batched tokenizer call each); bad records are collected
    for the shard's quarantine. A document that gives no chunk (its text has no token for this
    model's tokenizer: zero-width spaces, control characters, a lone BOM) is one of them, so every
    document read is either embedded or quarantined.
    """
    end = ShardEnd(shard.id)
    block: list[Document] = []
    block_chars = 0
    before = chunker.stats.trimmed_documents

    def flush() -> list[Chunk]:
        chunks = chunker.chunk(block, shard_id=shard.id)
        end.chunks += len(chunks)
        end.tokens += sum(len(c.token_ids) for c in chunks)
        chunked = {c.doc_id for c in chunks}
        for doc in block:
            if doc.id not in chunked:
                end.documents -= 1
                end.bad_records.append(
                    BadRecord(
                        shard.id,
                        doc.location or f"document {doc.id}",
                        "text has no tokens for this model's tokenizer (only invisible or control characters?)",
                        doc_id=doc.id,
                        snippet=ascii(doc.text[:100]),
                    )
                )
        return chunks

    for item in connector.documents(shard):
        if isinstance(item, BadRecord):
            end.bad_records.append(item)
            continue
        if isinstance(item, UnchangedDocument):
            end.unchanged_doc_ids.append(item.id)
            continue
        end.documents += 1
        block.append(item)
        block_chars += len(item.text)
        if len(block) >= DOCS_PER_BLOCK or block_chars >= CHARS_PER_BLOCK:
            chunks = flush()
            block, block_chars = [], 0
            if chunks:
                yield chunks
    if block:
        chunks = flush()
        if chunks:
            yield chunks
    end.trimmed_documents = chunker.stats.trimmed_documents - before
    yield end


def chunking_provenance(chunker: Chunker) -> dict[str, Any]:
    return {"chunking": chunker.settings()}


class ReadProgress:
    """Counts documents as readers produce them (before their shard commits) and the input bytes of
    shards read to their end, for progress lines and the ETA. Exact once every shard has ended: a
    shard's end sets its document count to what the reader counted.

    Args:
        result: The run's result, updated in place (``documents_read``, ``bytes_read``).
        shards: This run's pending shards (their ``size_bytes``).
    """

    def __init__(self, result: RunResult, shards: Sequence[Shard]) -> None:
        self.result = result
        self._sizes = {s.id: s.size_bytes for s in shards}
        self._counted: dict[str, int] = {}

    def chunks(self, chunks: Sequence[Chunk]) -> None:
        """A block of chunks read: each first chunk of a document counts that document."""
        for chunk in chunks:
            if chunk.chunk_index == 0:
                self._counted[chunk.shard_id] = self._counted.get(chunk.shard_id, 0) + 1
                self.result.documents_read += 1

    def end(self, end: ShardEnd) -> None:
        """A shard read to its end."""
        if end.shard_id not in self._sizes:
            return
        self.result.documents_read += end.documents - self._counted.pop(end.shard_id, 0)
        self.result.bytes_read += self._sizes.pop(end.shard_id)


# --- shard planning -------------------------------------------------------------------------

SHARDS_PER_READER = 2
"""A source is split into at least this many shards per reader where its format allows."""

MIN_SHARD_BYTES = 256 * 1024
"""Shards are never planned smaller than this to give every reader work (a smaller source has fewer)."""


def plan_shards(connector: Connector, readers: int, stored: int | None | str = None) -> tuple[list[Shard], int]:
    """Lists the source's shards so that every reader has work, and returns them with the shard size.

    Large sources keep shards of about ``source.shard_size_mb``. A source that gives fewer than
    ``SHARDS_PER_READER × readers`` shards at that size is split finer (JSONL byte ranges, Parquet row
    groups, multistream bz2 streams, groups of text files: each connector's own boundaries), down to
    ``MIN_SHARD_BYTES``: a 59 MB dump as one shard kept one reader busy and the GPU a third idle.

    Shard ids depend on the shard size, so the size is fixed by an output's first pass and stored in
    its generation record: a resumed or extended pass (``stored``) lists exactly the same shards,
    whatever the machine's CPU count. ``stored == "config"``: an output from before this rule; its
    shards stay at the configured size.

    Args:
        connector: The job's connector.
        readers: Reader processes (or read tasks) that will run.
        stored: The output's shard size (bytes), ``"config"``, or None to plan it now.
    """
    if stored == "config":
        shards = connector.list_shards()
        return shards, connector.shard_bytes
    if isinstance(stored, int):
        connector.shard_bytes_override = stored
        return connector.list_shards(), stored
    shards = connector.list_shards()
    configured = connector.shard_bytes
    wanted = SHARDS_PER_READER * max(1, readers)
    total = sum(s.size_bytes for s in shards)
    target = max(MIN_SHARD_BYTES, total // wanted)
    if len(shards) >= wanted or total <= 0 or target >= configured:
        return shards, configured
    connector.shard_bytes_override = target
    finer = connector.list_shards()
    log.info(
        "source: %d shard(s) of %.1f MB for %d reader(s) (%d at source.shard_size_mb)",
        len(finer), target / 2**20, readers, len(shards),
    )
    return finer, target


# --- what a run quarantined -----------------------------------------------------------------

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
                "size_bytes": self._sizes.get(state.shard_id),
                "documents": end.documents,
                "chunks": end.chunks,
                "tokens": end.tokens,
                "bad_records": quarantined,
                "trimmed_documents": end.trimmed_documents,
                "run_id": self.result.run_id,
                "generation": self.generation,
                "seconds": time.time() - self.started[state.shard_id] if state.shard_id in self.started else None,
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
