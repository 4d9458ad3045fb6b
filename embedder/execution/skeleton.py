"""The run skeleton: the one sequence every runner goes through, whatever schedules the stages.

::

    lease → list → plan → generation → execute → canaries → prune → finish
      │       │       │        │            │          │         │       └ sink.finish (compaction,
      │       │       │        │            │          │         │         indexes), pass complete
      │       │       │        │            │          │         └ incremental: old rows of changed
      │       │       │        │            │          │           and vanished documents removed
      │       │       │        │            │          └ sampled vectors vs SentenceTransformer fp32
      │       │       │        │            └ the scheduler's event stream → ShardAssembler → commits
      │       │       │        └ which pass (resume / extend / new), the sink opened and checked
      │       │       └ shard size fixed by the output's first pass; encoder loaded (a job whose
      │       │         config alone shows other vectors than the stored ones is refused before it)
      │       └ the connector's shards
      └ one writer per output (a second job is refused before it loads anything)

Only the skeleton touches the sink, the checkpoint and the assembler; a scheduler
(``embedder.runners``) decides where reading, chunking and encoding run and streams typed events
(``embedder.execution.events``) back. So the local and Ray runners write the same rows for the same job,
and a new scheduler (several GPUs, another cluster manager) is written once, not twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from typing import TYPE_CHECKING, Any

from embedder.config import Job
from embedder.execution.control import RunControl
from embedder.execution.events import EncodedBlock, Event, ShardFinished, ShardStarted
from embedder.execution.generation import Generation, resolve_generation
from embedder.execution.job import resolve_job
from embedder.execution.plan import RunPlan
from embedder.execution.result import RunFailed, RunResult
from embedder.failpoints import corrupt, failpoint
from embedder.pipeline.commit import ShardAssembler, empty_output_error
from embedder.pipeline.read import ReadProgress, make_connector, plan_shards
from embedder.registry import sink_registry

if TYPE_CHECKING:
    from embedder.checkpoint import Checkpoint
    from embedder.execution.telemetry import TimelineSampler
    from embedder.runners.base import Scheduler

log = logging.getLogger("embedder")


class Run:
    """Runs a job through the skeleton, with ``scheduler_class`` placing the stages.

    Args:
        job: The job (``auto`` fields are resolved here).
        scheduler_class: A ``embedder.runners.base.Scheduler`` subclass.
        on_progress: Called with the running ``RunResult`` after each encoded block and commit
            (the CLI draws its progress bars from it).
        force_unlock: Remove another job's lease on the output first (with a warning).
    """

    def __init__(
        self,
        job: Job,
        scheduler_class: type[Scheduler],
        on_progress: Callable[[RunResult, int], None] | None = None,
        force_unlock: bool = False,
    ) -> None:
        from embedder.validate import CanarySampler

        self.job = resolve_job(job)
        self.on_progress = on_progress
        self.force_unlock = force_unlock
        self.control = RunControl(self.job.runner.grace_period_s)
        self.canaries = CanarySampler(self.job.validation.canary_samples)
        self.scheduler = scheduler_class(self.job, self.control)
        self._started = time.perf_counter()  # reset when run() starts; the run record's ``startup`` counts from it

    def request_stop(self, reason: str = "stop requested") -> None:
        """Starts a drain (what SIGTERM, SIGINT and a spot notice do)."""
        self.control.request_stop(reason)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Runs the job to its end (``done``), a drain (``interrupted``) or an error (raised)."""
        from embedder.checkpoint import Checkpoint
        from embedder.lease import Lease

        job = self.job
        result = RunResult(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], output=job.output.uri)
        result.model, result.sink, result.mode = job.model.name, job.output.sink, job.output.mode
        result.runner = self.scheduler.name
        # The lease comes first: a second job on this output is refused before it loads anything.
        lease = Lease(job.output.uri, job.output.storage_options, job.runner.lease_ttl_s, on_lost=self.control.lose_lease)
        lease.acquire(force=self.force_unlock)
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        checkpoint.mark_killed_runs()  # under the lease: a run still "running" is dead
        stops: list[Callable[[], None]] = []
        started = time.perf_counter()
        self._started = started
        try:
            self._start(stops)
            for milestone, at in self.scheduler.marks.items():  # those of setup (Ray: encoders_started)
                result.mark(milestone, at, started)
            result.mark("connected", time.perf_counter(), started)
            self._preload_sink()
            plan = self._plan(checkpoint, result, started, lease)
            if plan.pending and not self.control.draining:
                self._execute(plan, result)
            if self.control.draining:
                result.state = "interrupted"
            else:
                self._finish(plan, result)
        except BaseException as err:
            result.state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            result.error = f"{type(err).__name__}: {err}"
            if self.control.lease_lost:
                result.error = "the output's lease was taken over by another job (this job's heartbeat was late)"
                raise RunFailed(result.error) from err
            raise
        finally:
            for stop in reversed(stops):
                stop()
            self._close(result, checkpoint, lease, started)
        return result

    def _start(self, stops: list[Callable[[], None]]) -> None:
        """Spot notices and signals start a drain; the scheduler connects (Ray) or starts its fork
        server (local). Signal handlers go in after the scheduler's setup: ``ray.init`` installs its own."""
        job = self.job
        if job.runner.spot_watch:
            from embedder.spot import SpotWatcher

            watcher = SpotWatcher(
                job.runner.spot_url, lambda _: self.request_stop("spot interruption notice"), job.runner.spot_poll_s
            ).start()
            stops.append(watcher.stop)
        self.scheduler.setup()
        stops.append(self.control.install_signal_handlers())

    def _plan(self, checkpoint: Checkpoint, result: RunResult, started: float, lease: Any) -> RunPlan:
        """list → plan → generation: the shards, the encoder, the opened sink (fenced with the
        ``lease``'s token), what is pending."""
        from embedder.checkpoint import check_source_unchanged

        job = self.job
        generation = resolve_generation(checkpoint.generation(), job.output.mode, result.run_id)
        result.mode = generation.mode
        connector = make_connector(job)
        shards, generation.shard_bytes = plan_shards(connector, self.scheduler.read_parallelism(), generation.shard_bytes)
        result.shard_bytes = generation.shard_bytes
        result.mark("listed", time.perf_counter(), started)
        predicted = self._predicted_sink(checkpoint, generation)
        if predicted is not None:  # settings the config alone shows would change the stored vectors
            from indexes.base import check_compatible

            sink, existing = predicted
            check_compatible(existing, sink.schema, sink.location)  # refused before the model loads
        encoder = self.scheduler.load_encoder()
        result.mark("encoder_ready", self.scheduler.marks.get("encoder_ready", time.perf_counter()), started)
        result.dtype = str(encoder.provenance().get("dtype"))
        sink = self.sink_for(encoder)
        # A job frozen since it took the lease must not reset or fence an output a newer job took
        # over, nor go on if its fence landed after the newer one's (Lease.check_held). The check
        # right before the fence is what stops a job frozen while it opened the output: the sink
        # cannot order two tokens itself (generations restart at 1 once a finished job removed
        # its lease file), so the lease file is the judge.
        lease.check_held("opening the output")
        self._open_output(sink, checkpoint, generation)
        failpoint("before_fence")
        lease.check_held("fencing the output")
        sink.fence(lease.token)  # only this lease's commits land from now on (a stalled writer's are refused)
        lease.check_held("fencing the output")
        result.load_seconds = time.perf_counter() - started
        result.mark("planned", started + result.load_seconds, started)
        checkpoint.save_job(job.to_yaml())
        if generation.mode == "incremental":  # rows of this pass carry its id: aborts never touch older rows
            shards = [dataclasses.replace(s, id=f"{s.id}@{generation.id}") for s in shards]
        done = checkpoint.completed(generation.id)
        if generation.mode != "incremental":
            check_source_unchanged(shards, done, job.source.uri)  # stale rows otherwise (SourceChanged, exit 2)
        pending = [s for s in shards if s.id not in done]
        result.shards_total = len(shards)
        result.shards_skipped = len(shards) - len(pending)
        result.bytes_total = sum(s.size_bytes for s in pending)
        result.quarantine_uri = f"{job.output.uri.rstrip('/')}/_embedder/quarantine/"
        checkpoint.write_run(result.to_dict())
        plan = RunPlan(generation, shards, pending, encoder, sink, checkpoint)
        if pending and generation.mode == "incremental":
            self._plan_changes(plan, connector)
        return plan

    def _open_output(self, sink: Any, checkpoint: Checkpoint, generation: Generation) -> None:
        """Reembed passes remove the old rows once; the sink refuses rows of other settings (the vector
        fingerprint); a new pass is recorded only once the sink accepted the output."""
        if generation.mode == "reembed" and not generation.reset_done:
            checkpoint.write_generation(generation.to_record())
            sink.reset()  # the old vectors go: this pass embeds everything with the new model
            generation.reset_done = True
            checkpoint.write_generation(generation.to_record())
        sink.open()
        if generation.new:
            checkpoint.write_generation(generation.to_record())
            generation.new = False

    def _plan_changes(self, plan: RunPlan, connector: Any) -> None:
        """Incremental: what the output holds, for the change filter and the connector's version skips."""
        from embedder.incremental import ChangeFilter, ExistingChunks

        version_field = connector.version_field
        columns = ["id", "doc_id", "chunk_index", "content_hash"]
        if version_field and version_field in plan.sink.schema.names:
            columns.append(version_field)
        existing = ExistingChunks.from_table(plan.sink.read(columns=columns), version_field)
        plan.known_versions = existing.known_versions()
        if version_field and plan.known_versions is None:
            log.info("incremental: the output has no %r column; every document is parsed again", version_field)
        plan.change_filter = ChangeFilter(existing)

    def _execute(self, plan: RunPlan, result: RunResult) -> None:
        """The scheduler's events through the assembler until the stream ends or a drain ends it."""
        plan.sink.abort_many([s.id for s in plan.pending])
        self._encoder = plan.encoder  # the canary check's reference is preloaded after the first vectors
        assembler = self._assembler(plan, result)
        progress = ReadProgress(result, plan.pending)
        sampler = self.scheduler.sampler(plan.encoder)
        started = time.perf_counter()
        try:
            with closing(self.scheduler.execute(plan)) as events:
                for event in events:
                    assembler.check()
                    if self.control.abort.is_set():
                        raise RunFailed("stopped: " + ("lease lost" if self.control.lease_lost else "aborted"))
                    self._take(event, assembler, progress, result, sampler)
                    if self.control.drained(assembler.started, assembler.unfinished):
                        break
                assembler.wait()  # commits every complete shard still queued for the committer
            if assembler.unfinished and not self.control.draining:
                raise RunFailed(f"pipeline ended with {len(assembler.unfinished)} shard(s) unfinished")
        finally:
            self.control.abort.set()  # whatever still runs stops now
            result.unfinished_shards = sorted(assembler.unfinished)
            result.interrupted_shards = sorted(s for s in assembler.unfinished if s in assembler.started)
            assembler.discard_all()
            stats = self.scheduler.stats()
            result.encoders = stats.encoders
            result.encode_seconds = stats.encode_seconds
            if stats.tokens_per_second is not None:
                result.encoder_tokens_per_second = stats.tokens_per_second
            sampler.finish(result)
            result.pipeline_seconds = time.perf_counter() - started

    def _assembler(self, plan: RunPlan, result: RunResult) -> ShardAssembler:
        from embedder.memory import HeapTrimmer

        trimmer = HeapTrimmer()

        def on_commit(_result: RunResult) -> None:
            result.mark("first_commit", time.perf_counter(), self._started)
            # On the committer thread, once a shard's staged rows and chunks are freed: glibc keeps
            # freed memory in fragmented arenas, and without this the runner's RSS creeps up.
            trimmer.maybe_trim()
            result.heap_trim_seconds = trimmer.seconds
            if self.on_progress:
                self.on_progress(result, 0)

        assembler = ShardAssembler(
            plan.pending, plan.sink, plan.checkpoint, result, self.control.abort,
            on_commit=on_commit, canaries=self.canaries, background=True,
        )
        assembler.generation = plan.generation.id
        return assembler

    def _take(
        self, event: Event, assembler: ShardAssembler, progress: ReadProgress, result: RunResult, sampler: TimelineSampler
    ) -> None:
        """One event of the scheduler's stream."""
        if isinstance(event, EncodedBlock):
            if "first_vectors" not in result.startup:
                result.mark("first_vectors", time.perf_counter(), self._started)
                if self.canaries.size:  # not earlier: loading it would compete with the start-up
                    self._preload_reference(self._encoder)
            vectors = corrupt(event.vectors)
            failpoint("mid_encode")
            progress.chunks(event.chunks)
            assembler.add_vectors(event.chunks, vectors)
            sampler.sample(result)
            if self.on_progress:
                self.on_progress(result, len(event.chunks))
        elif isinstance(event, ShardStarted):
            assembler.started.setdefault(event.shard_id, event.at)
        elif isinstance(event, ShardFinished):
            failpoint("after_read")
            progress.end(event.end)
            assembler.end_shard(event.end)

    def _finish(self, plan: RunPlan, result: RunResult) -> None:
        """canaries → prune → finish: check the vectors, drop replaced rows, compact and index."""
        self._check_canaries(plan.encoder, result)
        checkpoint, sink, generation = plan.checkpoint, plan.sink, plan.generation
        if generation.mode == "incremental":
            self._prune(plan, result)
        result.output_rows = sink.count_rows()
        if not result.output_rows:  # "done" with nothing embedded would tell the user nothing
            message = empty_output_error(result, checkpoint, self.job.source.uri)
            checkpoint.forget_completions(generation.id)  # a rerun with a fixed job redoes them
            raise RunFailed(message)
        checkpoint.forget_shards_except({s.id for s in plan.shards})
        failpoint("during_finish")
        sink.finish()
        result.indexes = getattr(sink, "index_report", None) or None
        generation.complete = True
        checkpoint.write_generation(generation.to_record())
        result.state = "done"

    def _prune(self, plan: RunPlan, result: RunResult) -> None:
        """Removes old rows of re-embedded chunks, shrunk documents and (deletes: true) vanished ones."""
        from embedder.incremental import plan_prune

        current = {s.id for s in plan.shards}
        table = plan.sink.read(columns=["id", "doc_id", "shard_id"])
        prune, deleted = plan_prune(table, plan.checkpoint.changes(current), current, self.job.output.deletes)
        if prune:
            plan.sink.delete_rows(prune)
        result.deleted += deleted

    def _close(self, result: RunResult, checkpoint: Checkpoint, lease: Any, started: float) -> None:
        """The run record, the lease released, the scheduler torn down (whatever happened)."""
        job = self.job
        for milestone, at in self.scheduler.marks.items():
            result.mark(milestone, at, started)
        result.startup = dict(sorted(result.startup.items(), key=lambda item: item[1]))
        result.seconds = time.perf_counter() - started
        result.tokens_per_second = result.tokens / result.pipeline_seconds if result.pipeline_seconds > 0 else 0.0
        hourly = job.runner.gpu_hourly_usd
        result.add_cost(None if hourly is None else hourly * self.scheduler.billed_gpus())
        result.ended_at = time.time()
        try:
            if result.shards_total or result.state != "failed":
                checkpoint.write_run(result.to_dict())
        finally:
            lease.release()
            self.scheduler.teardown()
            if result.state == "failed" and not result.shards_total:
                _remove_if_empty(job.output.uri)  # a refused job leaves no empty output behind

    # --- the sink and the reference check ---------------------------------------------------

    def sink_for(self, encoder: Any) -> Any:
        """The job's sink (not opened), its schema carrying the encoder's and chunker's provenance:
        what the run writes with and what ``plan`` checks the stored rows against."""
        from embedder.chunking import Chunker
        from embedder.schema import output_schema

        job = self.job
        provenance = {**encoder.provenance(), "chunking": Chunker.for_encoder(encoder, job.chunking).settings()}
        schema = output_schema(encoder.dim, job.source.metadata_fields, provenance)
        return sink_registry().SINKS.get(job.output.sink)(job.output, schema)

    def _preload_sink(self) -> None:
        """Imports the sink's libraries (``Sink.preload``) once the scheduler has started, so that on
        Ray the import overlaps the encoder actors loading the model; ``open`` later finds them
        imported. In this thread: importing them in a background thread while this one imported
        torch made ``import torch`` fail now and then ("cannot import name 'fft' from partially
        initialized module 'torch'", 1 of 42 quickstart runs on a loaded 2-core machine): CPython
        breaks an import-lock cycle between two threads by handing one a half-initialised module."""
        sink_class = sink_registry().SINKS.get(self.job.output.sink)
        try:
            sink_class.preload()
        except Exception:  # open() reports a missing library with its fix
            log.debug("preloading the sink's libraries failed", exc_info=True)

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

    # --- what a run would do ----------------------------------------------------------------

    def plan(self) -> dict[str, Any]:
        """What ``run`` would do, without doing it: no lease, no file written (``--dry-run``).

        Lists the shards as the run would (the output's stored shard size included; the reader
        count the scheduler would plan for — for Ray, the cluster's CPUs the encoders leave), says
        which are done and which would be embedded, and checks the job's vector fingerprint against
        the rows the output holds. The model is loaded (on this machine) to know its fingerprint,
        unless the config alone shows a refusal (``embedder.execution.fingerprint``).
        """
        from embedder.checkpoint import Checkpoint

        job = self.job
        checkpoint = Checkpoint(job.output.uri, job.output.storage_options)
        current = checkpoint.generation()
        generation = resolve_generation(current, job.output.mode, "dry-run")
        readers = self.scheduler.planned_read_parallelism()
        shards, shard_bytes = plan_shards(make_connector(job), readers, generation.shard_bytes)
        predicted = self._predicted_sink(checkpoint, generation)
        fingerprint, refused = self._planned_fingerprint(predicted[0], generation, current) if predicted else ("", None)
        if refused is None:  # a refusal the config alone shows needs no model; anything else does
            from embedder.models.encoder import Encoder

            fingerprint, refused = self._planned_fingerprint(self.sink_for(Encoder.load(job.model)), generation, current)
        if generation.mode == "incremental":
            shards = [dataclasses.replace(s, id=f"{s.id}@{generation.id}") for s in shards]
        done = {} if generation.new else checkpoint.completed(generation.id)
        pending = [s for s in shards if s.id not in done]
        return {
            "output": job.output.uri,
            "sink": job.output.sink,
            "source": job.source.uri,
            "format": job.source.format,
            "model": job.model.name,
            "mode": generation.mode,
            "pass": generation.describe,
            "readers": min(readers, max(1, len(pending))),
            "shard_bytes": shard_bytes,
            "shards_total": len(shards),
            "shards_done": len(shards) - len(pending),
            "shards_to_embed": len(pending),
            "bytes_to_read": sum(s.size_bytes for s in pending),
            "first_shards": [s.id for s in pending[:5]],
            "incremental": "unchanged chunks are skipped, changed ones replaced" if generation.mode == "incremental" else None,
            "fingerprint": fingerprint,
            "refused": refused,
        }

    def _predicted_sink(self, checkpoint: Checkpoint, generation: Generation) -> tuple[Any, Any] | None:
        """The job's sink (not opened) with the schema its encoder would give, predicted from the
        stored rows' provenance and the saved job without loading the model, and the stored schema;
        None when nothing is stored, the pass replaces it, or only the model can tell
        (``embedder.execution.fingerprint.predicted_provenance``)."""
        import yaml

        from embedder.execution.fingerprint import predicted_provenance
        from embedder.schema import output_schema, provenance_of

        job = self.job
        if generation.mode == "reembed" and not generation.reset_done:
            return None  # the stored rows are replaced, whatever made them
        saved_yaml = checkpoint.load_job_yaml()
        if saved_yaml is None:
            return None
        sink_class = sink_registry().SINKS.get(job.output.sink)
        try:
            saved = Job.model_validate(yaml.safe_load(saved_yaml))
            probe_config = job.output.model_copy(update={"vector_dtype": "float32"})
            existing = sink_class(probe_config, output_schema(8)).existing_schema()
            if existing is None:
                return None
            predicted = predicted_provenance(provenance_of(existing), saved, job)
            if predicted is None:
                return None
            dim, provenance = predicted
            return sink_class(job.output, output_schema(dim, job.source.metadata_fields, provenance)), existing
        except Exception as err:  # whatever goes wrong here, the load path below decides as before
            log.debug("fingerprint not predicted before the model load: %s", err)
            return None

    def _planned_fingerprint(self, sink: Any, generation: Generation, current: dict | None) -> tuple[str, str | None]:
        """Whether the job's vector fingerprint matches the stored rows, and the refusal if not."""
        from indexes.base import SinkError, check_compatible

        replacing = generation.mode == "reembed" and not generation.reset_done
        if replacing and current is not None:
            return "reembed: every stored row is replaced", None
        existing = None if replacing else sink.existing_schema()
        if existing is None:
            return "new output: nothing stored yet", None
        try:
            check_compatible(existing, sink.schema, self.job.output.uri)
        except SinkError as err:
            return "differs from the stored rows: the run would be refused (exit 2)", str(err)
        return "matches the stored rows", None


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
