"""Progress of a run where people look: a rich bar on a terminal, plain log lines everywhere else.

On a terminal (stderr is a tty) ``RunProgress`` draws a rich bar of shards with documents read,
chunks, tokens/s and the ETA. Anywhere else (cron, Kubernetes, ``| tee``, stderr to a file) it
writes one line to stderr about every ``interval_s`` seconds::

    embedder: shards 3/14 · 12,034 docs · 40,211 chunks · 9.8M tokens · 812,000 tok/s · 41% of input read · ETA 2m10s

and, from ``finish(result)``, one last line with the counts of the run's summary. The figures come
from the running ``RunResult`` the runner hands to ``update`` (its ``on_progress`` callback, called
from the runner's threads after commits and encoded batches): documents are ``documents_read``
(counted as readers read them) when the runner counts those, else ``documents`` (committed); the
ETA is the pipeline's time so far scaled by the share of input bytes still unread
(``bytes_read`` / ``bytes_total``), absent when the runner does not report input bytes.

Example:
    >>> with RunProgress(interval_s=10.0) as progress:
    ...     result = run(job, on_progress=progress.update)
    ...     progress.finish(result)
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

INTERVAL_S = 10.0
"""Seconds between two log lines when stderr is not a terminal (``EMBEDDER_PROGRESS_INTERVAL_S`` in the CLI)."""
INTERVAL_ENV = "EMBEDDER_PROGRESS_INTERVAL_S"
BAR_REDRAW_S = 0.1  # the terminal bar redraws at most this often (the final state always)


def format_tokens(count: int) -> str:
    """A token count for a glance: exact below a million, then ``9.8M``, ``1.23B``."""
    if count < 1_000_000:
        return f"{count:,}"
    if count < 1_000_000_000:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e9:.2f}B"


def format_duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(work_seconds: float, bytes_read: int, bytes_total: int) -> float | None:
    """Seconds left, assuming the rest of the input goes as fast as what was read so far.

    Args:
        work_seconds: Time the pipeline has been running (model loading excluded).
        bytes_read: Input bytes of the shards whose reading finished.
        bytes_total: Input bytes of all the shards this run processes.

    Returns:
        None when there is nothing to extrapolate from (no byte counts, nothing read yet) or when
        the whole input is read (what is left is encoding and committing the last batches).
    """
    if bytes_total <= 0 or bytes_read <= 0 or bytes_read >= bytes_total or work_seconds <= 0:
        return None
    done = bytes_read / bytes_total
    return work_seconds * (1.0 - done) / done


def documents_seen(result: Any) -> int:
    """Documents read so far: ``documents_read`` where the runner counts it, else committed ``documents``."""
    read = getattr(result, "documents_read", 0) or 0
    return read if read > 0 else result.documents


def _work_seconds(result: Any, now: float) -> float:
    """The pipeline's running time: since the run started, less listing shards and loading the model."""
    if result.pipeline_seconds > 0:  # the pipeline ended (canaries, indexes are not its work)
        return result.pipeline_seconds
    return max(0.0, now - result.started_at - result.load_seconds)


def _shards(result: Any) -> str:
    pending = result.shards_total - result.shards_skipped
    text = f"shards {result.shards_done}/{pending}"
    return text + (f" (+{result.shards_skipped} done before)" if result.shards_skipped else "")


def progress_fields(result: Any, now: float | None = None) -> list[str]:
    """The figures of a running run, after its shard count: docs, chunks, tokens, tok/s, input read, ETA.

    Args:
        result: The running ``RunResult``.
        now: Wall-clock time (``time.time()``) to measure against; default now.
    """
    now = time.time() if now is None else now
    work = _work_seconds(result, now)
    fields = [
        f"{documents_seen(result):,} docs",
        f"{result.chunks:,} chunks",
        f"{format_tokens(result.tokens)} tokens",
        f"{result.tokens / work:,.0f} tok/s" if work > 0 else "— tok/s",
    ]
    bytes_total = getattr(result, "bytes_total", 0) or 0
    bytes_read = getattr(result, "bytes_read", 0) or 0
    if bytes_total > 0:
        fields.append(f"{min(bytes_read / bytes_total, 1.0):.0%} of input read")
        eta = eta_seconds(work, bytes_read, bytes_total)
        if eta is not None:
            fields.append(f"ETA {format_duration(eta)}")
    if result.bad_records:
        fields.append(f"{result.bad_records:,} quarantined")
    if result.pipeline_seconds > 0:
        fields.append("finishing: canary check, indexes")
    return fields


def progress_line(result: Any, now: float | None = None) -> str:
    """One log line of a running run (see the module docstring)."""
    return " · ".join([f"embedder: {_shards(result)}", *progress_fields(result, now)])


def final_fields(result: Any) -> list[str]:
    """The figures of a finished run, as its summary prints them: committed docs, exact tokens."""
    fields = [
        f"{result.documents:,} docs",
        f"{result.chunks:,} chunks",
        f"{result.tokens:,} tokens",
        f"{result.tokens_per_second:,.0f} tok/s",
    ]
    if result.bad_records:
        fields.append(f"{result.bad_records:,} quarantined")
    return fields


def final_line(result: Any) -> str:
    """The last log line: the same documents, chunks and tokens as the run's summary."""
    return " · ".join(
        [f"embedder: {result.state}", _shards(result), *final_fields(result), f"{format_duration(result.seconds)} in all"]
    )


class RunProgress:
    """A context manager whose ``update`` is the runner's ``on_progress`` callback.

    Args:
        enabled: False: no output at all (``--no-progress``, ``runner.show_progress: false``).
        interval_s: Seconds between two log lines when the stream is not a terminal.
        stream: Where progress goes (default: ``sys.stderr``).
        interactive: Draw a rich bar (True) or write log lines (False); default: whether
            ``stream`` is a terminal.

    ``update`` may be called from several threads. Call ``finish(result)`` with the run's returned
    result: the bar's last state, or the last log line, then shows exactly the summary's counts.
    """

    def __init__(
        self,
        enabled: bool = True,
        interval_s: float = INTERVAL_S,
        stream: IO[str] | None = None,
        interactive: bool | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self._lock = threading.Lock()
        self._result: Any = None
        self._finished = False
        self._progress: Any = None
        self._task: Any = None
        self._last_draw = 0.0
        self._stop = threading.Event()
        self._logger: threading.Thread | None = None

    def __enter__(self) -> RunProgress:
        if not self.enabled:
            return self
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("embed", total=None, stats="starting…")
        else:
            self._logger = threading.Thread(target=self._log_loop, name="embedder-progress", daemon=True)
            self._logger.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._logger is not None:
            self._logger.join(timeout=5)
        with self._lock:
            if not self._finished and self._result is not None:
                self._show_last(self._result, final=False)  # stopped by an error: the last state seen
            if self._progress is not None:
                self._progress.__exit__(*exc)
                self._progress = None

    def update(self, result: Any, _sequences: int) -> None:
        """The runner's ``on_progress``: keeps the result; the bar redraws at most every 0.1 s."""
        if not self.enabled:
            return
        self._result = result
        if self._progress is None:
            return  # log lines: the logger thread writes them on its own clock
        now = time.perf_counter()
        with self._lock:
            if self._finished or now - self._last_draw < BAR_REDRAW_S:
                return
            self._last_draw = now
            self._draw(result)

    def finish(self, result: Any) -> None:
        """Shows the run's final result: the bar's last state, or one last log line (once)."""
        if not self.enabled:
            return
        self._stop.set()
        if self._logger is not None:
            self._logger.join(timeout=5)
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._result = result
            self._show_last(result, final=True)

    def _show_last(self, result: Any, final: bool) -> None:
        if self._progress is not None:
            self._draw(result, final)
            self._progress.refresh()
        elif self._logger is not None:
            self._write(final_line(result) if final else progress_line(result))

    def _draw(self, result: Any, final: bool = False) -> None:
        total = result.shards_total - result.shards_skipped
        stats = " · ".join(final_fields(result) if final else progress_fields(result))
        self._progress.update(self._task, total=total, completed=result.shards_done, stats=stats)

    def _log_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            result = self._result
            if result is None:
                continue  # still loading the model: nothing counted yet
            with self._lock:
                if not self._finished:
                    self._write(progress_line(result))

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full log must not fail the run
            pass
