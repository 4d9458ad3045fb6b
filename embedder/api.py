"""The Python API: build a ``Job``, ``run`` it, ``open_index`` the output and search it.

Example:
    >>> from embedder import Job, run, open_index
    >>> result = run(Job.model_validate({"source": {"uri": "docs/"}, "output": {"uri": "out/db"}}))
    >>> hits = open_index("out/db").search("how do I reset my password?", k=5)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedder.config import Job, build_job, load_job_dict
from embedder.execution.result import RunResult


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Loads a YAML job file, applying ``section.key=value`` overrides."""
    return build_job(load_job_dict(path), overrides)


def run(
    job: Job | dict[str, Any],
    on_progress: Callable[[RunResult, int], None] | None = None,
    force_unlock: bool = False,
) -> RunResult:
    """Runs a job to completion and returns its counts and timings.

    A run stopped by SIGTERM/SIGINT or a spot notice returns with ``state == "interrupted"``;
    running the same job again resumes it.

    Args:
        job: A ``Job`` or a dict with its sections.
        on_progress: Optional callback ``(result_so_far, sequences_just_encoded)``.
        force_unlock: Take the output's lease even if another job holds it (it must be dead).

    Raises:
        embedder.lease.LeaseHeld: another live job writes the same output.
    """
    if isinstance(job, dict):
        job = build_job(job)
    if job.runner.kind == "ray":
        from embedder.runners.ray import run_ray  # type: ignore[import-not-found]

        return run_ray(job, on_progress=on_progress, force_unlock=force_unlock)
    from embedder.runners.local import run_local

    return run_local(job, on_progress=on_progress, force_unlock=force_unlock)


def plan(job: Job | dict[str, Any]) -> dict[str, Any]:
    """What ``run(job)`` would do, writing nothing: shards (done, to embed), the shard size, and
    whether the job's vector fingerprint matches the rows the output holds (``refused`` holds the
    error the run would stop with). See ``LocalRunner.plan``."""
    if isinstance(job, dict):
        job = build_job(job)
    from embedder.runners.local import LocalRunner

    return LocalRunner(job).plan()


def open_index(uri: str, storage_options: dict[str, Any] | None = None, table: str = "chunks", **kwargs: Any):  # noqa: ANN201
    """Opens an output (LanceDB or Parquet) for search; see ``indexes.search.open_index``."""
    from indexes.search import open_index as _open_index

    return _open_index(uri, storage_options=storage_options, table=table, **kwargs)
