"""Lance tables as a source: any table with a text column; our own output re-embedded from its text."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from connectors.base import ConnectorError
from connectors.registry import CONNECTORS
from embedder import run
from embedder.config import SourceConfig, build_job
from embedder.records import Document
from tests.connectors.reading import read_all

QUICKSTART = "examples/quickstart/docs.jsonl"



def test_any_table_with_a_text_column(tmp_path) -> None:
    db = lancedb.connect(str(tmp_path / "db"))
    rows = [{"key": f"k{i}", "body": f"text number {i}" if i != 3 else "  ", "lang": "en"} for i in range(50)]
    table = db.create_table("notes", pa.Table.from_pylist(rows[:25]))
    table.add(pa.Table.from_pylist(rows[25:]))  # two fragments
    config = SourceConfig(uri=str(tmp_path / "db"), format="lance", id_field="key", text_field="body",
                          title_field=None, metadata_fields=["lang"], shard_size_mb=0.000001, options={"table": "notes"})
    connector = CONNECTORS.get("lance")(config)
    shards = connector.list_shards()
    assert len(shards) == 2 and [s.id for s in shards] == [s.id for s in connector.list_shards()]
    items = read_all(connector)
    docs = [i for i in items if isinstance(i, Document)]
    assert [d.id for d in docs] == [f"k{i}" for i in range(50) if i != 3]
    assert docs[0].metadata == {"lang": "en"}
    assert len(items) - len(docs) == 1  # the blank text is quarantined


def test_missing_table_and_column_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ConnectorError, match="no Lance table"):
        CONNECTORS.get("lance")(SourceConfig(uri=str(tmp_path / "nothing"), format="lance")).list_shards()
    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("chunks", pa.Table.from_pylist([{"id": "a", "body": "x"}]))
    with pytest.raises(ConnectorError, match="no text column 'text'"):
        CONNECTORS.get("lance")(SourceConfig(uri=str(tmp_path / "db"), format="lance")).list_shards()


def test_reembed_our_output_from_stored_text(tmp_path, minilm) -> None:
    first = tmp_path / "first"
    run(build_job({"source": {"uri": QUICKSTART}, "output": {"uri": str(first), "sink": "lance"},
                   "model": {"device": "cpu"}, "runner": {"show_progress": False}}))
    second = tmp_path / "second"
    run(build_job({"source": {"uri": str(first), "format": "lance"},
                   "output": {"uri": str(second), "sink": "lance"},
                   "model": {"device": "cpu"}, "runner": {"show_progress": False}}))
    old = lancedb.connect(str(first)).open_table("chunks").to_arrow().sort_by("id")
    new = lancedb.connect(str(second)).open_table("chunks").to_arrow().sort_by("doc_id")
    assert new.column("doc_id").to_pylist() == old.column("id").to_pylist()
    assert new.column("id").to_pylist() == [f"{i}#0" for i in old.column("id").to_pylist()]
    assert new.column("text").to_pylist() == old.column("text").to_pylist()
    a, b = np.asarray(new.column("vector").to_pylist()), np.asarray(old.column("vector").to_pylist())
    assert np.sum(a * b, axis=1).min() >= 0.9999
