"""The sink registry. Built-in sinks are imported on first lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedder.registry import Registry

if TYPE_CHECKING:
    from indexes.base import Sink

SINKS: Registry[Sink] = Registry("sink", {"lance": "indexes.lance", "parquet": "indexes.parquet"})
register_sink = SINKS.register


def detect_sink(uri: str) -> str:
    """``parquet`` for URIs that name a Parquet dataset (``.../x.parquet`` or ``.../parquet/``), else ``lance``."""
    lowered = uri.rstrip("/").lower()
    return "parquet" if lowered.endswith(".parquet") or lowered.endswith("/parquet") or lowered.endswith("-parquet") else "lance"
