"""Registers embedder's LanceDB embedding function when LanceDB is imported, without importing it.

``import embedder`` calls ``install()``: if LanceDB is loaded already, the function is registered at
once; otherwise a one-shot finder on ``sys.meta_path`` waits for ``import lancedb`` and registers it
right after LanceDB's own ``__init__`` ran (``indexes.lancedb_embedding``). So ``import embedder``
stays fast and ``lancedb.connect(out).open_table("chunks").search("text")`` finds the function.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger("embedder")


def _register() -> None:
    try:
        import indexes.lancedb_embedding  # noqa: F401 - registers on import
    except Exception:  # an unusual LanceDB must not break the user's import of it
        log.debug("could not register the embedder function with LanceDB", exc_info=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``lancedb`` as the other finders do, and registers the function after it loads."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "lancedb":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Registers now if LanceDB is loaded, else once it is (idempotent)."""
    if "lancedb" in sys.modules:
        if "indexes.lancedb_embedding" not in sys.modules:
            _register()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
