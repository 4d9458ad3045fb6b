"""The Parquet sink: one part file per shard, published whole, readable as one dataset by any reader."""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embedder.config import OutputConfig
from embedder.schema import output_schema, provenance_of
from indexes.base import SinkError
from indexes.lance import LanceSink
from indexes.parquet import FilterError, ParquetSink, parse_filter, part_name
from indexes.registry import SINKS
from tests.indexes.rows import DIM, PROVENANCE, SCHEMA, SHARD_A, SHARD_B
from tests.indexes.rows import rows as shared_rows


def rows(*args: object, **kwargs: object) -> pa.Table:
    """The shared rows, with some empty titles (NULL handling of the filters)."""
    return shared_rows(*args, null_titles=True, **kwargs)


def sink_at(uri: str, schema: pa.Schema = SCHEMA) -> ParquetSink:
    sink = ParquetSink(OutputConfig(uri=uri), schema)
    sink.open()
    return sink


def dataset_ids(uri: str, filesystem: fsspec.AbstractFileSystem | None = None) -> list[str]:
    """Ids as an outside reader sees them: pyarrow's own directory discovery."""
    if filesystem is not None:
        filesystem.invalidate_cache()
    dataset = pads.dataset(uri, format="parquet", filesystem=filesystem)
    return sorted(dataset.to_table(columns=["id"])["id"].to_pylist()) if dataset.files else []


def test_registered_as_parquet() -> None:
    assert SINKS.get("parquet") is ParquetSink


def test_rows_stay_invisible_until_commit_and_each_shard_is_one_streamed_file(tmp_path) -> None:
    uri = str(tmp_path / "out")
    sink = sink_at(uri)
    a1, a2, b = rows(SHARD_A, 5, seed=1), rows(SHARD_A, 4, seed=2, start=5), rows(SHARD_B, 6, seed=3)
    writer_a, writer_b = sink.begin(SHARD_A), sink.begin(SHARD_B)
    writer_a.write(a1)
    writer_a.write(a2)
    writer_b.write(b)

    assert sink.count_rows() == 0 and sink.read().num_rows == 0
    assert dataset_ids(uri) == []
    assert len(os.listdir(tmp_path / "out" / "_embedder" / "staging")) == 2  # staged, out of readers' sight

    assert writer_a.commit() == 9
    assert dataset_ids(uri) == sorted(a1["id"].to_pylist() + a2["id"].to_pylist())
    part = tmp_path / "out" / part_name(SHARD_A)
    assert pq.ParquetFile(part).metadata.num_row_groups == 2  # each write() streamed its own row groups

    assert writer_b.commit() == 6
    assert sink.count_rows() == 15
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["_embedder", part_name(SHARD_A), part_name(SHARD_B)])
    assert os.listdir(tmp_path / "out" / "_embedder" / "staging") == []


def test_abort_after_a_committed_attempt_then_redo_gives_each_row_once(tmp_path) -> None:
    uri = str(tmp_path / "out")
    sink = sink_at(uri)
    other, shard = rows(SHARD_B, 4, seed=7), rows(SHARD_A, 10, seed=8)
    for shard_id, table in ((SHARD_B, other), (SHARD_A, shard)):
        writer = sink.begin(shard_id)
        writer.write(table)
        writer.commit()  # for SHARD_A the runner dies before recording completion

    resumed = sink_at(uri)
    resumed.abort(SHARD_A)
    assert resumed.count_rows() == 4
    writer = resumed.begin(SHARD_A)
    writer.write(shard.slice(0, 6))
    writer.write(shard.slice(6))
    writer.commit()

    ids = dataset_ids(uri)
    assert len(ids) == len(set(ids)) == 14
    assert resumed.read().sort_by("id").equals(pa.concat_tables([other, shard]).sort_by("id"))


def test_abort_removes_the_staging_file_of_a_dead_attempt(tmp_path) -> None:
    uri = str(tmp_path / "out")
    sink = sink_at(uri)
    writer = sink.begin(SHARD_B)
    writer.write(rows(SHARD_B, 3, seed=1))
    writer.commit()
    dead = sink.begin(SHARD_A)
    dead.write(rows(SHARD_A, 5, seed=2))
    dead._file.flush()  # the dead process got bytes onto disk
    del dead
    staging = tmp_path / "out" / "_embedder" / "staging"
    assert len(os.listdir(staging)) == 1
    assert dataset_ids(uri) == sorted(rows(SHARD_B, 3, seed=1)["id"].to_pylist())

    sink_at(uri).abort(SHARD_A)
    assert os.listdir(staging) == []
    assert sink.count_rows() == 3


def test_discard_drops_the_attempt(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "out"))
    writer = sink.begin(SHARD_A)
    writer.write(rows(SHARD_A, 3, seed=1))
    writer.discard()
    assert os.listdir(tmp_path / "out" / "_embedder" / "staging") == []
    assert sink.count_rows() == 0
    with pytest.raises(SinkError, match="begin"):
        writer.write(rows(SHARD_A, 1, seed=1))


def test_abort_many_tolerates_absent_shards(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "out"))
    lookalike = "s3://corpus/it"
    for shard_id, seed in ((SHARD_A, 1), (SHARD_B, 2), (lookalike, 3)):
        writer = sink.begin(shard_id)
        writer.write(rows(shard_id, 3, seed=seed))
        writer.commit()
    sink.abort_many(["never-written", "x' OR '1'='1"])
    assert sink.count_rows() == 9
    sink.abort_many([SHARD_A, "never-written", SHARD_B])
    assert set(sink.read(columns=["shard_id"])["shard_id"].to_pylist()) == {lookalike}


def test_provenance_survives_in_every_reader(tmp_path) -> None:
    uri = str(tmp_path / "out")
    sink = sink_at(uri)
    writer = sink.begin(SHARD_A)
    writer.write(rows(SHARD_A, 3, seed=1))
    writer.commit()
    assert provenance_of(pq.read_schema(tmp_path / "out" / part_name(SHARD_A))) == PROVENANCE
    assert provenance_of(pads.dataset(uri, format="parquet").schema) == PROVENANCE
    assert provenance_of(sink.read().schema) == PROVENANCE


def test_same_rows_read_back_equal_from_lance_and_parquet(tmp_path) -> None:
    tables = {SHARD_A: rows(SHARD_A, 12, seed=1), SHARD_B: rows(SHARD_B, 7, seed=2)}
    parquet = sink_at(str(tmp_path / "parquet"))
    lance = LanceSink(OutputConfig(uri=str(tmp_path / "db")), SCHEMA)
    lance.open()
    for sink in (parquet, lance):
        for shard_id, table in tables.items():
            writer = sink.begin(shard_id)
            writer.write(table)
            writer.commit()

    from_parquet = parquet.read().sort_by("id")
    from_lance = lance.read().sort_by("id")
    assert from_parquet.schema == from_lance.schema == SCHEMA  # same columns, types and nullability
    assert provenance_of(from_parquet.schema) == provenance_of(from_lance.schema) == PROVENANCE
    assert from_parquet.equals(from_lance)
    np.testing.assert_array_equal(
        np.stack(from_parquet["vector"].to_numpy(zero_copy_only=False)),
        np.stack(from_lance["vector"].to_numpy(zero_copy_only=False)),
    )

    # The same SQL filter selects the same rows in both sinks (NULL titles included).
    for predicate in (
        "title = 'Title 1'",
        "title IN ('Title 1', 'Title 2') AND chunk_index >= 1",
        "NOT title IN ('Title 1')",
        "title IS NULL OR url LIKE '%/1/1%'",
        "title != 'Title 0'",
    ):
        got = parquet.read(columns=["id"], filter=predicate)["id"].to_pylist()
        want = lance.read(columns=["id"], filter=predicate)["id"].to_pylist()
        assert sorted(got) == sorted(want) and got, predicate
    expression = pc.field("chunk_index") == 0
    assert parquet.read(filter=expression).num_rows == from_parquet.filter(expression).num_rows


def test_unsupported_filter_names_what_is_supported() -> None:
    with pytest.raises(FilterError, match="position 7.*IS \\[NOT\\] NULL"):
        parse_filter("title == 'x'")


def test_reopening_with_another_dim_or_model_is_refused_with_the_fix(tmp_path) -> None:
    uri = str(tmp_path / "out")
    sink = sink_at(uri)
    writer = sink.begin(SHARD_A)
    writer.write(rows(SHARD_A, 2, seed=1))
    writer.commit()
    sink_at(uri)

    with pytest.raises(SinkError, match="vector dim: 8 stored, 16") as err:
        sink_at(uri, output_schema(dim=16, metadata_fields=["url"], provenance=PROVENANCE))
    assert "new output" in str(err.value) and "--mode reembed" in str(err.value)
    other_model = output_schema(dim=DIM, metadata_fields=["url"], provenance={**PROVENANCE, "model": "test/model-b"})
    with pytest.raises(SinkError, match="model: 'test/model-a' stored, 'test/model-b'"):
        sink_at(uri, other_model)


def test_s3_commit_is_the_upload_completion_and_abort_clears_incomplete_uploads(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/out/parquet"
    fs = fsspec.filesystem("s3")
    root = uri[len("s3://") :]
    bucket = root.split("/", 1)[0]
    sink = sink_at(uri)
    shard = rows(SHARD_A, 6, seed=4)
    writer = sink.begin(SHARD_A)
    writer.write(shard.slice(0, 3))
    writer.write(shard.slice(3))
    assert sink.count_rows() == 0
    assert fs.glob(f"{root}/*") == []
    writer.commit()

    assert dataset_ids(root, fs) == sorted(shard["id"].to_pylist())
    assert sink.read().sort_by("id").equals(shard.sort_by("id"))
    assert provenance_of(pads.dataset(root, format="parquet", filesystem=fs).schema) == PROVENANCE

    def uploads() -> list[str]:
        return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])]

    dead = sink.begin(SHARD_B)
    dead.write(rows(SHARD_B, 2, seed=5))
    dead._writer.close()
    dead._file.close()  # the dead process sent its parts but never completed the upload
    del dead
    assert uploads() == [f"out/parquet/{part_name(SHARD_B)}"]
    assert dataset_ids(root, fs) == sorted(shard["id"].to_pylist())

    sink_at(uri).abort_many([SHARD_A, SHARD_B])
    assert uploads() == []
    assert sink.count_rows() == 0
    fs.invalidate_cache()
    assert fs.glob(f"{root}/part-*") == []
