"""The connector registry and format detection.

Built-in connectors are imported on first lookup, so ``embedder --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedder.registry import Registry

if TYPE_CHECKING:
    from connectors.base import Connector

CONNECTORS: Registry[Connector] = Registry(
    "format",
    {
        "jsonl": "connectors.jsonl",
        "parquet": "connectors.parquet",
        "text": "connectors.text",
        "wikipedia": "connectors.wikipedia",
        "lance": "connectors.lance",
        "memory": "connectors.memory",
    },
)
register_connector = CONNECTORS.register

# File-name endings → format, checked in order (the first match wins).
_SUFFIX_FORMATS: list[tuple[str, str]] = [
    ("-multistream-index.txt.bz2", "wikipedia"),
    (".xml.bz2", "wikipedia"),
    (".xml", "wikipedia"),
    (".jsonl.zstd", "jsonl"),
    (".ndjson.gz", "jsonl"),
    (".ndjson.zst", "jsonl"),
    (".json.zst", "jsonl"),
    (".parq", "parquet"),
    (".text", "text"),
    (".jsonl.gz", "jsonl"),
    (".jsonl.zst", "jsonl"),
    (".json.gz", "jsonl"),
    (".jsonl", "jsonl"),
    (".ndjson", "jsonl"),
    (".json", "jsonl"),
    (".parquet", "parquet"),
    (".lance", "lance"),
    (".txt", "text"),
    (".md", "text"),
]


def detect_format(uri: str) -> str | None:
    """Guesses the format from a file name or glob; None when it cannot tell (e.g. a folder)."""
    name = uri.rstrip("/").lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return fmt
    return None
