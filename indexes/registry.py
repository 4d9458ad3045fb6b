"""The sink registry. Built-in sinks are imported on first lookup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from embedder.registry import Registry

if TYPE_CHECKING:
    from indexes.base import Sink

SINKS: Registry[Sink] = Registry("sink", {"lance": "indexes.lance", "parquet": "indexes.parquet"})
register_sink = SINKS.register


def detect_sink(uri: str) -> str:
    """``parquet`` for URIs that name a Parquet dataset (``.../x.parquet`` or ``.../parquet/``), else ``lance``."""
    lowered = uri.rstrip("/").lower()
    return "parquet" if lowered.endswith(".parquet") or lowered.endswith("/parquet") or lowered.endswith("-parquet") else "lance"


def check_output_location(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuses an output that is an existing file, or lies under one, before anything is written.

    Both sinks write a folder (a LanceDB database, or ``part-*.parquet`` files plus ``_embedder/``),
    so a file there would only fail later, deep in the lease or the sink, with ``Not a directory``.
    Only local paths (and ``file://``) are checked: on object stores a key and a prefix of the same
    name live side by side, so writing under ``s3://b/x.txt/`` works even where ``s3://b/x.txt`` exists.

    Raises:
        SinkError: the output (or a folder above it) is a file; the message names the fix.
    """
    from embedder.storage import filesystem, is_local

    if "://" in uri and not uri.startswith("file://"):
        return
    fs, path = filesystem(uri, dict(storage_options or {}))
    if not is_local(fs):
        return
    from indexes.base import SinkError

    fix = (
        "the output is a LanceDB database or a folder of Parquet files; "
        "choose a new path (--output / output.uri)"
    )
    if os.path.isfile(path):
        raise SinkError(f"output {uri!r} is a file, not a folder: {fix}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise SinkError(f"output {uri!r} lies under {parent!r}, which is a file, not a folder: {fix}")
