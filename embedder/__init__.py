"""embedder: embed whole corpora with BGE/E5-class models, padding-free, resumable.

Public API (imported lazily so ``import embedder`` and ``embedder --help`` start fast)::

    from embedder import Job, embed, run, open_index
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Job", "RunResult", "embed", "load_job", "open_index", "run", "__version__"]


def _install_lancedb_hook() -> None:
    """LanceDB-native text search: the ``embedder`` embedding function, registered lazily."""
    from embedder.lancedb_hook import install

    install()


_install_lancedb_hook()


def __getattr__(name: str) -> Any:
    if name == "Job":
        from embedder.config import Job

        return Job
    if name in ("run", "open_index", "load_job", "embed"):
        from embedder import api

        return getattr(api, name)
    if name == "RunResult":
        from embedder.execution.result import RunResult

        return RunResult
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")
