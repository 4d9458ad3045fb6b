"""The LanceDB sink holds the commit protocol: whole shards or nothing, aborts that leave each row once."""

from __future__ import annotations

import json
import os

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from embedder.config import OutputConfig
from embedder.schema import output_schema, provenance_of
from embedder.storage import object_store_options
from indexes.base import SinkError
from indexes.lance import RETAIN_VERSIONS, LanceSink, shard_filter
from indexes.registry import SINKS
from tests.indexes.rows import DIM, PROVENANCE, SCHEMA, SHARD_A, SHARD_B, rows


def sink_at(uri: str, schema: pa.Schema = SCHEMA, **kwargs: object) -> LanceSink:
    sink = LanceSink(OutputConfig(uri=uri), schema, **kwargs)
    sink.open()
    return sink


def data_files(sink: LanceSink) -> set[str]:
    folder = os.path.join(sink.dataset_uri, "data")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def sorted_rows(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


def test_registered_as_lance() -> None:
    assert SINKS.get("lance") is LanceSink


def test_rows_stay_invisible_until_commit_and_each_commit_publishes_a_whole_shard(tmp_path) -> None:
    uri = str(tmp_path / "db")
    sink = sink_at(uri, stage_bytes=0)  # stage every write() as its own fragment
    a1, a2, b = rows(SHARD_A, 5, seed=1), rows(SHARD_A, 4, seed=2, start=5), rows(SHARD_B, 6, seed=3)
    writer_a, writer_b = sink.begin(SHARD_A), sink.begin(SHARD_B)
    writer_a.write(a1)
    writer_a.write(a2)
    writer_b.write(b)
    version_before = sink.dataset().version

    # Staged: the data files are on disk, yet no reader sees a row.
    assert len(data_files(sink)) == 3
    assert sink.count_rows() == 0
    assert sink.read().num_rows == 0
    assert lancedb.connect(uri).open_table("chunks").count_rows() == 0

    assert writer_a.commit() == 9
    assert sink.dataset().version == version_before + 1  # one commit for the whole shard
    assert sorted(sink.read(columns=["id"])["id"].to_pylist()) == sorted(a1["id"].to_pylist() + a2["id"].to_pylist())
    assert lancedb.connect(uri).open_table("chunks").count_rows() == 9

    assert writer_b.commit() == 6
    assert sink.count_rows() == 15
    assert set(sink.read(columns=["shard_id"])["shard_id"].to_pylist()) == {SHARD_A, SHARD_B}


def test_abort_after_a_committed_attempt_then_redo_gives_each_row_once(tmp_path) -> None:
    uri = str(tmp_path / "db")
    sink = sink_at(uri)
    other = rows(SHARD_B, 4, seed=7)
    writer = sink.begin(SHARD_B)
    writer.write(other)
    writer.commit()
    shard = rows(SHARD_A, 10, seed=8)
    writer = sink.begin(SHARD_A)
    writer.write(shard)
    writer.commit()  # ... and the runner dies before recording completion

    resumed = sink_at(uri)  # a new process: only what is on disk survives
    resumed.abort(SHARD_A)
    assert resumed.count_rows() == 4
    writer = resumed.begin(SHARD_A)
    writer.write(shard.slice(0, 6))
    writer.write(shard.slice(6))
    writer.commit()

    table = resumed.read()
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 14
    expected = sorted_rows(pa.concat_tables([other, shard]))
    got = sorted_rows(table)
    assert got.select(["id", "text", "shard_id", "url"]).equals(expected.select(["id", "text", "shard_id", "url"]))
    np.testing.assert_array_equal(
        np.stack(got["vector"].to_numpy(zero_copy_only=False)), np.stack(expected["vector"].to_numpy(zero_copy_only=False))
    )


def test_abort_removes_staged_files_of_a_dead_attempt(tmp_path) -> None:
    uri = str(tmp_path / "db")
    sink = sink_at(uri, stage_bytes=0)
    writer = sink.begin(SHARD_B)
    writer.write(rows(SHARD_B, 3, seed=1))
    writer.commit()
    committed_files = data_files(sink)

    dead = sink.begin(SHARD_A)
    dead.write(rows(SHARD_A, 5, seed=2))
    dead.write(rows(SHARD_A, 5, seed=3, start=5))
    del dead  # the process dies: staged fragments stay on disk, never committed
    assert len(data_files(sink)) == len(committed_files) + 2
    assert sink.count_rows() == 3

    resumed = sink_at(uri)
    resumed.abort(SHARD_A)
    assert data_files(resumed) == committed_files
    assert resumed.count_rows() == 3
    assert list((tmp_path / "db" / "_embedder").rglob("*.json")) == []  # staging records gone too


def test_discard_drops_the_attempt(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "db"), stage_bytes=0)
    files_before = data_files(sink)
    writer = sink.begin(SHARD_A)
    writer.write(rows(SHARD_A, 4, seed=1))
    writer.discard()
    assert data_files(sink) == files_before
    assert sink.count_rows() == 0
    with pytest.raises(SinkError, match="begin"):
        writer.write(rows(SHARD_A, 1, seed=1))


def test_abort_many_deletes_in_one_version_and_adds_none_when_nothing_matches(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "db"))
    lookalike = "s3://corpus/it"  # a prefix of SHARD_A: must survive its abort
    for shard_id, seed in ((SHARD_A, 1), (SHARD_B, 2), (lookalike, 3)):
        writer = sink.begin(shard_id)
        writer.write(rows(shard_id, 3, seed=seed))
        writer.commit()
    version = sink.dataset().version

    sink.abort_many(["never-written", "x' OR '1'='1", "a/b#c@d"])
    assert sink.dataset().version == version
    assert sink.count_rows() == 9

    sink.abort_many([SHARD_A, "never-written", SHARD_B])
    assert sink.dataset().version == version + 1
    assert set(sink.read(columns=["shard_id"])["shard_id"].to_pylist()) == {lookalike}

    sink.abort_many([])
    assert sink.dataset().version == version + 1


def test_shard_filter_quotes_ids_safely() -> None:
    assert shard_filter(["a'b", "c"]) == "shard_id IN ('a''b', 'c')"


def test_provenance_survives_writes_compaction_and_cleanup(tmp_path) -> None:
    uri = str(tmp_path / "db")
    sink = sink_at(uri)
    expected = []
    for i in range(4):
        shard_id = f"part-{i}"
        table = rows(shard_id, 5, seed=i)
        expected.append(table)
        writer = sink.begin(shard_id)
        writer.write(table)
        writer.commit()
    before = sorted_rows(sink.read())
    sink.finish()

    dataset = sink.dataset()
    assert len(dataset.get_fragments()) == 1  # compacted
    assert len(dataset.versions()) == 1  # old versions cleaned up
    after = sorted_rows(sink.read())
    assert after.equals(before)
    assert after.select(["id", "text"]).equals(sorted_rows(pa.concat_tables(expected)).select(["id", "text"]))
    assert provenance_of(after.schema) == PROVENANCE
    assert provenance_of(lancedb.connect(uri).open_table("chunks").schema) == PROVENANCE
    assert provenance_of(lance.dataset(sink.dataset_uri).schema) == PROVENANCE


def test_reopening_with_another_dim_or_model_is_refused_with_the_fix(tmp_path) -> None:
    uri = str(tmp_path / "db")
    sink_at(uri)
    sink_at(uri)  # the same job reopens fine

    wider = output_schema(dim=16, metadata_fields=["url"], provenance=PROVENANCE)
    with pytest.raises(SinkError, match="vector dim: 8 stored, 16") as err:
        sink_at(uri, wider)
    assert "new output" in str(err.value) and "--mode reembed" in str(err.value)

    other_model = output_schema(dim=DIM, metadata_fields=["url"], provenance={**PROVENANCE, "model": "test/model-b"})
    with pytest.raises(SinkError, match="model: 'test/model-a' stored, 'test/model-b'"):
        sink_at(uri, other_model)


def test_rows_of_another_shard_are_refused(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "db"))
    with pytest.raises(SinkError, match="shard_id="):
        sink.begin(SHARD_A).write(rows(SHARD_B, 2, seed=1))


def test_storage_options_translate_fsspec_names_and_allow_http_endpoints(monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    options = object_store_options(
        "s3://bucket/db", {"key": "K", "secret": "S", "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    )
    assert options == {
        "aws_access_key_id": "K",
        "aws_secret_access_key": "S",
        "aws_endpoint": "http://minio:9000",
        "allow_http": "true",
    }
    assert object_store_options("s3://bucket/db", {}) == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    assert object_store_options("s3://bucket/db", {}) == {"allow_http": "true"}
    assert object_store_options("/local/db", {}) == {}


def test_s3_write_commit_read_abort(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/out/db"
    sink = sink_at(uri, stage_bytes=0)
    shard = rows(SHARD_A, 6, seed=4)
    writer = sink.begin(SHARD_A)
    writer.write(shard.slice(0, 3))
    writer.write(shard.slice(3))
    assert sink.count_rows() == 0
    writer.commit()

    reader = lancedb.connect(uri).open_table("chunks")
    assert reader.count_rows() == 6
    assert provenance_of(reader.schema) == PROVENANCE
    assert sorted_rows(sink.read()).select(["id", "text"]).equals(sorted_rows(shard).select(["id", "text"]))

    fs, data_dir = sink._fs, f"{s3_bucket[5:]}/out/db/chunks.lance/data"

    def stored_files() -> set[str]:
        fs.invalidate_cache()
        return {path.rsplit("/", 1)[-1] for path in fs.find(data_dir)}

    files_before = stored_files()
    dead = sink.begin(SHARD_B)
    dead.write(rows(SHARD_B, 2, seed=5))
    del dead  # never committed
    assert len(stored_files()) == len(files_before) + 1

    sink_at(uri).abort_many([SHARD_A, SHARD_B])
    assert sink.count_rows() == 0
    assert stored_files() == files_before  # the dead attempt's staged file is gone
    fs.invalidate_cache()
    assert [p for p in fs.find(f"{s3_bucket[5:]}/out/db/_embedder") if p.endswith(".json")] == []


def test_rows_with_another_schema_are_refused_naming_the_column(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "db"))
    table = rows(SHARD_A, 2, seed=1)
    loose = table.set_column(0, pa.field("id", pa.string()), table["id"])
    with pytest.raises(SinkError, match="id: .*expected"):
        sink.begin(SHARD_A).write(loose)


def test_old_versions_are_pruned_during_a_long_run(tmp_path) -> None:
    sink = sink_at(str(tmp_path / "db"), prune_every=5)
    for i in range(40):
        writer = sink.begin(f"shard-{i}")
        writer.write(rows(f"shard-{i}", 2, seed=i))
        writer.commit()
    assert sink.count_rows() == 80
    assert len(sink.dataset().versions()) <= RETAIN_VERSIONS + 5


def test_reset_refuses_a_table_name_that_points_outside_the_output(tmp_path) -> None:
    """The config refuses such a name; the sink holds the line too (a config built without checks)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (tmp_path / "out" / "_embedder" / "staging").mkdir(parents=True)
    config = OutputConfig.model_construct(**{**OutputConfig(uri=str(tmp_path / "out")).model_dump(), "table": "../../../victim"})
    sink = LanceSink(config, SCHEMA)
    with pytest.raises(SinkError) as err:
        sink.reset()
    assert str(err.value).startswith(f"refusing to delete '{tmp_path / 'out'}/")
    assert f"it is outside the output '{tmp_path / 'out'}'" in str(err.value)
    assert (victim / "keep.txt").read_text() == "precious"


def test_abort_refuses_a_staging_record_that_names_a_file_outside_the_output(tmp_path) -> None:
    uri = str(tmp_path / "db")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sink = sink_at(uri, stage_bytes=0)
    dead = sink.begin(SHARD_A)
    dead.write(rows(SHARD_A, 3, seed=1))
    del dead  # a dead attempt's staging record, then tampered with
    (record,) = (tmp_path / "db" / "_embedder" / "staging").rglob("*.json")
    record.write_text(json.dumps({"shard_id": SHARD_A, "files": ["../../../victim.txt"]}))
    with pytest.raises(SinkError, match=r"refusing to delete '.*/db/chunks\.lance/data/\.\./\.\./\.\./victim\.txt': it is outside"):
        sink_at(uri).abort(SHARD_A)
    assert victim.read_text() == "precious"
    assert record.exists()  # nothing of the lot was deleted
