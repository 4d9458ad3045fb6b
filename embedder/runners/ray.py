"""The Ray runner: the local runner's stages on a Ray cluster, CPU stages as tasks, encoders as actors.

::

    driver              Ray Data read stage              driver dispatcher      EncoderActors          driver
    pending shards ──▶ read_and_chunk ──────────────▶ block refs ─────────▶ (one model per actor, ──▶ ShardAssembler
    (one row, one      (CPU tasks on every CPU of      (cut into calls;      1 GPU each: packs by      (sink commit,
     block each)        the cluster: chunk rows,        ready actors only,    token budget, encodes;    quarantine,
                        then one end row per shard)     2 calls each)         end rows pass through)    completion record)

Start-up. The encoder actors are asked for as soon as the driver is connected (``setup``), so each
loads the model while the driver lists shards and opens the output; the model's facts come from
the first actor loaded (the model is loaded once per actor and nowhere else, never on the driver);
blocks go to the actors that are ready, the first call of each being ``FIRST_CALL_ROWS`` rows.
With ``runner.keep_encoders_s`` the actors outlive the run (detached, named by the model settings)
and the next run of the same settings takes them over loaded.

The stage functions are the local runner's: ``read_and_chunk`` with a ``Chunker`` rebuilt from the
model's serialized tokenizer in the CPU tasks, ``TokenBudgetPacker`` + ``Encoder`` in the actors,
``ShardAssembler`` on the driver; the run around them (lease, drain on SIGTERM, spot notice, canary
check, run record) is ``LocalRunner``'s. So both runners write the same rows for the same job.

Exactly once. Ray's own retries are at-least-once: a read task re-run after its worker died, an
actor task retried on a restarted actor, a lost block rebuilt from lineage can all deliver a chunk
twice. The driver is the only writer, and its ``ShardAssembler`` takes a chunk once (by id) and
commits a shard once (sink commit, then completion record), so the output holds every row exactly
once. An encoder call returns every chunk it was given (its packer is flushed per call), so a call
lost with its actor is redone whole by Ray's retry. A driver that dies loses only the shards it had
not committed: the next run aborts their leftovers and redoes them.

Memory. Shards enter one per block; a read task yields blocks of at most a few thousand chunks
(``read_and_chunk``'s blocks) as it reads, blocks are capped at ``BLOCK_BYTES``, the streaming
executor launches no new read task while its output waits unconsumed, and the dispatcher takes
read blocks only while fewer rows wait than the actors' calls in flight can hold. A
90 GB dump streams through a bounded window, the way the local runner's bounded queues do.

Incremental passes. The driver puts what the output holds (``ExistingChunks``, compact hash arrays)
in the object store once; each read task filters its shards' chunks with its own ``ChangeFilter``
and ends each shard with its change record, so unchanged chunks never reach an encoder actor.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedder.config import ConfigError, Job
from embedder.execution.events import IDLE, EncodedBlock, EncoderStats, Event, ShardFinished, ShardStarted
from embedder.execution.job import import_plugins, plugin_modules
from embedder.execution.plan import RunPlan
from embedder.execution.result import RunFailed, RunResult
from embedder.execution.skeleton import Run
from embedder.pipeline.change import filter_changes
from embedder.pipeline.chunk import chunker_for, tokenizer_from_json
from embedder.pipeline.encode import encode_stream
from embedder.pipeline.read import make_connector, read_and_chunk
from embedder.records import Chunk, Shard, ShardEnd
from embedder.runners.base import Scheduler

if TYPE_CHECKING:
    import tokenizers

    from embedder.incremental import ExistingChunks
    from embedder.packing import SequenceLayout

log = logging.getLogger("embedder")

KILL_ENCODER_ENV = "EMBEDDER_RAY_KILL_ENCODER"
"""Test hook, read on the driver: ``"<n>:<marker file>"`` makes the first encoder actor to reach its
``n``-th call create the marker file and exit (``os._exit``); the file keeps it to one death."""

CALL_BUDGETS = 4
"""Token budgets' worth of chunks per encoder call: several batches, so the device stays busy."""
BLOCK_BYTES = 16 * 1024 * 1024
"""Largest block between stages (Ray Data's default, 128 MB, would hold whole shards)."""
ENCODER_MAX_RESTARTS = 8
"""Restarts of one encoder actor (its process or node died) and retries of its call before the run fails."""
QUEUE_POLL_S = 0.2
DISPATCH_POLL_S = 0.02
"""How often the dispatcher looks for new read blocks while encoder calls are in flight."""
FIRST_CALL_ROWS = 16
"""Rows of each encoder actor's first call: the run's first vectors come back after one small batch."""
CALLS_PER_ENCODER = 2
"""Calls in flight per encoder actor: one encoding, one waiting, so that the actor never idles."""
KEPT_NAMESPACE = "embedder"
"""Ray namespace of the encoder actors kept between runs (``runner.keep_encoders_s``)."""

CHUNK_ROWS = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string()),
        pa.field("chunk_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("title", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("metadata", pa.binary()),  # the passthrough fields, pickled (exact types); null when none
        pa.field("shard_end", pa.binary()),  # the shard's ShardEnd, pickled, on its one end row
    ]
)
"""Rows from the read stage to the encoders: one per chunk, and one end row per shard."""


# --- where encoders run ---------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class EncoderPool:
    """How many encoder actors run and what each one holds.

    Attributes:
        size: Number of actors (each loads the model once).
        num_gpus: GPUs per actor (0: the model runs on CPU).
        num_cpus: CPUs per actor (its torch threads when on CPU).
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
            than the cluster's GPUs can hold.
    """
    configured = job.runner.encoders
    gpus_per_encoder = float(job.runner.gpus_per_encoder)
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 1.0))
    if job.model.device == "cuda" and gpus <= 0:
        raise ConfigError(
            "model.device is cuda but the Ray cluster has no GPUs: start its workers with GPUs "
            "(ray start --num-gpus N) or set model.device: cpu"
        )
    if job.model.device != "cpu" and gpus > 0:
        fit = int(gpus // gpus_per_encoder)
        if fit < 1:
            raise ConfigError(f"runner.gpus_per_encoder {gpus_per_encoder:g} is more than the cluster's {gpus:g} GPUs")
        size = fit if configured == "auto" else int(configured)
        if size > fit:
            raise ConfigError(
                f"runner.encoders {size} needs {size * gpus_per_encoder:g} GPUs, the cluster has {gpus:g}; "
                f"use at most {fit} or 'auto'"
            )
        # A GPU actor mostly waits on its device: it reserves at most one CPU, and less on a
        # cluster with few CPUs, so that at least one CPU is always left to read and tokenize
        # (actors holding every CPU would leave the read tasks unscheduled: a silent hang).
        num_cpus = min(1.0, max(0.0, (cpus - 1.0) / size))
        return EncoderPool(size=size, num_gpus=gpus_per_encoder, num_cpus=num_cpus)
    readers = max(1.0, cpus // 4)
    per_actor = float(min(8, max(1, int(cpus // 8))))
    fit = max(1, int((cpus - readers) // per_actor))
    size = fit if configured == "auto" else max(1, int(configured))
    if size * per_actor > cpus - 1:
        most = max(0, int((cpus - 1) // per_actor))
        raise ConfigError(
            f"runner.encoders {size} CPU actors of {per_actor:g} CPUs take all {cpus:g} CPUs of the Ray cluster "
            f"and leave none to read and tokenize; use at most {most}, or add CPUs to the cluster"
            if most
            else f"the Ray cluster has {cpus:g} CPU(s): CPU encoding there needs at least 2 (one to read, one to "
            "encode); add CPUs or use runner.kind: local"
        )
    return EncoderPool(size=size, num_gpus=0.0, num_cpus=per_actor)


def read_tasks(job: Job, cluster: dict[str, float], pool: EncoderPool | None) -> int:
    """Read tasks a run plans its shards for: ``runner.workers``, or the cluster's CPUs the
    encoder actors leave (at least one)."""
    if job.runner.workers != "auto":
        return max(1, int(job.runner.workers))
    reserved = pool.size * pool.num_cpus if pool is not None else 0.0
    return max(1, int(float(cluster.get("CPU", 1.0)) - reserved))


def _this_machine() -> dict[str, float]:
    """The resources a local Ray cluster started here would have (Ray counts CPUs and GPUs so)."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):  # a Ray without the helper: this process's CPUs
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import torch

    return {"CPU": cpus, "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


# --- what the driver knows of the model -----------------------------------------------------


@dataclass(slots=True)
class EncoderFacts:
    """The encoder as the driver sees it, measured where the encoder actors run (their device and
    dtype decide the provenance), without the driver holding the model or a GPU.

    It answers what the run asks of an ``Encoder`` (``Chunker.for_encoder``, the output schema, the
    canary check): ``tokenizer``, ``max_seq_length``, ``layout``, ``dim``, ``provenance()``,
    ``source``, ``document_prompt``.
    """

    tokenizer_json: str
    max_seq_length: int
    layout: SequenceLayout
    token_budget: int
    dim: int
    source: str
    document_prompt: str
    facts: dict[str, Any]

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizer_from_json(self.tokenizer_json)

    def provenance(self) -> dict[str, Any]:
        return dict(self.facts)


def encoder_facts(encoder: Any) -> EncoderFacts:
    """What the driver needs to know of a loaded ``Encoder`` (measured where it runs)."""
    return EncoderFacts(
        tokenizer_json=encoder.tokenizer_json,
        max_seq_length=encoder.max_seq_length,
        layout=encoder.layout,
        token_budget=encoder.token_budget,
        dim=encoder.dim,
        source=encoder.source,
        document_prompt=encoder.document_prompt,
        facts=encoder.provenance(),
    )


# --- rows between stages --------------------------------------------------------------------


def chunks_to_rows(chunks: Sequence[Chunk], metadata_fields: Sequence[str]) -> pa.Table:
    """Chunk rows (``CHUNK_ROWS``); of the metadata only the job's passthrough fields travel."""
    lengths = np.fromiter((len(c.token_ids) for c in chunks), np.int64, len(chunks))
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
        pa.nulls(len(chunks), pa.binary()),
    ]
    return pa.Table.from_arrays(columns, schema=CHUNK_ROWS)


def end_to_rows(end: ShardEnd) -> pa.Table:
    """The end row of a shard: its counts and bad records."""
    row: dict[str, Any] = dict.fromkeys(CHUNK_ROWS.names)
    row["shard_id"] = end.shard_id
    row["shard_end"] = pickle.dumps(end)
    return pa.Table.from_pylist([row], schema=CHUNK_ROWS)


def rows_to_chunks(rows: pa.Table) -> list[Chunk]:
    """The chunks of chunk rows (no end rows); token ids are views of the block's buffer."""
    token_ids = rows.column("token_ids").combine_chunks()
    values = token_ids.values.to_numpy(zero_copy_only=False)
    offsets = token_ids.offsets.to_numpy()
    names = ("shard_id", "doc_id", "chunk_index", "text", "title", "content_hash", "metadata")
    cols = {name: rows.column(name).to_pylist() for name in names}
    return [
        Chunk(
            doc_id=cols["doc_id"][i],
            chunk_index=cols["chunk_index"][i],
            text=cols["text"][i],
            token_ids=values[offsets[i] : offsets[i + 1]],
            content_hash=cols["content_hash"][i],
            shard_id=cols["shard_id"][i],
            title=cols["title"][i],
            metadata=pickle.loads(cols["metadata"][i]) if cols["metadata"][i] is not None else {},
        )
        for i in range(rows.num_rows)
    ]


def partition_rows(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A block's chunk rows and its end rows."""
    import pyarrow.compute as pc

    is_end = pc.is_valid(rows.column("shard_end"))
    return rows.filter(pc.invert(is_end)), rows.filter(is_end)


def rows_to_ends(end_rows: pa.Table) -> list[ShardEnd]:
    return [pickle.loads(raw) for raw in end_rows.column("shard_end").to_pylist()]


# --- the CPU stage: read + chunk ------------------------------------------------------------


def read_shard_rows(
    shards: pa.Table,
    job_json: str,
    tokenizer_json: str,
    max_seq_length: int,
    overhead: int,
    existing: tuple[Any, ...] = (),
    plugins: tuple[str, ...] = (),
) -> Iterator[pa.Table]:
    """Ray Data CPU stage: ``read_and_chunk`` for each shard of the block, yielding chunk rows as
    they are made and the shard's end row last.

    Incremental passes: ``existing`` holds the object ref of the output's ``ExistingChunks``
    (wrapped in a tuple, so Ray hands the ref over unresolved). The call's own ``ChangeFilter``
    drops unchanged chunks before they become rows and sets each ``ShardEnd``'s ``chunks`` and
    ``changes`` as the local runner's feeder does: a call reads whole shards, so its filter sees
    every chunk of them. The connector skips documents by version (``known_versions``) as locally.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a task has one CPU
    import_plugins(plugins)  # connectors the user's own modules register
    yield from shard_rows(shards, job_json, tokenizer_json, max_seq_length, overhead, existing)


def shard_rows(
    shards: pa.Table, job_json: str, tokenizer_json: str, max_seq_length: int, overhead: int, existing: tuple[Any, ...]
) -> Iterator[pa.Table]:
    """``read_shard_rows`` without the task's set-up (the driver reads its first shard with it)."""
    from embedder.incremental import ChangeFilter

    job = Job.model_validate_json(job_json)
    chunker = chunker_for(tokenizer_json, max_seq_length, overhead, job.chunking.model_dump_json())
    connector = make_connector(job)
    change_filter = None
    if existing:
        import ray

        # Zero-copy: the arrays are read-only views of the node's object store, one copy per node.
        held: ExistingChunks = ray.get(existing[0])
        change_filter = ChangeFilter(held)
        connector.known_versions = held.known_versions()
    fields = job.source.metadata_fields
    for raw in shards.column("shard").to_pylist():
        shard: Shard = pickle.loads(raw)
        for item in filter_changes(read_and_chunk(connector, chunker, shard), change_filter):
            yield end_to_rows(item) if isinstance(item, ShardEnd) else chunks_to_rows(item, fields)


# --- the device stage: the encoder actor ----------------------------------------------------


class EncoderActor:
    """Ray actor holding one model. Each call packs its chunk rows by token budget (the local
    runner's ``TokenBudgetPacker``), encodes them with two batches in flight, and returns them with a
    ``vector`` column; end rows pass through with a null vector.

    A call returns every chunk it was given, so a call retried after the actor died redoes exactly
    the lost work. The first row of each output carries the call's encode time and the actor's id
    (``encode_seconds``, ``encoder``) for the run record.

    The driver asks the first actor that has loaded the model for the run's ``EncoderFacts``
    (``facts``): the model is loaded once per actor and nowhere else. A model that fails to load is
    kept as the error ``facts`` raises (with its own type, e.g. ``ModelError``), not as a dead actor
    that Ray would restart.

    Args:
        job_json: The resolved job.
        num_cpus: CPUs Ray gave this actor (torch's threads on CPU).
        kill_hook: The ``KILL_ENCODER_ENV`` test hook, or None.
    """

    def __init__(self, job_json: str, num_cpus: float, kill_hook: str | None = None, keep_s: float = 0.0) -> None:
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.calls = 0
        self.kill_hook = kill_hook
        self.load_error: Exception | None = None
        self.busy, self.last_used = False, time.monotonic()
        if keep_s > 0:
            threading.Thread(target=self._end_when_idle, args=(keep_s,), name="embedder-keep", daemon=True).start()
        try:
            import torch

            from embedder.models.encoder import Encoder

            torch.set_num_threads(max(1, int(num_cpus)))
            job = Job.model_validate_json(job_json)
            self.encoder = Encoder.load(job.model, fidelity_min_cosine=job.validation.min_cosine)
        except Exception as err:  # reported by facts(), which the driver waits on
            self.load_error = err

    def facts(self) -> tuple[EncoderFacts, str]:
        """The encoder's facts and this actor's id, once the model is loaded."""
        self.last_used = time.monotonic()
        if self.load_error is not None:
            raise self.load_error
        return encoder_facts(self.encoder), self.actor_id

    def encode(self, spans: Sequence[tuple[int, int]], *blocks: pa.Table) -> pa.Table:
        """Encodes ``blocks[i]``'s rows ``spans[i]`` (start, count): the driver cuts read blocks into
        calls of any size without copying them (Ray hands each block over from the object store)."""
        self.calls += 1
        self._maybe_die()
        if self.load_error is not None:
            raise self.load_error
        self.busy = True
        try:
            return self._encode(pa.concat_tables([block.slice(start, count) for block, (start, count) in zip(blocks, spans)]))
        finally:
            self.busy, self.last_used = False, time.monotonic()

    def _encode(self, rows: pa.Table) -> pa.Table:
        from embedder.packing import TokenBudgetPacker

        chunk_rows, ends = partition_rows(rows)
        chunks = rows_to_chunks(chunk_rows)
        encoder = self.encoder
        packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)  # per call: follows OOM back-off
        position = {c.id: i for i, c in enumerate(chunks)}
        order: list[int] = []
        vectors: list[np.ndarray] = []
        started = time.perf_counter()
        # lazily packed: the device starts on the first batch while the rest are packed
        for batch, batch_vectors in encode_stream(encoder, itertools.chain(packer.add(chunks), packer.flush())):
            order.extend(position[c.id] for c in batch.chunks)
            vectors.append(batch_vectors)
        seconds = time.perf_counter() - started

        dim = encoder.dim
        vector_type = pa.list_(pa.float32(), dim)
        flat = np.concatenate(vectors).reshape(-1) if vectors else np.zeros(0, np.float32)
        encoded = chunk_rows.take(pa.array(order, pa.int64()))
        encoded = encoded.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
        ends = ends.append_column("vector", pa.nulls(ends.num_rows, vector_type))
        out = pa.concat_tables([encoded, ends])
        first = [True] + [False] * (out.num_rows - 1) if out.num_rows else []
        out = out.append_column("encode_seconds", pa.array([seconds if f else None for f in first], pa.float64()))
        return out.append_column("encoder", pa.array([self.actor_id if f else None for f in first], pa.string()))

    def _end_when_idle(self, keep_s: float) -> None:
        """A kept actor (``runner.keep_encoders_s``) ends itself once no call came for ``keep_s``."""
        import ray

        while self.busy or time.monotonic() - self.last_used < keep_s:
            time.sleep(min(1.0, keep_s))
        log.info("encoder actor %s: idle for %.0f s, ending", self.actor_id, keep_s)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

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


# --- the encoder actors and what feeds them --------------------------------------------------


class EncoderActors:
    """The run's encoder actors, asked for as soon as the driver is connected: each loads the model
    while the driver lists shards and opens the output, and the first one loaded tells the run the
    model's facts. Blocks go to actors as they become ready (none waits for the others).

    Actors are restarted by Ray when their process or node dies (``ENCODER_MAX_RESTARTS``), and a
    call lost with its actor is retried on the restarted one, as Ray Data's actor pool did.
    """

    def __init__(self, ray: Any, job: Job, pool: EncoderPool, keep_s: float = 0.0) -> None:
        self.ray, self.keep_s = ray, keep_s
        remote = ray.remote(EncoderActor)
        options: dict[str, Any] = {
            "num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus,
            "max_restarts": ENCODER_MAX_RESTARTS, "max_task_retries": ENCODER_MAX_RESTARTS,
        }
        args = (job.model_dump_json(), pool.num_cpus, os.environ.get(KILL_ENCODER_ENV) or None, keep_s)
        key = kept_actor_key(job, pool) if keep_s > 0 else ""

        def start(i: int) -> Any:
            if not key:
                return remote.options(**options).remote(*args)
            # a kept actor of an earlier run of the same settings is taken over, not started
            return remote.options(**options, name=f"{key}-{i}", namespace=KEPT_NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(*args)

        self._start = start
        self._restarted: set[int] = set()
        self.actors = [start(i) for i in range(pool.size)]
        self._loading = {actor.facts.remote(): i for i, actor in enumerate(self.actors)}
        self.ready: list[int] = []  # indices of actors that hold the model, in the order they loaded
        self.first: tuple[EncoderFacts, str] | None = None

    def wait_first(self) -> tuple[EncoderFacts, str]:
        """Blocks until one actor holds the model; its facts and id (raises the load's error)."""
        while self.first is None:
            self.poll(timeout=None)
        return self.first

    def poll(self, timeout: float | None = 0.0) -> None:
        """Marks the actors that finished loading (waits up to ``timeout`` for one, None: forever)."""
        if not self._loading:
            return
        done, _ = self.ray.wait(list(self._loading), num_returns=1, timeout=timeout)
        if done:  # the others that are done too, without waiting
            done, _ = self.ray.wait(list(self._loading), num_returns=len(self._loading), timeout=0)
        for ref in done:
            index = self._loading.pop(ref)
            try:
                facts = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                if not self.keep_s or index in self._restarted:
                    raise
                # a kept actor that ended itself (idle) just as this run took it over: start it anew
                self._restarted.add(index)
                self.actors[index] = self._start(index)
                self._loading[self.actors[index].facts.remote()] = index
                continue
            self.ready.append(index)
            if self.first is None:
                self.first = facts

    @property
    def loading(self) -> list[Any]:
        return list(self._loading)

    def kill(self) -> None:
        """Ends the actors, except kept ones (they end themselves once idle for ``keep_s``)."""
        if self.keep_s > 0:
            self.actors = []
            return
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("killing an encoder actor failed", exc_info=True)
        self.actors = []


def kept_actor_key(job: Job, pool: EncoderPool) -> str:
    """The name prefix of kept encoder actors: the same for runs whose actors would load the same
    model the same way (embedder version, model settings, fidelity bound, resources per actor)."""
    import hashlib
    import json

    from embedder import __version__

    settings = [__version__, job.model.model_dump(mode="json"), job.validation.min_cosine, pool.num_gpus, pool.num_cpus]
    return "embedder-encoder-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(slots=True)
class _Piece:
    """Rows of a read block not yet sent to an encoder actor."""

    ref: Any
    start: int
    rows: int


def _take_rows(waiting: collections.deque[_Piece], limit: int) -> tuple[list[tuple[int, int]], list[Any]]:
    """Up to ``limit`` rows from the front of ``waiting`` (a piece is cut where the limit falls)."""
    spans: list[tuple[int, int]] = []
    refs: list[Any] = []
    taken = 0
    while waiting and taken < limit:
        piece = waiting[0]
        count = min(piece.rows, limit - taken)
        spans.append((piece.start, count))
        refs.append(piece.ref)
        taken += count
        if count == piece.rows:
            waiting.popleft()
        else:
            piece.start, piece.rows = piece.start + count, piece.rows - count
    return spans, refs


class _Dispatcher:
    """Sends read blocks to the encoder actors and hands their encoded rows on (the puller thread).

    Each ready actor has up to ``CALLS_PER_ENCODER`` calls in flight; its first call holds at most
    ``FIRST_CALL_ROWS`` rows (the first vectors come back after one small batch), the next ones
    ``rows_per_call``. Calls take rows from the blocks waiting, so while the actors are busy blocks
    pile up into full calls, and while they idle a call leaves with what there is.
    """

    def __init__(self, actors: EncoderActors, rows_per_call: int, pieces: queue.Queue, fed_all: threading.Event,
                 out: Callable[[pa.Table], bool]) -> None:
        self.actors, self.rows_per_call, self.pieces, self.fed_all, self.out = actors, rows_per_call, pieces, fed_all, out
        self.waiting: collections.deque[_Piece] = collections.deque()
        self.in_flight: dict[Any, int] = {}
        self.load = [0] * len(actors.actors)
        self.calls = [0] * len(actors.actors)

    def run(self) -> None:
        ray = self.actors.ray
        while True:
            self.actors.poll()
            self._take_pieces()
            self._send()
            if not self.in_flight and not self.waiting and self.fed_all.is_set() and self.pieces.empty():
                return
            wait_on = list(self.in_flight) + (self.actors.loading if self.waiting else [])
            if not wait_on:
                self._take_pieces(timeout=QUEUE_POLL_S)
                continue
            done, _ = ray.wait(wait_on, num_returns=1, timeout=DISPATCH_POLL_S)
            for ref in done:
                if ref in self.in_flight:
                    self.load[self.in_flight.pop(ref)] -= 1
                    if not self.out(ray.get(ref)):
                        return

    def _take_pieces(self, timeout: float | None = None) -> None:
        """Moves read blocks from the feeder's queue while fewer rows wait than the actors can take."""
        room = self.rows_per_call * CALLS_PER_ENCODER * len(self.load)
        while sum(p.rows for p in self.waiting) < room:
            try:
                piece = self.pieces.get(timeout=timeout) if timeout else self.pieces.get_nowait()
            except queue.Empty:
                return
            self.waiting.append(piece)
            timeout = None

    def _send(self) -> None:
        for index in sorted(self.actors.ready, key=lambda i: self.load[i]):
            while self.waiting and self.load[index] < CALLS_PER_ENCODER:
                limit = FIRST_CALL_ROWS if self.calls[index] == 0 else self.rows_per_call
                spans, refs = _take_rows(self.waiting, limit)
                call = self.actors.actors[index].encode.remote(spans, *refs)
                self.in_flight[call] = index
                self.load[index] += 1
                self.calls[index] += 1


# --- the driver -----------------------------------------------------------------------------


class RayScheduler(Scheduler):
    """Runs the stages on a Ray cluster: the one this process is connected to, else the one at
    ``runner.address`` or ``RAY_ADDRESS``, else a local one started for the run (and stopped after).

    The driver (the run skeleton) holds the lease, lists shards, writes and commits (one writer); Ray
    runs reading, chunking and encoding. A drain lets the shards in flight finish and commit (the
    skeleton's one drain policy); the stream is closed when it ends, which stops the executor.
    """

    name = "ray"

    def __init__(self, job: Job, control: Any) -> None:
        super().__init__(job, control)
        self._connected_here = False
        self.pool: EncoderPool | None = None
        self.actors: EncoderActors | None = None
        self.facts_from: str | None = None  # the encoder actor whose facts the run uses
        self.encoders_seen: dict[str, float] = {}  # encoder actor id → its encode seconds

    def setup(self) -> None:
        """Connects, sizes the pool and asks for the encoder actors: they load the model while the
        skeleton lists shards and opens the output."""
        ray = _import_ray()
        starts_cluster = not ray.is_initialized() and _local(_cluster_address(self.job.runner.address))
        self._connected_here = _connect(ray, self.job.runner.address)
        self.pool = plan_encoder_pool(self.job, ray.cluster_resources())
        keep_s = 0.0 if starts_cluster else self.job.runner.keep_encoders_s  # a cluster of the run's own ends with it
        self.actors = EncoderActors(ray, self.job, self.pool, keep_s)
        self.marks["encoders_started"] = time.perf_counter()

    def teardown(self) -> None:
        if self.actors is not None:
            self.actors.kill()
        if self._connected_here:
            import ray

            ray.shutdown()  # on a shared cluster this also ends the run's actors and tasks

    def load_encoder(self) -> EncoderFacts:
        """The model's facts, from the first encoder actor that has loaded it (the others go on loading)."""
        pool, actors = self.pool, self.actors
        assert pool is not None and actors is not None
        facts, self.facts_from = actors.wait_first()
        self.marks["encoder_ready"] = time.perf_counter()
        log.info(
            "ray: %d encoder actor(s) of %s each; model %s, %s, token budget %d",
            pool.size, f"{pool.num_gpus:g} GPU" if pool.on_gpu else f"{pool.num_cpus:g} CPU",
            self.job.model.name, facts.facts.get("dtype"), facts.token_budget,
        )
        return facts

    def read_parallelism(self) -> int:
        """Read tasks the cluster runs at once: ``runner.workers``, or its CPUs the encoders leave."""
        import ray

        return read_tasks(self.job, ray.cluster_resources(), self.pool)

    def planned_read_parallelism(self) -> int:
        """``read_parallelism`` for ``--dry-run``, from the cluster the run would use: the one this
        process is connected to, else the one at ``runner.address`` or ``RAY_ADDRESS`` (connected to
        for the question, then left), else this machine (the local cluster a run would start)."""
        if self.job.runner.workers != "auto":
            return read_tasks(self.job, {}, None)
        ray = _import_ray()
        if ray.is_initialized():
            cluster = ray.cluster_resources()
        elif not _local(_cluster_address(self.job.runner.address)):
            _connect(ray, self.job.runner.address)
            try:
                cluster = ray.cluster_resources()
            finally:
                ray.shutdown()
        else:
            cluster = _this_machine()
        return read_tasks(self.job, cluster, plan_encoder_pool(self.job, cluster))

    def billed_gpus(self) -> float:
        """Every encoder actor's GPUs are billed."""
        pool = self.pool
        return pool.size * pool.num_gpus if pool is not None and pool.on_gpu else 1.0

    def stats(self) -> EncoderStats:
        if self.encoders_seen:
            log.info(
                "ray: %d encoder actor(s) encoded for %s s",
                len(self.encoders_seen), ", ".join(f"{s:.1f}" for s in self.encoders_seen.values()),
            )
        return EncoderStats(
            encoders=self.pool.size if self.pool is not None else len(self.encoders_seen),
            encode_seconds=sum(self.encoders_seen.values()),
        )

    def _dataset(self, ray: Any, pending: Sequence[Shard], encoder: EncoderFacts, existing: Any = None) -> Any:
        """The Ray Data read stage: pending shards → chunk rows (CPU tasks); the driver sends its
        blocks to the encoder actors.

        ``existing``: incremental passes, the object ref of the output's ``ExistingChunks``.
        """
        from ray.data import TaskPoolStrategy

        job = self.job
        items = [{"shard": pickle.dumps(shard)} for shard in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ctx = ds.context  # this dataset's own DataContext
        ctx.target_max_block_size = BLOCK_BYTES
        ctx.enable_progress_bars = False  # the driver reports progress itself
        ctx.execution_options.preserve_order = False
        ctx.max_errored_blocks = 0  # a shard that cannot be read fails the run (a rerun resumes)
        workers = job.runner.workers
        return ds.map_batches(
            read_shard_rows,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={
                "job_json": job.model_dump_json(),
                "tokenizer_json": encoder.tokenizer_json,
                "max_seq_length": encoder.max_seq_length,
                "overhead": encoder.layout.overhead,
                "existing": () if existing is None else (existing,),
                "plugins": tuple(plugin_modules(job)),
            },
            num_cpus=1,
            compute=None if workers == "auto" else TaskPoolStrategy(size=max(1, int(workers))),
        )

    def execute(self, plan: RunPlan) -> Iterator[Event]:
        """The encoded blocks as events; a puller thread, so the skeleton can stop on time.

        The smallest pending shard is read here, on the driver: a run's read workers are new processes
        (starting them and importing the read stage takes seconds), and the first vectors need not
        wait for them. Ray Data's read tasks for the other shards start once the first vectors are
        back (or the driver has read its shard), so that starting them does not compete with the
        first encoder calls for the CPUs of a small machine.
        """
        import ray

        # Incremental: what the output holds goes to the object store once; read tasks filter with it.
        existing = None
        if plan.change_filter is not None:
            existing = ray.put(plan.change_filter.existing)
            plan.change_filter.existing = ray.get(existing)  # the driver too keeps only the store's copy
        # the smallest shard: the driver's one reader then never holds the run's tail for long
        first = min(plan.pending, key=lambda shard: shard.size_bytes)
        rest = [shard for shard in plan.pending if shard is not first]
        go = threading.Event()  # the read tasks may start

        def read_first(pieces: queue.Queue, halt: threading.Event) -> None:
            try:
                self._read_here(first, plan.encoder, existing, pieces, halt)
            finally:
                go.set()

        def read_rest(pieces: queue.Queue, halt: threading.Event) -> None:
            while not go.wait(QUEUE_POLL_S):
                if halt.is_set():
                    return
            self._feed(self._dataset(ray, rest, plan.encoder, existing), pieces, halt)

        sources = [read_first, read_rest] if rest else [read_first]
        rows_per_call = max(16, CALL_BUDGETS * plan.encoder.token_budget // max(1, plan.encoder.max_seq_length))
        blocks: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        pulled_all, halt = threading.Event(), threading.Event()
        puller = threading.Thread(
            target=self._pull, args=(sources, rows_per_call, blocks, failure, pulled_all, halt, go),
            name="embedder-ray-pull", daemon=True,
        )
        puller.start()
        seen: set[str] = set()
        try:
            while True:
                try:
                    rows = blocks.get(timeout=QUEUE_POLL_S)
                except queue.Empty:
                    if pulled_all.is_set() and blocks.empty():
                        if failure:
                            raise RunFailed(f"the Ray pipeline failed: {failure[0]}") from failure[0]
                        return
                    yield IDLE
                    continue
                yield from self._events(rows, seen)
        finally:
            halt.set()
            puller.join(timeout=5)
            if self.actors is not None:
                self.actors.kill()  # nothing more to encode (also on a shared cluster the run stays on)

    def _pull(self, sources: list[Callable[[queue.Queue, threading.Event], None]], rows_per_call: int,
              blocks: queue.Queue, failure: list[BaseException], pulled_all: threading.Event,
              halt: threading.Event, first_vectors: threading.Event) -> None:
        """Read blocks → encoder actors → ``blocks`` (puller thread; feeder threads put read blocks);
        ``first_vectors`` is set when the first encoded chunk rows come back."""
        pieces: queue.Queue = queue.Queue(maxsize=4 * max(1, len(self.actors.actors)))
        fed_all = threading.Event()
        feeder = threading.Thread(target=_feed_all, args=(sources, pieces, failure, fed_all, halt),
                                  name="embedder-ray-feed", daemon=True)
        feeder.start()

        def out(rows: pa.Table) -> bool:
            if not first_vectors.is_set() and rows.column("vector").null_count < rows.num_rows:
                first_vectors.set()
            while not (halt.is_set() or self.control.abort.is_set()):
                try:
                    blocks.put(rows, timeout=QUEUE_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            _Dispatcher(self.actors, rows_per_call, pieces, fed_all, out).run()
            if failure:  # the feeder's error, which ended the feed early
                return
        except BaseException as err:
            failure.append(err)
        finally:
            halt.set()
            feeder.join(timeout=5)
            pulled_all.set()

    @staticmethod
    def _feed(dataset: Any, pieces: queue.Queue, halt: threading.Event) -> None:
        """The read stage's output blocks (refs, not data) → ``pieces``; closing the stream when the
        run stops early ends the streaming executor."""
        bundles = dataset.iter_internal_ref_bundles()
        try:
            for bundle in bundles:
                for entry, cut in zip(bundle.blocks, bundle.slices):
                    start = cut.start_offset if cut is not None else 0
                    rows = cut.num_rows if cut is not None else entry.metadata.num_rows
                    if rows and not _put(pieces, _Piece(entry.ref, start, rows), halt):
                        return
        finally:
            del bundles  # the executor shuts down when its iterator goes (Ray Data's _ClosingIterator)

    def _read_here(self, shard: Shard, encoder: EncoderFacts, existing: Any, pieces: queue.Queue,
                   halt: threading.Event) -> None:
        """One shard read on the driver with the read stage's own function, its blocks put in the
        object store for the encoder actors as the read tasks' are."""
        import ray

        rows = shard_rows(pa.table({"shard": [pickle.dumps(shard)]}), self.job.model_dump_json(),
                          encoder.tokenizer_json, encoder.max_seq_length, encoder.layout.overhead,
                          () if existing is None else (existing,))
        for table in rows:
            if table.num_rows and not _put(pieces, _Piece(ray.put(table), 0, table.num_rows), halt):
                return

    def _events(self, rows: pa.Table, seen: set[str]) -> Iterator[Event]:
        """One block of encoded rows and end rows as events (a shard starts when its first rows show)."""
        for actor, seconds in zip(rows.column("encoder").to_pylist(), rows.column("encode_seconds").to_pylist()):
            if actor is not None:
                self.encoders_seen[actor] = self.encoders_seen.get(actor, 0.0) + (seconds or 0.0)
        chunk_rows, end_rows = partition_rows(rows)
        ends = rows_to_ends(end_rows)
        chunks = rows_to_chunks(chunk_rows) if chunk_rows.num_rows else []
        now = time.time()
        for shard_id in dict.fromkeys([*(c.shard_id for c in chunks), *(e.shard_id for e in ends)]):
            if shard_id not in seen:
                seen.add(shard_id)
                yield ShardStarted(shard_id, now)
        if chunks:
            vectors = chunk_rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            yield EncodedBlock(chunks, vectors.reshape(len(chunks), -1))
        for end in ends:
            yield ShardFinished(end)


def _put(pieces: queue.Queue, piece: _Piece, halt: threading.Event) -> bool:
    """``piece`` into ``pieces`` as room frees up; False when the run stopped first."""
    while not halt.is_set():
        try:
            pieces.put(piece, timeout=QUEUE_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _feed_all(sources: list[Callable[[queue.Queue, threading.Event], None]], pieces: queue.Queue,
              failure: list[BaseException], fed_all: threading.Event, halt: threading.Event) -> None:
    """Runs each source of read blocks in its own thread; sets ``fed_all`` once every one has
    ended, or at the first error (kept in ``failure``: the run fails with it)."""

    def feed(source: Callable[[queue.Queue, threading.Event], None]) -> None:
        try:
            source(pieces, halt)
        except BaseException as err:
            failure.append(err)
            fed_all.set()

    threads = [threading.Thread(target=feed, args=(source,), name=f"embedder-ray-feed-{i}", daemon=True)
               for i, source in enumerate(sources)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fed_all.set()


class RayRunner(Run):
    """A run with the Ray scheduler (``runner.kind: ray``): see ``embedder.execution.skeleton.Run``."""

    def __init__(
        self, job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
    ) -> None:
        super().__init__(job, RayScheduler, on_progress=on_progress, force_unlock=force_unlock)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ConfigError("runner: ray needs Ray Data: pip install 'embedder[ray]'") from err
    return ray


def _cluster_address(configured: str | None) -> str | None:
    """The cluster a run connects to: ``runner.address``, else ``RAY_ADDRESS``; None: a new local
    one (or the one ``ray start`` runs here, as ``ray.init()`` finds it)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def _local(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a cluster of this run's own on this machine (``local``:
    always; None: unless ``ray start`` runs one here)."""
    return address in (None, "local")


def _connect(ray: Any, address: str | None) -> bool:
    """Connects to the cluster; True when this call did (so the run disconnects after).

    A process already connected (a notebook, a Ray job's entrypoint, the tests) keeps its
    connection; otherwise ``address`` or ``RAY_ADDRESS`` (``local``: a new local cluster), or else
    what ``ray.init()`` finds: the cluster ``ray start`` runs here, else a new local one.

    Raises:
        RayClusterUnreachable: Nothing answers at a ``host:port`` address (``_check_reachable``).
        RayAuthRefused: The cluster refused the connection on token authentication; the message
            says what to set ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN_PATH`` to.
    """
    if ray.is_initialized():
        return False
    source = "runner.address" if address else "RAY_ADDRESS"
    address = _cluster_address(address)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address == "local":
        kwargs["include_dashboard"] = False
        log.info("ray: %s is local; starting a local Ray cluster on this machine", source)
    elif address is None:
        kwargs["include_dashboard"] = False
        log.info(
            "ray: no runner.address or RAY_ADDRESS; joining the cluster `ray start` runs on this machine, "
            "if any, else starting a local one (runner.address: local always starts one)"
        )
    else:
        _check_reachable(address, source)
    try:
        ray.init(address=address, **kwargs)
    except Exception as err:
        from embedder.errors import ray_auth_refused

        refused = ray_auth_refused(err, address)
        if refused is None:
            raise
        raise refused from err
    return True


def _check_reachable(address: str, source: str) -> None:
    """Refuses, in seconds, a ``host:port`` (or ``ray://host:port``) address nothing listens at:
    ``ray.init`` would retry it for minutes before saying so. ``auto``, ``local`` and other URL
    forms go to ``ray.init`` as they are.

    Raises:
        RayClusterUnreachable: The connection was refused, or timed out (5 s), or the host is unknown.
    """
    import socket

    from embedder.errors import RayClusterUnreachable

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if "://" in target or not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        start = f"--ray-client-server-port={port}" if address.startswith("ray://") else f"--port={port}"
        raise RayClusterUnreachable(
            f"nothing answers at the Ray cluster address {address} (from {source}): {why}; start the "
            f"cluster there (ray start --head {start}) or set {source} to a running cluster's "
            "address, then run the same command again"
        ) from None


def run_ray(
    job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
) -> RunResult:
    """Runs ``job`` on Ray (see ``RayRunner``)."""
    return RayRunner(job, on_progress=on_progress, force_unlock=force_unlock).run()


__all__ = [
    "EncoderActor", "EncoderActors", "EncoderFacts", "EncoderPool", "RayRunner", "RayScheduler", "plan_encoder_pool",
    "read_tasks", "run_ray",
]
