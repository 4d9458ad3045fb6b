"""Progress bars for long runs (rich): shards, documents, chunks and tokens/s."""

from __future__ import annotations

import time
from typing import Any


class RunProgress:
    """A context manager whose ``update`` is the runner's ``on_progress`` callback.

    Disabled (a no-op) when not attached to a terminal, so logs and CI output stay clean.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._started = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> RunProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("embed", total=None, stats="starting…")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, result: Any, _sequences: int) -> None:
        if self._progress is None:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        stats = (
            f"{result.documents:,} docs · {result.chunks:,} chunks · {result.tokens / elapsed:,.0f} tok/s"
            + (f" · {result.bad_records:,} quarantined" if result.bad_records else "")
        )
        total = result.shards_total - result.shards_skipped
        self._progress.update(self._task, total=total, completed=result.shards_done, stats=stats)
