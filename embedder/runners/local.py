"""The local scheduler: every stage on this machine, on CPU, one GPU or several.

::

    reader processes (N)            packer thread              encoder threads (1 per device)   skeleton
    read shard → chunk+tokenize ──▶ change filter, pack by ──▶ encode, two batches in flight ──▶ events:
             (mp queue, bounded)    token budget (bounded)      (bounded queue)                  commit

Every queue is bounded, so memory does not grow with the corpus. Readers are separate processes
(started from a fork server while the runner is still small); the packer feeds one queue that all
encoders take batches from, so with ``runner.encoders: N`` each device encodes as fast as it can and
one committer (the skeleton's) writes. ShardStarted and ShardFinished events go straight to the
skeleton; encoded blocks follow from the encoders.

Stopping (``embedder.execution.control``): on a drain readers take no new shard and the stream ends once
every shard they started has ended; on an abort every thread stops at its next queue operation.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from typing import Any

from embedder.config import Job
from embedder.execution.events import IDLE, EncodedBlock, EncoderStats, Event, ShardFinished, ShardStarted
from embedder.execution.job import import_plugins, plugin_modules
from embedder.execution.plan import RunPlan
from embedder.execution.result import RunFailed, RunResult
from embedder.execution.skeleton import Run
from embedder.execution.telemetry import EncoderGroup, TimelineSampler
from embedder.pipeline.change import filter_changes
from embedder.pipeline.chunk import chunker_for
from embedder.pipeline.encode import EncodeMeter, encode_stream
from embedder.pipeline.read import make_connector, read_and_chunk
from embedder.records import PackedBatch, ShardEnd
from embedder.runners.base import Scheduler

log = logging.getLogger("embedder")

QUEUE_POLL_S = 0.2


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
    known_versions: Any = None,
    environ: dict[str, str] | None = None,
    runner_alive: Any = None,
    plugins: tuple[str, ...] = (),
) -> None:
    """Reads shards from ``tasks`` and streams their chunks to ``results`` (runs in a child process).

    ``known_versions``: incremental passes, the document versions the output holds (from the plan),
    so the connector skips unchanged documents unparsed. ``environ``: the runner's environment when
    it started the readers (a fork server's children would otherwise see the server's, from when it
    started: credentials set since would be missing).
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
    import_plugins(plugins)  # connectors the user's own modules register
    job = Job.model_validate_json(job_json)
    chunker = chunker_for(tokenizer_json, max_seq_length, overhead, job.chunking.model_dump_json())
    connector = make_connector(job)
    connector.known_versions = known_versions
    while not stop.is_set():
        try:
            shard = tasks.get(timeout=QUEUE_POLL_S)
        except queue.Empty:
            continue
        if shard is None:
            return
        results.put(("start", shard.id, time.time()))
        try:
            for item in read_and_chunk(connector, chunker, shard):
                results.put(item)
        except Exception:
            results.put(("error", shard.id, traceback.format_exc()))
            return


class _Halted(Exception):
    """Raised inside the scheduler's threads when the stream stops; ends them quietly."""


class _ReaderPool:
    """The reader processes of one ``execute``: a task queue of shards, a bounded result queue."""

    def __init__(self, job: Job, plan: RunPlan, workers: int) -> None:
        encoder = plan.encoder
        ctx = _reader_context()
        alive_r, self._alive_w = ctx.Pipe(duplex=False)  # readers see EOF once this process is gone
        self.tasks = ctx.Queue()
        self.results = ctx.Queue(maxsize=max(8, 4 * workers))
        self.stop = ctx.Event()
        for shard in plan.pending:
            self.tasks.put(shard)
        for _ in range(workers):
            self.tasks.put(None)
        args = (
            job.model_dump_json(), encoder.tokenizer_json, encoder.max_seq_length, encoder.layout.overhead,
            max(1, (os.cpu_count() or 1) // workers), self.tasks, self.results, self.stop,
            plan.known_versions, dict(os.environ), alive_r, tuple(plugin_modules(job)),
        )
        self.procs = [
            ctx.Process(target=_reader_main, args=args, daemon=True, name=f"embedder-reader-{i}") for i in range(workers)
        ]
        with _without_main_module():
            for p in self.procs:
                p.start()
        alive_r.close()  # the readers hold their copies; this process keeps only the write end

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid and p.is_alive()]

    def any_alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
        self.results.cancel_join_thread()
        self.tasks.cancel_join_thread()
        self._alive_w.close()


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


# --- the scheduler --------------------------------------------------------------------------


class LocalScheduler(Scheduler):
    """Reader processes, one packer, one encoder thread per device (``runner.encoders``)."""

    name = "local"

    def __init__(self, job: Job, control: Any) -> None:
        super().__init__(job, control)
        self.encoders: list[Any] = []
        self._readers: _ReaderPool | None = None
        self._meters: list[EncodeMeter] = []
        self._wall = 0.0

    def setup(self) -> None:
        """Starts the reader processes' fork server while this process is still small."""
        _start_reader_server()

    def load_encoder(self) -> Any:
        """One model per device of ``encoder_devices``; the first is the run's encoder."""
        from embedder.models.encoder import Encoder

        devices = encoder_devices(self.job)
        if len(devices) == 1:
            self.encoders = [Encoder.load(self.job.model, fidelity_min_cosine=self.job.validation.min_cosine)]
            return self.encoders[0]
        import torch

        for device in devices:
            with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
                model = self.job.model.model_copy(update={"device": device})
                self.encoders.append(Encoder.load(model, fidelity_min_cosine=self.job.validation.min_cosine))
        log.info("%d encoders: %s", len(devices), ", ".join(devices))
        return self.encoders[0]

    def sampler(self, encoder: Any) -> TimelineSampler:
        return TimelineSampler(EncoderGroup(self.encoders or [encoder]), reader_pids=self._reader_pids)

    def _reader_pids(self) -> list[int]:
        return self._readers.pids() if self._readers is not None else []

    def stats(self) -> EncoderStats:
        wall = max(self._wall, 1e-9)
        return EncoderStats(
            encoders=len(self.encoders) or 1,
            tokens_per_second=[round(m.tokens / wall, 1) for m in self._meters],
            encode_seconds=sum(m.seconds for m in self._meters),
        )

    def execute(self, plan: RunPlan) -> Iterator[Event]:
        """Starts the readers, the packer and the encoders, and streams their events."""
        halt = threading.Event()
        started = time.perf_counter()
        self._readers = readers = _ReaderPool(self.job, plan, max(1, min(len(plan.pending), self.read_parallelism())))
        batches: queue.Queue = queue.Queue(maxsize=4)
        events: queue.Queue = queue.Queue(maxsize=4 + 4 * len(self.encoders))
        failure: list[BaseException] = []
        self._meters = [EncodeMeter() for _ in self.encoders]
        threads = [
            threading.Thread(target=self._pack, args=(plan, batches, events, halt, failure), name="embedder-pack", daemon=True),
            *(threading.Thread(target=self._encode, args=(i, batches, events, halt, failure), name=f"embedder-encode-{i}",
                               daemon=True) for i in range(len(self.encoders))),
        ]
        for t in threads:
            t.start()
        try:
            yield from self._stream(events, threads, failure)
        finally:
            halt.set()
            readers.stop.set()
            for t in threads:
                t.join(timeout=5)
            self._wall = time.perf_counter() - started
            readers.close()
            self._readers = None

    def _stream(self, events: queue.Queue, threads: list[threading.Thread], failure: list[BaseException]) -> Iterator[Event]:
        """The events queue until every encoder has ended its stream (``None`` each)."""
        ended = 0
        while ended < len(self.encoders):
            if failure:
                raise failure[0]
            try:
                item = events.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and events.empty():
                    if failure:
                        raise failure[0] from None
                    return  # the skeleton sees which shards never finished
                yield IDLE
                continue
            if item is None:
                ended += 1
                continue
            yield item

    def _put(self, q: queue.Queue, item: Any, halt: threading.Event) -> None:
        while True:
            if halt.is_set() or self.control.abort.is_set():
                raise _Halted
            try:
                q.put(item, timeout=QUEUE_POLL_S)
                return
            except queue.Full:
                continue

    def _read(self, plan: RunPlan, events: queue.Queue, halt: threading.Event) -> Iterator[list | ShardEnd]:
        """The readers' results: chunk blocks and shard ends (starts go to ``events`` as they come),
        until every shard has ended, or on a drain every shard the readers started."""
        readers = self._readers
        assert readers is not None
        started = ended = 0
        while ended < len(plan.pending):
            if self.control.draining:
                readers.stop.set()  # readers take no new shard
            try:
                item = readers.results.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                if halt.is_set() or self.control.abort.is_set():
                    raise _Halted from None
                if not readers.any_alive() and readers.results.empty():
                    if self.control.draining and ended == started:
                        return  # drained: every started shard has ended
                    raise RunFailed("reader processes exited before finishing their shards") from None
                continue
            if isinstance(item, tuple) and item[0] == "start":
                started += 1
                self._put(events, ShardStarted(item[1], item[2]), halt)
            elif isinstance(item, tuple) and item[0] == "error":
                raise RunFailed(f"reading shard {item[1]!r} failed:\n{item[2]}")
            else:
                ended += isinstance(item, ShardEnd)
                yield item

    def _pack(self, plan: RunPlan, batches: queue.Queue, events: queue.Queue, halt: threading.Event,
              failure: list[BaseException]) -> None:
        """Packer thread: reader results → change filter → token-budget batches; shard ends to the
        skeleton (the assembler takes them in any order)."""
        from embedder.packing import TokenBudgetPacker

        try:
            packer = TokenBudgetPacker(plan.encoder.layout, plan.encoder.token_budget)
            for item in filter_changes(self._read(plan, events, halt), plan.change_filter):
                if isinstance(item, ShardEnd):
                    self._put(events, ShardFinished(item), halt)
                    continue
                packer.token_budget = min(e.token_budget for e in self.encoders)  # follows OOM back-offs
                for batch in packer.add(item):
                    self._put(batches, batch, halt)
            for batch in packer.flush():
                self._put(batches, batch, halt)
            for _ in self.encoders:
                self._put(batches, None, halt)  # one end of stream per encoder
        except _Halted:
            return
        except BaseException as err:
            failure.append(err)
            halt.set()

    def _batches(self, batches: queue.Queue, halt: threading.Event) -> Iterator[PackedBatch | None]:
        """An encoder's input: batches until its end of stream; ``None`` when the input is idle."""
        while True:
            try:
                item = batches.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                if halt.is_set() or self.control.abort.is_set():
                    raise _Halted from None
                yield None  # input is slow: hand over what is done
                continue
            if item is None:
                return
            yield item

    def _encode(self, index: int, batches: queue.Queue, events: queue.Queue, halt: threading.Event,
                failure: list[BaseException]) -> None:
        """Encoder thread ``index``: its device, batches from the one packer, two in flight."""
        encoder = self.encoders[index]
        try:
            if len(self.encoders) > 1 and encoder.device.type == "cuda":
                import torch

                torch.cuda.set_device(encoder.device)  # the fused kernels launch on the current device
            for batch, vectors in encode_stream(encoder, self._batches(batches, halt), self._meters[index]):
                self._put(events, EncodedBlock(batch.chunks or [], vectors), halt)
            self._put(events, None, halt)
        except _Halted:
            return
        except BaseException as err:
            failure.append(err)
            halt.set()


class LocalRunner(Run):
    """A run with the local scheduler (``runner.kind: local``): see ``embedder.execution.skeleton.Run``."""

    def __init__(
        self, job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
    ) -> None:
        super().__init__(job, LocalScheduler, on_progress=on_progress, force_unlock=force_unlock)


def run_local(
    job: Job, on_progress: Callable[[RunResult, int], None] | None = None, force_unlock: bool = False
) -> RunResult:
    """Runs ``job`` with the local runner (see ``LocalRunner``)."""
    return LocalRunner(job, on_progress=on_progress, force_unlock=force_unlock).run()


__all__ = ["LocalRunner", "LocalScheduler", "RunFailed", "RunResult", "encoder_devices", "run_local"]
