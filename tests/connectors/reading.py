"""Helpers the connector tests share: read a whole source through the error-policy wrapper."""

from __future__ import annotations

from connectors.base import Connector
from embedder.records import BadRecord, Document


def read_all(connector: Connector) -> list[Document | BadRecord]:
    """Every item of every shard, in listing order, as ``Connector.documents`` yields them."""
    return [item for shard in connector.list_shards() for item in connector.documents(shard)]


def docs_of(items: list[Document | BadRecord]) -> list[Document]:
    return [item for item in items if isinstance(item, Document)]


def bad_of(items: list[Document | BadRecord]) -> list[BadRecord]:
    return [item for item in items if isinstance(item, BadRecord)]
