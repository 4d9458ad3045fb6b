"""The Ray runner: the local runner's stages on a Ray cluster, CPU stages as tasks, encoders as actors.

::

    driver                      Ray Data (streaming, backpressured)                          driver
    list shards ─▶ from_items ─▶ read_and_chunk   ─▶ EncoderActor pool          ─▶ iter_batches ─▶ ShardAssembler
    (pending,      (one block    (CPU tasks over     (one model each, 1 GPU      (one writer:     (sink commit,
     one row each)  per shard)    every CPU of the    each; packs its input by     rows in any      quarantine,
                                  cluster; chunk      token budget, encodes,       order)           completion record)
                                  rows + one end      passes end rows through)
                                  row per shard)

The stage functions are the local runner's: ``read_and_chunk`` (with a ``Chunker`` rebuilt from the
model's serialized tokenizer) in the CPU tasks, ``TokenBudgetPacker`` + ``Encoder`` in the actors,
``ShardAssembler`` on the driver — so both runners give the same rows for the same job.

Exactly once: Ray's retries are at-least-once (a read task re-run after a worker died, an actor task
retried on a restarted actor, a lost block rebuilt from lineage), so the same chunk can reach the
driver twice. The driver is the only writer and the ``ShardAssembler`` takes a chunk once (by id)
and a shard once (its completion record), so the output holds every row exactly once. Each encoder
call returns every chunk it was given (its packer is flushed per call), so an actor that dies loses
nothing Ray does not retry. A driver that dies loses only uncommitted shards; a rerun redoes them.

Memory: the dataset streams. Read tasks yield blocks of a few thousand chunks (``read_and_chunk``'s
blocks) as they go, blocks are capped at ``BLOCK_BYTES``, and Ray Data's streaming executor stops
launching tasks when an operator's output queue fills its object-store budget, so a 90 GB dump flows
through a bounded window. Encoded rows are consumed by the driver as they come.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedder.config import ConfigError, Job
from embedder.failpoints import failpoint
from embedder.records import BadRecord, Chunk, Shard
from embedder.runners.stages import (
    RunFailed,
    RunResult,
    ShardAssembler,
    ShardEnd,
    make_connector,
    read_and_chunk,
    resolve_job,
    sink_registry,
)

if TYPE_CHECKING:
    from embedder.chunking import Chunker

log = logging.getLogger("embedder")

KILL_ENCODER_ENV = "EMBEDDER_RAY_KILL_ENCODER"
"""Test hook: ``"<n>:<marker file>"`` makes one encoder actor exit (``os._exit``) at its ``n``-th call,
once per marker file (the actor that creates the file dies; restarted and other actors go on)."""

CALL_BUDGETS = 4
"""Token budgets' worth of chunks per encoder call: enough to keep several batches in flight."""
BLOCK_BYTES = 16 * 1024 * 1024
"""Largest block between stages (Ray Data's default of 128 MB would hold whole shards)."""
ENCODER_MAX_RESTARTS = 8
"""Restarts of one encoder actor (a dead process, a lost node) before the run fails."""
QUEUE_POLL_S = 0.2

CHUNK_ROWS = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string()),
        pa.field("chunk_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("title", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("metadata", pa.binary()),  # pickled passthrough fields (exact types), null when none
        pa.field("shard_end", pa.string()),  # JSON of the shard's ShardEnd on its one end row
    ]
)
"""Rows between the read stage and the encoders: one per chunk, plus one end row per shard."""


# --- where encoders run ---------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class EncoderPool:
    """How many encoder actors run and what each one holds.

    Attributes:
        size: Number of actors (each loads the model once).
        num_gpus: GPUs per actor (0: the model runs on CPU).
        num_cpus: CPUs per actor (its torch threads on CPU).
    """

    size: int
    num_gpus: float
    num_cpus: float

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0


def plan_encoder_pool(job: Job, cluster: dict[str, float]) -> EncoderPool:
    """Sizes the encoder pool from the job and the cluster's resources (``ray.cluster_resources()``).

    On GPUs: one actor per ``runner.gpus_per_encoder`` GPUs (default 1) of the cluster, or
    ``runner.encoders`` actors. On CPU (``model.device: cpu``, or ``auto`` on a cluster without
    GPUs): actors of up to 8 CPUs each, leaving a quarter of the CPUs to reading and tokenizing.

    Raises:
        ConfigError: ``model.device: cuda`` on a cluster without GPUs, or more encoders asked for
            than the cluster can place.
    """
    configured = getattr(job.runner, "encoders", "auto")
    gpus_per_encoder = float(getattr(job.runner, "gpus_per_encoder", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 1.0))
    device = job.model.device
    if device == "cuda" and gpus <= 0:
        raise ConfigError(
            "model.device is cuda but the Ray cluster has no GPUs: start the workers with GPUs "
            "(ray start --num-gpus N) or set model.device: cpu"
        )
    if device != "cpu" and gpus > 0:
        fit = int(gpus // gpus_per_encoder)
        if fit < 1:
            raise ConfigError(
                f"runner.gpus_per_encoder {gpus_per_encoder} is more than the cluster's {gpus:g} GPUs; lower it"
            )
        size = fit if configured == "auto" else int(configured)
        if size > fit:
            raise ConfigError(
                f"runner.encoders {size} needs {size * gpus_per_encoder:g} GPUs, the cluster has {gpus:g}; "
                f"use at most {fit} or 'auto'"
            )
        return EncoderPool(size=size, num_gpus=gpus_per_encoder, num_cpus=1.0)
    readers = max(1.0, cpus // 4)
    per_actor = float(min(8, max(1, int(cpus // 8))))
    fit = max(1, int((cpus - readers) // per_actor))
    size = fit if configured == "auto" else max(1, int(configured))
    return EncoderPool(size=size, num_gpus=0.0, num_cpus=per_actor)


# --- what the driver needs to know about the model ------------------------------------------


@dataclass(slots=True)
class EncoderFacts:
    """What the driver needs from the model, measured where the encoders run (device, dtype)."""

    tokenizer_json: str
    max_seq_length: int
    overhead: int
    token_budget: int
    dim: int
    provenance: dict[str, Any]


def probe_encoder(job_json: str) -> EncoderFacts:
    """Loads the model once, as an encoder actor would, and reports its facts (a Ray task)."""
    from embedder.models.encoder import Encoder

    encoder = Encoder.load(Job.model_validate_json(job_json).model)
    return EncoderFacts(
        tokenizer_json=encoder.tokenizer_json,
        max_seq_length=encoder.max_seq_length,
        overhead=encoder.layout.overhead,
        token_budget=encoder.token_budget,
        dim=encoder.dim,
        provenance=encoder.provenance(),
    )


# --- rows between stages --------------------------------------------------------------------


def chunks_to_rows(chunks: Sequence[Chunk], metadata_fields: Sequence[str]) -> pa.Table:
    """Chunk rows (``CHUNK_ROWS``): token ids as ``list<int32>``, only the passthrough metadata kept."""
    lengths = np.fromiter((len(c.token_ids) for c in chunks), np.int32, len(chunks))
    offsets = np.zeros(len(chunks) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([c.token_ids for c in chunks]).astype(np.int32, copy=False) if chunks else np.zeros(0, np.int32)

    def metadata(chunk: Chunk) -> bytes | None:
        kept = {k: chunk.metadata[k] for k in metadata_fields if k in chunk.metadata}
        return pickle.dumps(kept) if kept else None

    columns = [
        pa.array([c.shard_id for c in chunks], pa.string()),
        pa.array([c.doc_id for c in chunks], pa.string()),
        pa.array([c.chunk_index for c in chunks], pa.int32()),
        pa.array([c.text for c in chunks], pa.string()),
        pa.array([c.title for c in chunks], pa.string()),
        pa.array([c.content_hash for c in chunks], pa.string()),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())),
        pa.array([metadata(c) for c in chunks], pa.binary()),
        pa.nulls(len(chunks), pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=CHUNK_ROWS)


def end_to_rows(end: ShardEnd) -> pa.Table:
    """The one end row of a shard: its counts and bad records, as JSON."""
    row = {name: None for name in CHUNK_ROWS.names}
    row["shard_id"] = end.shard_id
    row["shard_end"] = json.dumps(asdict(end))
    return pa.Table.from_pylist([row], schema=CHUNK_ROWS)


def rows_to_chunks(rows: pa.Table) -> list[Chunk]:
    """Chunks back from chunk rows (end rows excluded by the caller)."""
    token_ids = rows.column("token_ids").combine_chunks()
    values = token_ids.values.to_numpy(zero_copy_only=False)
    offsets = token_ids.offsets.to_numpy()
    columns = {name: rows.column(name).to_pylist() for name in ("shard_id", "doc_id", "chunk_index", "text", "title", "content_hash", "metadata")}
    return [
        Chunk(
            doc_id=columns["doc_id"][i],
            chunk_index=columns["chunk_index"][i],
            text=columns["text"][i],
            token_ids=values[offsets[i] : offsets[i + 1]],
            content_hash=columns["content_hash"][i],
            shard_id=columns["shard_id"][i],
            title=columns["title"][i],
            metadata=pickle.loads(columns["metadata"][i]) if columns["metadata"][i] is not None else {},
        )
        for i in range(rows.num_rows)
    ]


def rows_to_end(raw: str) -> ShardEnd:
    data = json.loads(raw)
    data["bad_records"] = [BadRecord(**b) for b in data["bad_records"]]
    return ShardEnd(**data)


def _split_rows(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(chunk rows, end rows) of a block."""
    import pyarrow.compute as pc

    is_end = pc.is_valid(rows.column("shard_end"))
    return rows.filter(pc.invert(is_end)), rows.filter(is_end)


# --- the CPU stage: read + chunk ------------------------------------------------------------


@lru_cache(maxsize=4)
def _chunker(tokenizer_json: str, max_seq_length: int, overhead: int, chunking_json: str) -> Chunker:
    """One chunker per worker process and model (rebuilding a tokenizer costs ~0.1 s)."""
    import tokenizers

    from embedder.chunking import Chunker
    from embedder.config import ChunkingConfig

    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return Chunker.from_settings(tokenizer, max_seq_length, overhead, ChunkingConfig.model_validate_json(chunking_json))


def read_shard_rows(
    shards: pa.Table, job_json: str, tokenizer_json: str, max_seq_length: int, overhead: int
) -> Iterator[pa.Table]:
    """Ray Data CPU stage: ``read_and_chunk`` each shard of the block; yields chunk rows as they are
    made, then the shard's end row."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per task; before tokenizers starts
    job = Job.model_validate_json(job_json)
    chunker = _chunker(tokenizer_json, max_seq_length, overhead, job.chunking.model_dump_json())
    connector = make_connector(job)
    fields = job.source.metadata_fields
    for raw in shards.column("shard").to_pylist():
        shard: Shard = pickle.loads(raw)
        for item in read_and_chunk(connector, chunker, shard):
            yield end_to_rows(item) if isinstance(item, ShardEnd) else chunks_to_rows(item, fields)


# --- the GPU stage: the encoder actor -------------------------------------------------------


class EncoderActor:
    """Ray Data actor: holds one model; each call packs its chunk rows by token budget, encodes them
    and returns them with a ``vector`` column; end rows pass through (``vector`` null).

    A call returns every chunk it was given (the packer is flushed per call), so a retried call
    after an actor death redoes exactly the lost work. The first row of each output carries the
    call's encode time and the actor's id (``encode_seconds``, ``encoder``) for the run record.

    Args:
        job_json: The resolved job.
        num_cpus: CPUs Ray gave this actor (torch's threads on CPU).
        kill_hook: The ``KILL_ENCODER_ENV`` test hook, or None.
    """

    def __init__(self, job_json: str, num_cpus: float, kill_hook: str | None = None) -> None:
        import torch

        from embedder.models.encoder import Encoder

        torch.set_num_threads(max(1, int(num_cpus)))
        self.encoder = Encoder.load(Job.model_validate_json(job_json).model)
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.calls = 0
        self.kill_hook = kill_hook

    def __call__(self, rows: pa.Table) -> pa.Table:
        from embedder.packing import TokenBudgetPacker

        self.calls += 1
        self._maybe_die()
        chunk_rows, end_rows = _split_rows(rows)
        chunks = rows_to_chunks(chunk_rows)
        position = {c.id: i for i, c in enumerate(chunks)}
        encoder = self.encoder
        packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)
        order: list[int] = []
        vectors: list[np.ndarray] = []
        in_flight: list[tuple[Any, Any]] = []
        started = time.perf_counter()
        for batch in [*packer.add(chunks), *packer.flush()]:
            in_flight.append((batch, encoder.encode_async(batch)))  # next batch queued before the last is read
            if len(in_flight) > 2:
                done, handle = in_flight.pop(0)
                order.extend(position[c.id] for c in done.chunks)
                vectors.append(handle.result())
        for done, handle in in_flight:
            order.extend(position[c.id] for c in done.chunks)
            vectors.append(handle.result())
        seconds = time.perf_counter() - started
        dim = encoder.dim
        encoded = chunk_rows.take(pa.array(order, pa.int64())) if order else chunk_rows.slice(0, 0)
        flat = np.concatenate(vectors).reshape(-1) if vectors else np.zeros(0, np.float32)
        encoded = encoded.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
        ends = end_rows.append_column("vector", pa.nulls(end_rows.num_rows, pa.list_(pa.float32(), dim)))
        out = pa.concat_tables([encoded, ends])
        first_only = [True] + [False] * (out.num_rows - 1) if out.num_rows else []
        out = out.append_column("encode_seconds", pa.array([seconds if f else None for f in first_only], pa.float64()))
        return out.append_column("encoder", pa.array([self.actor_id if f else None for f in first_only], pa.string()))

    def _maybe_die(self) -> None:
        if not self.kill_hook:
            return
        count, _, marker = self.kill_hook.partition(":")
        if self.calls < int(count):
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        log.warning("test hook %s: encoder actor %s exits at call %d", KILL_ENCODER_ENV, self.actor_id, self.calls)
        os._exit(1)


# --- the driver -----------------------------------------------------------------------------


class _Stop(Exception):
    pass


class RayRunner:
    """Runs a job on a Ray cluster: the one at ``runner.address`` or ``RAY_ADDRESS``, the one this
    process is already connected to, or else a local one started for the run.

    Args:
        job: The job (``auto`` fields are resolved here).
        on_progress: Called on the driver with the running ``RunResult`` after each block of
            encoded rows and each commit (the CLI draws its progress bars from it).
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
        self.pool: EncoderPool | None = None
        self.encoders_seen: dict[str, float] = {}  # actor id → its encode seconds
        self._abort = threading.Event()
        self._drain = threading.Event()
        self._drain_deadline = float("inf")
        self._lease_lost = False

    def request_stop(self, reason: str = "stop requested") -> None:
        """Starts a drain: in-flight shards finish and commit within the grace period, then the run stops."""
        if not self._drain.is_set():
            log.warning("%s: finishing in-flight shards (up to %.0f s), then stopping", reason, self.job.runner.grace_period_s)
            self._drain_deadline = time.monotonic() + self.job.runner.grace_period_s
            self._drain.set()

    def _lost_lease(self) -> None:
        self._lease_lost = True
        self._abort.set()

    def run(self) -> RunResult:
        from embedder.checkpoint import Checkpoint
        from embedder.lease import Lease
        from embedder.schema import output_schema

        job = self.job
        result = RunResult(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], output=job.output.uri)
        result.model, result.sink, result.runner = job.model.name, job.output.sink, "ray"
        lease = Lease(job.output.uri, job.output.storage_options, job.runner.lease_ttl_s, on_lost=self._lost_lease)
        lease.acquire(force=self.force_unlock)
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        restore = self._install_signal_handlers()
        watcher = None
        started = time.perf_counter()
        connected_here = False
        try:
            if job.runner.spot_watch:
                from embedder.spot import SpotWatcher

                watcher = SpotWatcher(
                    job.runner.spot_url, lambda _: self.request_stop("spot interruption notice"), job.runner.spot_poll_s
                ).start()
            ray = _import_ray()
            connected_here = _connect(ray, job.runner.address)
            self.pool = plan_encoder_pool(job, ray.cluster_resources())
            log.info(
                "ray: %d encoder actor(s), %s each", self.pool.size,
                f"{self.pool.num_gpus:g} GPU" if self.pool.on_gpu else f"{self.pool.num_cpus:g} CPU",
            )
            shards = make_connector(job).list_shards()
            facts = self._probe(ray)
            chunker = _chunker(facts.tokenizer_json, facts.max_seq_length, facts.overhead, job.chunking.model_dump_json())
            provenance = {**facts.provenance, "chunking": chunker.settings()}
            schema = output_schema(facts.dim, job.source.metadata_fields, provenance)
            sink = sink_registry().SINKS.get(job.output.sink)(job.output, schema)
            sink.open()
            result.load_seconds = time.perf_counter() - started
            checkpoint.save_job(job.to_yaml())
            done = checkpoint.completed()
            pending = [s for s in shards if s.id not in done]
            result.shards_total = len(shards)
            result.shards_skipped = len(shards) - len(pending)
            checkpoint.write_run(result.to_dict())
            if pending and not self._drain.is_set():
                sink.abort_many([s.id for s in pending])
                self._run_pipeline(ray, pending, facts, sink, checkpoint, result)
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
            embedding_s = result.seconds - result.load_seconds
            result.tokens_per_second = result.tokens / embedding_s if embedding_s > 0 else 0.0
            result.ended_at = time.time()
            try:
                if result.shards_total or result.state != "failed":
                    checkpoint.write_run(result.to_dict())
            finally:
                lease.release()
                if connected_here:
                    import ray

                    ray.shutdown()  # also ends this job's actors and tasks on a shared cluster
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

    def _probe(self, ray: Any) -> EncoderFacts:
        """The model's facts from a one-off task placed like an encoder actor (same device and dtype).

        ``max_calls=1`` ends the task's worker afterwards, so it holds no GPU memory during the run.
        """
        pool = self.pool
        assert pool is not None
        task = ray.remote(num_gpus=pool.num_gpus, num_cpus=pool.num_cpus, max_calls=1, max_retries=2)(probe_encoder)
        return ray.get(task.remote(self.job.model_dump_json()))

    def _dataset(self, ray: Any, pending: Sequence[Shard], facts: EncoderFacts) -> Any:
        """The Ray Data pipeline: pending shards → chunk rows (CPU tasks) → encoded rows (actor pool)."""
        job, pool = self.job, self.pool
        assert pool is not None
        items = [{"shard": pickle.dumps(shard)} for shard in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ctx = ds.context  # this dataset's own copy of the DataContext
        ctx.target_max_block_size = BLOCK_BYTES
        ctx.enable_progress_bars = False  # the driver reports progress itself
        ctx.execution_options.preserve_order = False
        ctx.max_errored_blocks = 0
        workers = job.runner.workers
        ds = ds.map_batches(
            read_shard_rows,
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            fn_kwargs={
                "job_json": job.model_dump_json(),
                "tokenizer_json": facts.tokenizer_json,
                "max_seq_length": facts.max_seq_length,
                "overhead": facts.overhead,
            },
            num_cpus=1,
            concurrency=None if workers == "auto" else max(1, int(workers)),
        )
        max_chunk = max(1, facts.max_seq_length)
        rows_per_call = max(16, CALL_BUDGETS * facts.token_budget // max_chunk)
        return ds.map_batches(
            EncoderActor,
            batch_size=rows_per_call,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "job_json": job.model_dump_json(),
                "num_cpus": pool.num_cpus,
                "kill_hook": os.environ.get(KILL_ENCODER_ENV) or None,
            },
            concurrency=pool.size,
            num_gpus=pool.num_gpus,
            num_cpus=pool.num_cpus,
            max_restarts=ENCODER_MAX_RESTARTS,
            max_task_retries=ENCODER_MAX_RESTARTS,
        )

    def _run_pipeline(
        self, ray: Any, pending: list[Shard], facts: EncoderFacts, sink: Any, checkpoint: Any, result: RunResult
    ) -> None:
        dataset = self._dataset(ray, pending, facts)
        blocks: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        pull_done = threading.Event()

        def pull() -> None:
            """Ray Data output stream → ``blocks`` (a thread, so the driver can stop on time)."""
            stream = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
            try:
                for rows in stream:
                    while True:
                        if self._abort.is_set():
                            raise _Stop
                        try:
                            blocks.put(rows, timeout=QUEUE_POLL_S)
                            break
                        except queue.Full:
                            continue
            except _Stop:
                pass
            except BaseException as err:
                failure.append(err)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    try:
                        close()  # stops the streaming executor when the run ends early
                    except Exception:
                        log.debug("closing the Ray Data stream failed", exc_info=True)
                pull_done.set()

        def on_commit(_result: RunResult) -> None:
            if self.on_progress:
                self.on_progress(result, 0)

        assembler = ShardAssembler(pending, sink, checkpoint, result, self._abort, on_commit=on_commit)
        seen: set[str] = set()  # shards with rows received
        draining: set[str] | None = None  # in-flight shards when the drain began
        puller = threading.Thread(target=pull, name="embedder-ray-pull", daemon=True)
        puller.start()
        try:
            while True:
                if self._abort.is_set():
                    raise RunFailed("stopped: " + ("lease lost" if self._lease_lost else "aborted"))
                if self._drain.is_set():
                    unfinished = set(assembler.unfinished)
                    if draining is None:
                        draining = seen & unfinished
                    if not draining & unfinished:
                        break  # every shard in flight at the drain has committed
                    if time.monotonic() > self._drain_deadline:
                        log.warning(
                            "grace period over: abandoning %d in-flight shard(s); a rerun redoes them",
                            len(draining & unfinished),
                        )
                        break
                try:
                    rows = blocks.get(timeout=QUEUE_POLL_S)
                except queue.Empty:
                    if pull_done.is_set() and blocks.empty():
                        if failure:
                            raise RunFailed(f"the Ray pipeline failed: {failure[0]}") from failure[0]
                        break
                    continue
                self._take(rows, assembler, seen, result)
            if assembler.unfinished and not self._drain.is_set():
                raise RunFailed(f"pipeline ended with {len(assembler.unfinished)} shard(s) unfinished")
        finally:
            self._abort.set()
            result.unfinished_shards = sorted(assembler.unfinished)
            assembler.discard_all()
            puller.join(timeout=5)
            if self.encoders_seen:
                log.info(
                    "ray: %d encoder actor(s) encoded for %s s",
                    len(self.encoders_seen), ", ".join(f"{s:.1f}" for s in self.encoders_seen.values()),
                )

    def _take(self, rows: pa.Table, assembler: ShardAssembler, seen: set[str], result: RunResult) -> None:
        """Feeds one block of encoded rows (and end rows) to the assembler."""
        for actor, seconds in zip(rows.column("encoder").to_pylist(), rows.column("encode_seconds").to_pylist()):
            if actor is not None:
                self.encoders_seen[actor] = self.encoders_seen.get(actor, 0.0) + (seconds or 0.0)
                result.encode_seconds += seconds or 0.0
        chunk_rows, end_rows = _split_rows(rows)
        if chunk_rows.num_rows:
            chunks = rows_to_chunks(chunk_rows)
            seen.update(c.shard_id for c in chunks)
            vectors = chunk_rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            failpoint("mid_encode")
            assembler.add_vectors(chunks, vectors.reshape(len(chunks), -1))
            if self.on_progress:
                self.on_progress(result, len(chunks))
        for raw in end_rows.column("shard_end").to_pylist():
            end = rows_to_end(raw)
            seen.add(end.shard_id)
            failpoint("after_read")
            assembler.end_shard(end)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ConfigError("runner: ray needs Ray Data: pip install 'embedder[ray]'") from err
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Connects to the cluster; True when this call did (and the run should disconnect after).

    An already connected process (a notebook, a Ray job's entrypoint, the tests) keeps its
    connection; otherwise ``address`` or ``RAY_ADDRESS``, or else a local cluster of this machine.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = False
        log.info("ray: no runner.address or RAY_ADDRESS; starting a local Ray cluster on this machine")
    ray.init(address=address, **kwargs)
    return True


def run_ray(
    job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
) -> RunResult:
    """Runs ``job`` on Ray (see ``RayRunner``)."""
    return RayRunner(job, on_progress=on_progress, force_unlock=force_unlock).run()


__all__ = ["EncoderActor", "EncoderPool", "RayRunner", "plan_encoder_pool", "run_ray"]
