"""The local runner: one process drives the whole flow on this machine (CPU or one GPU).

::

    reader processes (N)            feeder thread          encoder thread        main thread
    read shard → chunk+tokenize ──▶ pack by token budget ──▶ encode (GPU/CPU) ──▶ write rows, commit
             (mp queue, bounded)        (bounded queue)         (bounded queue)    shard, quarantine,
                                                                                  completion record

Every queue is bounded, so memory does not grow with the corpus; rows are handed to the sink in
blocks as they are encoded, and a shard is committed once all its chunks are written. After
commits the freed heap goes back to the OS (``embedder.memory``): glibc would otherwise keep it in
fragmented arenas and the runner's RSS would creep up over a long run.

Stopping: SIGTERM/SIGINT (or a spot notice) starts a drain — readers take no new shard, in-flight
shards finish and commit within ``runner.grace_period_s``, the rest is abandoned (a rerun redoes
it) and the run ends ``interrupted`` (CLI exit 75).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from embedder.config import Job
from embedder.failpoints import corrupt, failpoint
from embedder.records import PackedBatch, Shard
from embedder.runners.stages import (
    ReadProgress,
    RunFailed,
    RunResult,
    ShardAssembler,
    ShardEnd,
    empty_output_error,
    import_plugins,
    make_connector,
    plan_shards,
    plugin_modules,
    read_and_chunk,
    resolve_job,
    sink_registry,
)

log = logging.getLogger("embedder")

QUEUE_POLL_S = 0.2
IN_FLIGHT_BATCHES = 2


# --- reader processes -----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this child when its parent dies (e.g. a SIGKILLed job)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_when_runner_dies(runner_alive: Any) -> None:
    """Ends this reader as soon as the runner is gone, whatever killed it.

    ``runner_alive`` is the read end of a pipe whose only write end the runner holds: the kernel
    closes it when the runner dies (even a SIGKILL, even while it is an unreaped zombie), and the
    read end then reports end-of-file. Readers forked from the fork server cannot rely on
    ``PR_SET_PDEATHSIG`` (their parent is the server, which by design outlives its clients), and an
    orphaned reader would keep the runner's stdout/stderr open: a caller waiting for them would hang.
    """

    def watch() -> None:
        try:
            runner_alive.recv()  # nothing is ever sent: returns only by EOFError
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="embedder-runner-watch", daemon=True).start()


def _reader_context() -> Any:
    """The multiprocessing context reader processes start from.

    ``forkserver`` where the platform has it: each reader is forked from a small server process
    started before the model is loaded. Starting them from the runner itself (``spawn``) forks the
    runner first, and once it holds the model and a CUDA context that fork took ~0.5 s per reader on
    the H200 machine — 15 readers cost 15 s of a 25 s run. ``spawn`` elsewhere (Windows).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["embedder.runners.local"])  # readers start with their imports done
    return ctx


_MAIN_SWAP = threading.Lock()


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Starts processes as if the user's ``__main__`` had no file to re-import.

    ``spawn`` and ``forkserver`` children import the parent's main module before they run their
    target (``multiprocessing``'s "safe importing of the main module"). A user's script that calls
    ``embedder.run(...)`` at top level, without an ``if __name__ == "__main__":`` guard, would then
    run again in every reader: each would start its own job on the same output (``LeaseHeld``) and
    die, and the runner would see ``BrokenPipeError``. Readers need nothing of ``__main__`` (their
    target and arguments live in ``embedder``), so while they start, ``__main__`` is an empty module
    and the children skip that import. Works the same for ``python file.py``, ``python - < file``,
    Jupyter (no main file at all) and a run started from a thread.
    """
    with _MAIN_SWAP:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


def _start_reader_server() -> None:
    """Starts the fork server now (cheap: the runner is still small), if readers use one."""
    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        _reader_context()
        with _without_main_module():
            forkserver.ensure_running()


def _reader_main(
    job_json: str,
    tokenizer_json: str,
    max_seq_length: int,
    overhead: int,
    tokenizer_threads: int,
    tasks: Any,
    results: Any,
    stop: Any,
    known_versions_path: str | None = None,
    environ: dict[str, str] | None = None,
    runner_alive: Any = None,
    plugins: tuple[str, ...] = (),
) -> None:
    """Reads shards from ``tasks`` and streams their chunks to ``results`` (runs in a child process).

    ``environ``: the runner's environment when it started the readers (a fork server's children
    would otherwise see the server's, from when it started: credentials set since would be missing).
    """
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    _die_with_parent()
    if runner_alive is not None:
        _exit_when_runner_dies(runner_alive)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how to stop
    os.environ["RAYON_NUM_THREADS"] = str(tokenizer_threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(tokenizer_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads > 1 else "false"
    import tokenizers

    from embedder.chunking import Chunker

    import_plugins(plugins)  # connectors the user's own modules register
    job = Job.model_validate_json(job_json)
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    chunker = Chunker.from_settings(tokenizer, max_seq_length, overhead, job.chunking)
    connector = make_connector(job)
    if known_versions_path:
        import pickle

        with open(known_versions_path, "rb") as f:
            connector.known_versions = pickle.load(f)
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


class PipelineStopped(Exception):
    """Raised inside pipeline threads when the run stops; ends them quietly."""


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


class _EncoderGroup:
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


def encoder_devices(job: Job) -> list[str]:
    """The devices of the local runner's encoders: ``runner.encoders`` of them (``auto``: one per
    visible GPU, or one on the CPU), on ``model.device``'s kind; several CPU encoders share the CPU
    (the same code path as on GPUs, for tests).

    Raises:
        ConfigError: more encoders than visible GPUs.
    """
    from embedder.config import ConfigError

    setting = job.runner.encoders
    if setting != "auto" and int(setting) < 1:
        raise ConfigError(f"runner.encoders must be 'auto' or at least 1, got {setting}")
    gpus = 0
    if job.model.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return ["cpu" if job.model.device == "cpu" else job.model.device] * (1 if setting == "auto" else int(setting))
    count = gpus if setting == "auto" else int(setting)
    if count > gpus:
        raise ConfigError(
            f"runner.encoders {count} needs {count} GPUs, {gpus} are visible; use at most {gpus} or 'auto' "
            "(CUDA_VISIBLE_DEVICES chooses which)"
        )
    return [f"cuda:{i}" for i in range(count)] if count > 1 else [job.model.device]


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
        self._known_versions: Any = None  # embedder.incremental.KnownVersions, for the connector
        from embedder.validate import CanarySampler

        self.canaries = CanarySampler(self.job.validation.canary_samples)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Starts a drain (what SIGTERM, SIGINT and a spot notice do)."""
        if not self._drain.is_set():
            log.warning("%s: finishing in-flight shards (up to %.0f s), then stopping", reason, self.job.runner.grace_period_s)
            self._drain_deadline = time.monotonic() + self.job.runner.grace_period_s
            self._drain.set()

    def _lost_lease(self) -> None:
        self._lease_lost = True
        self._abort.set()

    # Hooks a runner on other machines overrides (the Ray runner does) ------------------------------

    runner_name = "local"
    """Stored in run records."""

    def _setup(self) -> None:
        """Called under the lease before anything is listed or loaded (Ray: connect, plan the pool).

        Here: starts the reader processes' fork server while this process is still small."""
        _start_reader_server()

    def _teardown(self) -> None:
        """Called last, whatever happened (Ray: disconnect from a cluster started for the run)."""

    def _load_encoder(self) -> Any:
        """The encoder the run chunks for and describes in provenance; here, the model itself.

        With several encoders (``runner.encoders``), one model per device is loaded and kept in
        ``self._encoders``; the first is the one returned."""
        from embedder.models.encoder import Encoder

        devices = encoder_devices(self.job)
        if len(devices) == 1:
            self._encoders = [Encoder.load(self.job.model)]
            return self._encoders[0]
        import torch

        self._encoders = []
        for device in devices:
            with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
                self._encoders.append(Encoder.load(self.job.model.model_copy(update={"device": device})))
        log.info("%d encoders: %s", len(devices), ", ".join(devices))
        return self._encoders[0]

    def _billed_gpus(self) -> float:
        """GPUs the run pays for, for ``$ per 1M tokens``."""
        return 1.0

    # The run ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        from embedder.checkpoint import Checkpoint, check_source_unchanged
        from embedder.lease import Lease

        job = self.job
        result = RunResult(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], output=job.output.uri)
        result.model, result.sink, result.mode = job.model.name, job.output.sink, job.output.mode
        result.runner = self.runner_name
        # The lease comes first: a second job on this output is refused before it loads anything.
        lease = Lease(job.output.uri, job.output.storage_options, job.runner.lease_ttl_s, on_lost=self._lost_lease)
        lease.acquire(force=self.force_unlock)
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        checkpoint.mark_killed_runs()  # under the lease: a run still "running" is dead
        restore: Callable[[], None] = lambda: None  # noqa: E731
        watcher = None
        started = time.perf_counter()
        try:
            if job.runner.spot_watch:
                from embedder.spot import SpotWatcher

                watcher = SpotWatcher(
                    job.runner.spot_url, lambda _: self.request_stop("spot interruption notice"), job.runner.spot_poll_s
                ).start()
            self._setup()
            restore = self._install_signal_handlers()  # after _setup: ray.init installs its own
            generation = self._resolve_generation(checkpoint, result)
            is_new = generation.pop("new", False)
            connector = make_connector(job)
            shards, generation["shard_bytes"] = plan_shards(
                connector, self._read_parallelism(), generation.get("shard_bytes", "config")
            )
            result.shard_bytes = generation["shard_bytes"]
            encoder = self._load_encoder()
            result.dtype = str(encoder.provenance().get("dtype"))
            if self.canaries.size:
                self._preload_reference(encoder)
            sink = self._sink_for(encoder)
            if generation["mode"] == "reembed" and not generation.get("reset_done"):
                checkpoint.write_generation(generation)
                sink.reset()  # the old vectors go: this pass embeds everything with the new model
                generation["reset_done"] = True
                checkpoint.write_generation(generation)
            sink.open()  # refuses an output whose rows other settings made (vector fingerprint)
            sink.fence(lease.token)  # only this lease's commits land from now on (a stalled writer's are refused)
            if is_new:
                checkpoint.write_generation(generation)
            result.load_seconds = time.perf_counter() - started
            checkpoint.save_job(job.to_yaml())
            incremental = generation["mode"] == "incremental"
            if incremental:  # rows of this pass carry its generation: aborts never touch older rows
                shards = [dataclasses.replace(s, id=f"{s.id}@{generation['id']}") for s in shards]
            done = checkpoint.completed(generation["id"])
            if not incremental:
                check_source_unchanged(shards, done, job.source.uri)  # stale rows otherwise (SourceChanged, exit 2)
            pending = [s for s in shards if s.id not in done]
            result.shards_total = len(shards)
            result.shards_skipped = len(shards) - len(pending)
            result.bytes_total = sum(s.size_bytes for s in pending)
            result.quarantine_uri = f"{job.output.uri.rstrip('/')}/_embedder/quarantine/"
            checkpoint.write_run(result.to_dict())
            if pending and not self._drain.is_set():
                sink.abort_many([s.id for s in pending])
                change_filter = self._change_filter(sink, connector) if incremental else None
                pipeline_started = time.perf_counter()
                try:
                    self._run_pipeline(pending, encoder, sink, checkpoint, result, generation["id"], change_filter)
                finally:
                    result.pipeline_seconds = time.perf_counter() - pipeline_started
            if self._drain.is_set():
                result.state = "interrupted"
            else:
                self._check_canaries(encoder, result)
                if incremental:
                    self._prune(sink, checkpoint, {s.id for s in shards}, result)
                result.output_rows = sink.count_rows()
                if not result.output_rows:  # "done" with nothing embedded would tell the user nothing
                    message = empty_output_error(result, checkpoint, job.source.uri)
                    checkpoint.forget_completions(generation["id"])  # a rerun with a fixed job redoes them
                    raise RunFailed(message)
                checkpoint.forget_shards_except({s.id for s in shards})
                failpoint("during_finish")
                sink.finish()
                result.indexes = getattr(sink, "index_report", None) or None
                generation["complete"] = True
                checkpoint.write_generation(generation)
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
            result.tokens_per_second = result.tokens / result.pipeline_seconds if result.pipeline_seconds > 0 else 0.0
            hourly = job.runner.gpu_hourly_usd
            result.add_cost(None if hourly is None else hourly * self._billed_gpus())
            result.ended_at = time.time()
            try:
                if result.shards_total or result.state != "failed":
                    checkpoint.write_run(result.to_dict())
            finally:
                lease.release()
                self._teardown()
                if result.state == "failed" and not result.shards_total:
                    _remove_if_empty(job.output.uri)  # a refused job leaves no empty output behind
        return result

    def _sink_for(self, encoder: Any) -> Any:
        """The job's sink (not opened), its schema carrying the encoder's and chunker's provenance:
        what the run writes with and what ``plan`` checks the stored rows against."""
        from embedder.chunking import Chunker
        from embedder.schema import output_schema

        job = self.job
        provenance = {**encoder.provenance(), "chunking": Chunker.for_encoder(encoder, job.chunking).settings()}
        schema = output_schema(encoder.dim, job.source.metadata_fields, provenance)
        return sink_registry().SINKS.get(job.output.sink)(job.output, schema)

    def plan(self) -> dict[str, Any]:
        """What ``run`` would do, without doing it: no lease, no file written (``--dry-run``).

        Lists the shards as the run would (the output's stored shard size included), says which are
        done and which would be embedded, and checks the job's vector fingerprint against the rows the
        output holds. The model is loaded (on this machine, whatever the runner) to know its
        fingerprint.
        """
        from embedder.checkpoint import Checkpoint
        from embedder.models.encoder import Encoder
        from indexes.base import SinkError, check_compatible

        job = self.job
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        probe = RunResult(run_id="dry-run", output=job.output.uri)
        current = checkpoint.generation()
        generation = self._resolve_generation(checkpoint, probe)
        stored = generation.get("shard_bytes", "config")
        readers = LocalRunner._read_parallelism(self)
        shards, shard_bytes = plan_shards(make_connector(job), readers, stored)
        encoder = Encoder.load(job.model)
        sink = self._sink_for(encoder)
        schema = sink.schema
        mode = generation["mode"]
        existing = None if mode == "reembed" and not generation.get("reset_done") else sink.existing_schema()
        fingerprint = "new output: nothing stored yet" if existing is None else "matches the stored rows"
        refused = None
        if mode == "reembed" and not generation.get("reset_done") and current is not None:
            fingerprint = "reembed: every stored row is replaced"
        elif existing is not None:
            try:
                check_compatible(existing, schema, job.output.uri)
            except SinkError as err:
                refused, fingerprint = str(err), "differs from the stored rows: the run would be refused (exit 2)"
        if mode == "incremental":
            shards = [dataclasses.replace(s, id=f"{s.id}@{generation['id']}") for s in shards]
        done = {} if generation.get("new") else checkpoint.completed(generation["id"])
        pending = [s for s in shards if s.id not in done]
        return {
            "output": job.output.uri,
            "sink": job.output.sink,
            "source": job.source.uri,
            "format": job.source.format,
            "model": job.model.name,
            "mode": mode,
            "pass": (
                "a new pass" if generation.get("new")
                else "extends the finished pass (new shards only)" if generation.get("complete")
                else "resumes the unfinished pass"
            ),
            "readers": min(readers, max(1, len(pending))),
            "shard_bytes": shard_bytes,
            "shards_total": len(shards),
            "shards_done": len(shards) - len(pending),
            "shards_to_embed": len(pending),
            "bytes_to_read": sum(s.size_bytes for s in pending),
            "first_shards": [s.id for s in pending[:5]],
            "incremental": "unchanged chunks are skipped, changed ones replaced" if mode == "incremental" else None,
            "fingerprint": fingerprint,
            "refused": refused,
        }

    def _resolve_generation(self, checkpoint: Any, result: RunResult) -> dict[str, Any]:
        """The pass this run works on: the unfinished one (resumed whatever mode is asked), or a new
        one for incremental/reembed runs over a complete output."""
        requested = self.job.output.mode
        current = checkpoint.generation()
        if current is not None and not current.get("complete") and not (
            requested == "reembed" and current["mode"] != "reembed"
        ):
            if requested != current["mode"]:
                log.warning("resuming the unfinished %s run on this output (asked: %s)", current["mode"], requested)
            generation = current
        elif current is not None and current.get("complete") and requested == "full":
            generation = current  # extend the finished pass: new shards only
        else:
            mode = "full" if requested == "incremental" and current is None else requested
            # Written once the sink accepted the output (a refused run leaves no unfinished pass).
            generation = {"id": result.run_id, "mode": mode, "complete": False, "started_at": time.time(), "new": True}
            # The output's shard size, fixed by its first pass (ids depend on it); an output from
            # before shard planning keeps the configured size; a new output plans one (None).
            generation["shard_bytes"] = None if current is None else current.get("shard_bytes", "config")
        result.mode = generation["mode"]
        return generation

    def _change_filter(self, sink: Any, connector: Any) -> Any:
        """Loads what the output holds, for the incremental filter (and connector version skips)."""
        from embedder.incremental import ChangeFilter, ExistingChunks

        version_field = connector.version_field
        columns = ["id", "doc_id", "chunk_index", "content_hash"]
        if version_field and version_field in sink.schema.names:
            columns.append(version_field)
        existing = ExistingChunks.from_table(sink.read(columns=columns), version_field)
        self._known_versions = existing.known_versions()
        if version_field and self._known_versions is None:
            log.info("incremental: the output has no %r column; every document is parsed again", version_field)
        return ChangeFilter(existing)

    def _prune(self, sink: Any, checkpoint: Any, current_shards: set[str], result: RunResult) -> None:
        """Removes old rows of re-embedded chunks, shrunk documents and (deletes: true) vanished ones."""
        from embedder.incremental import plan_prune

        table = sink.read(columns=["id", "doc_id", "shard_id"])
        plan, deleted = plan_prune(table, checkpoint.changes(current_shards), current_shards, self.job.output.deletes)
        if plan:
            sink.delete_rows(plan)
        result.deleted += deleted

    def _preload_reference(self, encoder: Any) -> None:
        """Loads the canary check's reference model in the background while the run embeds."""
        from embedder.models.loader import weights_bytes
        from embedder.validate import preload_reference

        local_dir = getattr(encoder, "_local_dir", None)
        preload_reference(encoder.source, self.job.model.trust_remote_code, weights_bytes(local_dir))

    def _check_canaries(self, encoder: Any, result: RunResult) -> None:
        """Compares this run's sampled vectors with ``SentenceTransformer.encode`` in fp32, on the
        job's GPU when it has one (the CPU otherwise, and on a Ray driver), over at most
        ``validation.canary_max_tokens`` tokens; the run record gets its time and device."""
        from embedder.validate import check_canaries

        if not self.canaries.samples:
            return
        device = getattr(encoder, "device", None)
        result.canary_device = str(device) if device is not None and device.type == "cuda" else "cpu"
        started = time.perf_counter()
        try:
            report = check_canaries(
                self.canaries, encoder.source, encoder.document_prompt,
                self.job.validation.min_cosine, self.job.model.trust_remote_code,
                device=result.canary_device, max_tokens=self.job.validation.canary_max_tokens,
            )
            result.canary = report.to_dict()
        except Exception as err:
            result.canary = {"error": str(err)}
            raise
        finally:
            result.canary_seconds = time.perf_counter() - started

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

    def _read_parallelism(self) -> int:
        """Reader processes this machine runs: ``runner.workers``, or one per CPU but one."""
        setting = self.job.runner.workers
        if setting != "auto":
            return max(1, int(setting))
        cpus = os.cpu_count() or 1
        return max(1, cpus - 1 if cpus > 2 else 1)

    def _workers(self, pending: list[Shard]) -> int:
        return max(1, min(len(pending), self._read_parallelism()))

    def _run_pipeline(
        self,
        pending: list[Shard],
        encoder: Any,
        sink: Any,
        checkpoint: Any,
        result: RunResult,
        generation: str | None = None,
        change_filter: Any = None,
    ) -> None:
        from embedder.memory import HeapTrimmer
        from embedder.packing import TokenBudgetPacker

        pipeline_started = time.perf_counter()
        workers = self._workers(pending)
        versions_file = None
        if self._known_versions:
            import pickle
            import tempfile

            versions_file = tempfile.NamedTemporaryFile(prefix="embedder-versions-", suffix=".pkl", delete=False)
            pickle.dump(self._known_versions, versions_file)
            versions_file.close()
        ctx = _reader_context()
        alive_r, alive_w = ctx.Pipe(duplex=False)  # readers see EOF on alive_r once this process is gone
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
                    versions_file.name if versions_file else None,
                    dict(os.environ),
                    alive_r,
                    tuple(plugin_modules(self.job)),
                ),
                daemon=True,
                name=f"embedder-reader-{i}",
            )
            for i in range(workers)
        ]
        with _without_main_module():
            for p in procs:
                p.start()
        alive_r.close()  # the readers hold their copies; this process keeps only the write end

        batches: queue.Queue = queue.Queue(maxsize=4)
        encoded: queue.Queue = queue.Queue(maxsize=4)
        failure: list[BaseException] = []

        def put(q: queue.Queue, item: Any) -> None:
            while True:
                if self._abort.is_set():
                    raise PipelineStopped
                try:
                    q.put(item, timeout=QUEUE_POLL_S)
                    return
                except queue.Full:
                    continue

        def feeder() -> None:
            """mp results → packer → batches queue; passes ShardEnds through in order."""
            try:
                packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)
                read_progress = ReadProgress(result, pending)
                started_shards = ended = 0
                while ended < len(pending):
                    if self._drain.is_set():
                        reader_stop.set()
                    try:
                        item = results.get(timeout=QUEUE_POLL_S)
                    except queue.Empty:
                        if self._abort.is_set():
                            raise PipelineStopped from None
                        if not any(p.is_alive() for p in procs) and results.empty():
                            if self._drain.is_set() and ended == started_shards:
                                break  # drained: every started shard has ended
                            raise RunFailed("reader processes exited before finishing their shards") from None
                        continue
                    if isinstance(item, tuple) and item[0] == "start":
                        started_shards += 1
                        assembler.started[item[1]] = time.time()
                        continue
                    if isinstance(item, tuple) and item[0] == "error":
                        raise RunFailed(f"reading shard {item[1]!r} failed:\n{item[2]}")
                    if isinstance(item, ShardEnd):
                        ended += 1
                        read_progress.end(item)
                        if change_filter is not None:
                            item.chunks, item.changes = change_filter.finish_shard(
                                item.shard_id, item.chunks, item.unchanged_doc_ids
                            )
                        put(batches, item)
                        continue
                    read_progress.chunks(item)
                    if change_filter is not None:
                        item = change_filter.filter(item)
                    packer.token_budget = min(e.token_budget for e in encoders)  # follows OOM back-offs
                    for batch in packer.add(item):
                        put(batches, batch)
                for batch in packer.flush():
                    put(batches, batch)
                for _ in encoders:
                    put(batches, None)  # one end of stream per encoder
            except PipelineStopped:
                return
            except BaseException as err:
                failure.append(err)
                self._abort.set()

        encoders = getattr(self, "_encoders", None) or [encoder]
        busy = [[0, 0.0] for _ in encoders]  # per encoder: tokens encoded, seconds waited on its device

        def encode_loop(index: int) -> None:
            """Keeps up to two batches in flight on the device: the next batch is submitted
            before the previous one's vectors are read back. With several encoders, each runs this
            loop on its own device, all taking batches from the one packer."""
            encoder = encoders[index]
            in_flight: collections.deque = collections.deque()
            if len(encoders) > 1 and encoder.device.type == "cuda":
                import torch

                torch.cuda.set_device(encoder.device)  # the fused kernels launch on the current device

            def complete_one() -> None:
                batch, handle = in_flight.popleft()
                t0 = time.perf_counter()
                vectors = corrupt(handle.result())
                busy[index][1] += time.perf_counter() - t0
                busy[index][0] += batch.num_tokens - batch.num_sequences * encoder.layout.overhead
                failpoint("mid_encode")
                put(encoded, (batch, vectors))

            try:
                while True:
                    try:
                        item = batches.get(timeout=QUEUE_POLL_S)
                    except queue.Empty:
                        if self._abort.is_set():
                            return
                        while in_flight:  # input is slow: hand over what is done
                            complete_one()
                        continue
                    if isinstance(item, PackedBatch):
                        t0 = time.perf_counter()
                        in_flight.append((item, encoder.encode_async(item)))
                        busy[index][1] += time.perf_counter() - t0
                        if len(in_flight) > IN_FLIGHT_BATCHES:
                            complete_one()
                    elif item is None:
                        while in_flight:
                            complete_one()
                        put(encoded, None)
                        return
                    else:
                        put(encoded, item)  # a ShardEnd: the assembler accepts it in any order
            except PipelineStopped:
                return
            except BaseException as err:
                failure.append(err)
                self._abort.set()

        trimmer = HeapTrimmer()

        def on_commit(_result: RunResult) -> None:
            # On the committer thread, once a shard's staged rows and chunks are freed: glibc keeps
            # freed memory in fragmented arenas, and without this the runner's RSS creeps up.
            trimmer.maybe_trim()
            result.heap_trim_seconds = trimmer.seconds
            if self.on_progress:
                self.on_progress(result, 0)

        assembler = ShardAssembler(
            pending, sink, checkpoint, result, self._abort, on_commit=on_commit, canaries=self.canaries, background=True
        )
        assembler.generation = generation
        sampler = TimelineSampler(
            _EncoderGroup(encoders), reader_pids=lambda: [p.pid for p in procs if p.pid and p.is_alive()]
        )

        threads = [
            threading.Thread(target=feeder, name="embedder-pack", daemon=True),
            *(threading.Thread(target=encode_loop, args=(i,), name=f"embedder-encode-{i}", daemon=True)
              for i in range(len(encoders))),
        ]
        ended_streams = 0
        for t in threads:
            t.start()

        try:
            while True:
                if failure:
                    raise failure[0]
                assembler.check()
                if self._abort.is_set():
                    raise RunFailed("stopped: " + ("lease lost" if self._lease_lost else "aborted"))
                if self._drain.is_set() and time.monotonic() > self._drain_deadline:
                    log.warning(
                        "grace period over: abandoning %d in-flight shard(s); a rerun redoes them", len(assembler.unfinished)
                    )
                    break
                try:
                    item = encoded.get(timeout=QUEUE_POLL_S)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and encoded.empty():
                        if failure:
                            raise failure[0] from None
                        raise RunFailed(f"pipeline ended with {len(assembler.unfinished)} shard(s) unfinished") from None
                    continue
                if item is None:  # an encoder's end of stream
                    ended_streams += 1
                    if ended_streams == len(encoders):
                        break
                    continue
                if isinstance(item, ShardEnd):
                    failpoint("after_read")
                    assembler.end_shard(item)
                    continue
                batch, vectors = item
                assembler.add_vectors(batch.chunks or [], vectors)
                sampler.sample(result)
                if self.on_progress:
                    self.on_progress(result, batch.num_sequences)
            assembler.wait()  # commits every complete shard still queued for the committer
            if assembler.unfinished and not self._drain.is_set():
                raise RunFailed(f"pipeline ended with {len(assembler.unfinished)} shard(s) unfinished")
        finally:
            self._abort.set()
            reader_stop.set()
            result.unfinished_shards = sorted(assembler.unfinished)
            result.interrupted_shards = sorted(s for s in assembler.unfinished if s in assembler.started)
            assembler.discard_all()
            for t in threads:
                t.join(timeout=5)
            result.encode_seconds += sum(b[1] for b in busy)
            wall = max(time.perf_counter() - pipeline_started, 1e-9)
            result.encoders = len(encoders)
            result.encoder_tokens_per_second = [round(tokens / wall, 1) for tokens, _ in busy]
            sampler.finish(result)
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():
                    p.terminate()
            results.cancel_join_thread()
            tasks.cancel_join_thread()
            alive_w.close()
            if versions_file is not None:
                os.unlink(versions_file.name)


def _remove_if_empty(output_uri: str) -> None:
    """Removes a local output folder (and its ``_embedder``) that the lease created and nothing filled."""
    if "://" in output_uri and not output_uri.startswith("file://"):
        return
    root = output_uri.removeprefix("file://")
    for folder in (os.path.join(root, "_embedder"), root):
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            return


def run_local(
    job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
) -> RunResult:
    """Runs ``job`` with the local runner (see ``LocalRunner``)."""
    return LocalRunner(job, on_progress=on_progress, force_unlock=force_unlock).run()


__all__ = ["LocalRunner", "RunFailed", "RunResult", "run_local"]
