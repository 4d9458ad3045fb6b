"""``embedder.ray_data.Embed`` in a user's Ray Data pipeline on a local Ray cluster: the vectors it adds
equal ``embedder.embed`` (cos >= 0.9999) for every batch format, rows and other columns untouched.

The cluster (``ray_cluster``, tests/embedder/conftest.py) is started once for the module; the
encoder actors run the model on CPU, the code path being the GPU one but for the resource each actor
asks for.
"""

from __future__ import annotations

import numpy as np
import pytest

import embedder
from embedder.ray_data import Embed
from tests.embedder.models.tiny_models import cosines

TOPICS = ["rivers", "mountains", "bread", "stars", "bees", "chess", "tides", "volcanoes", "coffee", "sleep"]


def _items(n: int = 40) -> list[dict]:
    return [{"id": i, "text": f"A note about {TOPICS[i % 10]}, number {i}." + " more words" * (i % 7)} for i in range(n)]


@pytest.mark.parametrize("batch_format", ["pyarrow", "pandas", "numpy"])
def test_ray_data_stage_equals_embed(ray_cluster, batch_format: str) -> None:
    import ray

    items = _items()
    ds = ray.data.from_items(items).map_batches(
        Embed,
        fn_constructor_kwargs={"model": "all-MiniLM-L6-v2", "text_column": "text", "device": "cpu"},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=16,
        batch_format=batch_format,
    )
    rows = sorted(ds.take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == [item["id"] for item in items]
    assert [row["text"] for row in rows] == [item["text"] for item in items]
    vectors = np.asarray([row["vector"] for row in rows], dtype=np.float32)
    assert vectors.shape == (len(items), 384)
    assert cosines(vectors, embedder.embed([item["text"] for item in items], device="cpu")).min() >= 0.9999


def test_query_prompt_replaced_column_and_bad_batches() -> None:
    """The stage called as Ray calls it, on each batch format, without a cluster."""
    import pyarrow as pa

    items = _items(3)
    stage = Embed(model="all-MiniLM-L6-v2", device="cpu", kind="query", vector_column="q")
    table = stage(pa.Table.from_pylist([{**item, "q": 0} for item in items]))
    assert table.column_names == ["id", "text", "q"] and table.schema.field("q").type == pa.list_(pa.float32(), 384)
    queries = embedder.embed([item["text"] for item in items], kind="query", device="cpu")
    assert cosines(np.asarray(table.column("q").to_pylist()), queries).min() >= 0.9999
    with pytest.raises(embedder.api.EmbedError, match="no column 'body'; its columns are: id, text. Pass text_column="):
        Embed(model="all-MiniLM-L6-v2", device="cpu", text_column="body")({"id": np.arange(2), "text": np.array(["a", "b"])})
    with pytest.raises(embedder.api.EmbedError, match="row 1 of the batch has a NoneType in 'text'"):
        stage({"text": np.array(["a", None], dtype=object)})


def test_ray_runner_reads_an_in_memory_source(ray_cluster, tmp_path) -> None:
    """``runner: ray`` over a DataFrame: the read tasks memory-map the spool file like local readers."""
    import pandas as pd

    from tests.embedder.outputs import read_output

    items = _items(25)
    frame = pd.DataFrame({"key": [f"k{item['id']}" for item in items], "text": [item["text"] for item in items]})
    result = embedder.run(
        {"source": {"uri": frame, "id_field": "key", "options": {"shard_rows": 10}}, "output": {"uri": str(tmp_path / "db")},
         "model": {"device": "cpu", "token_budget": 1024}, "runner": {"kind": "ray", "workers": 1, "show_progress": False},
         "validation": {"canary_samples": 0}}
    )
    assert result.state == "done" and result.shards_total == 3
    table = read_output(str(tmp_path / "db"), "lance").sort_by("doc_id")
    expected = frame.sort_values("key")
    assert table.column("doc_id").to_pylist() == expected["key"].tolist()
    assert table.column("text").to_pylist() == expected["text"].tolist()
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    assert cosines(vectors, embedder.embed(expected["text"].tolist(), device="cpu")).min() >= 0.9999
