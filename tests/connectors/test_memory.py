"""In-memory sources: ``run(Job(source=obj))`` over a list of strings or dicts, a pandas DataFrame, a
``datasets.Dataset``, a pyarrow Table or RecordBatchReader writes exactly their documents, with the
field mapping of files, in row-range shards, resumable after a crash; bad input is an error naming
the fix or a quarantine record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

import embedder
from embedder.checkpoint import Checkpoint
from embedder.config import ConfigError, Job
from tests.embedder.models.tiny_models import cosines
from tests.embedder.outputs import read_output, wait_lease_expired

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["rivers", "mountains", "bread", "stars", "bees", "chess", "tides", "volcanoes", "coffee", "sleep"]


def _records(n: int = 23) -> list[dict]:
    return [
        {"id": f"doc-{i}", "text": f"A note about {TOPICS[i % 10]}, number {i}.", "title": TOPICS[i % 10],
         "url": f"https://example.org/{i}", "ignored": i}
        for i in range(n)
    ]


def _job(output: Path, source, **source_fields) -> dict:
    return {
        "source": {"uri": source, "options": {"shard_rows": 10, "spool_dir": str(output.parent / "spool")},
                   **source_fields},
        "output": {"uri": str(output)},
        "model": {"device": "cpu", "token_budget": 1024},
        "runner": {"workers": 2, "show_progress": False},
        "validation": {"canary_samples": 0},
    }


def _rows(output: Path) -> pa.Table:
    return read_output(str(output), "lance").sort_by("id")


def _assert_exactly(table: pa.Table, records: list[dict], metadata: tuple[str, ...] = ()) -> None:
    by_id = {r["id"]: r for r in records}
    ids = table.column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(records), "missing or duplicated documents"
    assert set(ids) == set(by_id)
    assert table.column("id").to_pylist() == [f"{i}#0" for i in ids]
    for row in table.select(["doc_id", "text", "title", *metadata]).to_pylist():
        want = by_id[row["doc_id"]]
        assert row["text"] == want["text"] and row["title"] == want.get("title")
        for name in metadata:
            assert row[name] == want[name]


def _dataframe(records: list[dict]):
    import pandas as pd

    return pd.DataFrame(records)


def _dataset(records: list[dict]):
    import datasets

    full = datasets.Dataset.from_list(records + [{**records[0], "id": "left-out"}])
    return full.select(range(len(records)))  # an indices mapping: only the selected rows count


def _reader(records: list[dict]):
    table = pa.Table.from_pylist(records)
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=4))


SOURCES = {
    "dataframe": _dataframe,
    "datasets": _dataset,
    "dicts": lambda records: list(records),
    "table": lambda records: pa.Table.from_pylist(records),
    "reader": _reader,
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_in_memory_source_writes_exactly_its_documents(kind: str, tmp_path: Path) -> None:
    records = _records()
    output = tmp_path / "db"
    result = embedder.run(_job(output, SOURCES[kind](records), metadata_fields=["url"]))
    assert result.state == "done" and result.shards_total == 3 and result.documents == len(records)
    table = _rows(output)
    _assert_exactly(table, records, metadata=("url",))
    assert sorted(set(table.column("shard_id").to_pylist())) == ["rows0-9", "rows10-19", "rows20-22"]
    assert "ignored" not in table.schema.names
    assert os.listdir(tmp_path / "spool") == []  # the spool file goes when the run ends


def test_list_of_strings_row_ids_vectors_and_the_saved_job(tmp_path: Path) -> None:
    texts = [f"A short note about {TOPICS[i % 10]} ({i})." for i in range(12)]
    output = tmp_path / "db"
    result = embedder.run(_job(output, texts))
    assert result.state == "done"
    table = _rows(output).to_pydict()
    order = np.argsort([int(i) for i in table["doc_id"]])
    assert [table["doc_id"][i] for i in order] == [str(i) for i in range(12)]  # row positions
    assert [table["text"][i] for i in order] == texts
    vectors = np.asarray([table["vector"][i] for i in order], dtype=np.float32)
    assert cosines(vectors, embedder.embed(texts, device="cpu")).min() >= 0.9999
    saved = yaml.safe_load((output / "_embedder" / "job.yaml").read_text())
    assert saved["source"]["format"] == "memory"
    assert saved["source"]["uri"].startswith("memory://list/") and len(saved["source"]["uri"]) > len("memory://list/")
    assert texts[0] not in (output / "_embedder" / "job.yaml").read_text()  # a description, not the data


def test_field_mapping_and_run_source_argument(tmp_path: Path) -> None:
    """``run(job, source=obj)`` keeps the job's field mapping; a DataFrame indexed by the id field works."""
    import pandas as pd

    frame = pd.DataFrame({"key": ["a", "b", "c"], "body": ["alpha text", "beta text", "gamma text"],
                          "heading": ["A", "B", "C"]}).set_index("key")
    job = Job.model_validate(_job(tmp_path / "db", "placeholder.jsonl", id_field="key", text_field="body",
                                  title_field="heading"))
    assert embedder.run(job, source=frame).state == "done"
    rows = _rows(tmp_path / "db").select(["doc_id", "text", "title"]).to_pylist()
    assert rows == [{"doc_id": "a", "text": "alpha text", "title": "A"}, {"doc_id": "b", "text": "beta text", "title": "B"},
                    {"doc_id": "c", "text": "gamma text", "title": "C"}]


def test_missing_text_field_is_a_usage_error_naming_the_fields(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"id": ["a"], "body": ["some text"]})
    with pytest.raises(ConfigError, match=r"no field 'text'; its fields are: id, body\. Set source.text_field"):
        embedder.run(_job(tmp_path / "db", frame))
    with pytest.raises(ConfigError, match=r"no field 'text'; its fields are: id, body"):
        embedder.run(_job(tmp_path / "db", [{"id": "a", "body": "some text"}]))
    with pytest.raises(ConfigError, match="strings or dicts, not both"):
        embedder.run(_job(tmp_path / "db", ["a text", {"text": "another"}]))
    with pytest.raises(ConfigError, match="got set"):
        embedder.run(_job(tmp_path / "db", {"a", "b"}))
    with pytest.raises(ConfigError, match="YAML job or the command line cannot name one"):
        embedder.run(_job(tmp_path / "db", "memory://list", format="memory"))
    assert not (tmp_path / "db").exists()  # refused before anything was written


def test_non_string_and_empty_texts_are_quarantined(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "text": ["good text", 42, None, "   ", "more good text"]})
    output = tmp_path / "db"
    result = embedder.run(_job(output, frame))
    assert result.state == "done"
    assert _rows(output).column("doc_id").to_pylist() == ["a", "e"]
    reasons = {r["doc_id"]: r["reason"] for r in Checkpoint(str(output)).quarantine()}
    assert reasons["b"] == "text field 'text' is int, not a string"
    assert reasons["c"] == "no text field 'text'"
    assert reasons["d"] == "empty or whitespace-only text"
    texts = embedder.run(_job(tmp_path / "db2", ["fine", 7, None, "also fine"]))
    assert texts.state == "done" and _rows(tmp_path / "db2").column("doc_id").to_pylist() == ["0", "3"]
    assert len(Checkpoint(str(tmp_path / "db2")).quarantine()) == 2


RESUME_SCRIPT = textwrap.dedent('''
    import sys
    import pandas as pd
    from embedder import Job, run
    topics = ["rivers", "mountains", "bread", "stars", "bees", "chess", "tides", "volcanoes", "coffee", "sleep"]
    frame = pd.DataFrame({"text": [f"A note about {topics[i % 10]}, number {i}, " + "word " * (i % 40)
                                   for i in range(150)]})
    result = run(Job.model_validate({
        "source": {"uri": frame, "options": {"shard_rows": 15}},
        "output": {"uri": sys.argv[1]},
        "model": {"device": "cpu", "token_budget": 512},
        "runner": {"workers": 1, "show_progress": False, "lease_ttl_s": 2},
        "validation": {"canary_samples": 0},
    }))
    print("STATE", result.state, result.shards_skipped)
''')


def test_resume_after_a_crash_gives_exactly_once_output(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    def run_script(output: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
        extra = {"EMBEDDER_FAILPOINT": failpoint} if failpoint else {}
        return subprocess.run([sys.executable, str(script), str(output)], env={**env, **extra}, capture_output=True,
                              text=True, timeout=600)

    reference = run_script(tmp_path / "reference")
    assert reference.returncode == 0 and "STATE done 0" in reference.stdout, reference.stderr[-2000:]
    crashed = run_script(tmp_path / "db", "after_commit@3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    wait_lease_expired(str(tmp_path / "db"))
    resumed = run_script(tmp_path / "db")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    skipped = int(resumed.stdout.split("STATE done ")[1].split()[0])
    assert skipped >= 2  # the shards committed before the crash were not embedded again
    table, expected = _rows(tmp_path / "db"), _rows(tmp_path / "reference")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 150 and ids == expected.column("id").to_pylist()
    assert table.column("text").to_pylist() == expected.column("text").to_pylist()
    vectors = np.asarray(table.column("vector").to_pylist())
    assert cosines(vectors, np.asarray(expected.column("vector").to_pylist())).min() >= 0.9999
    assert len(Checkpoint(str(tmp_path / "db")).completed()) == 10


def test_incremental_pass_over_grown_data_embeds_only_what_changed(tmp_path: Path) -> None:
    import pandas as pd

    output = tmp_path / "db"
    frame = pd.DataFrame({"id": [f"d{i}" for i in range(10)], "text": [f"text number {i}" for i in range(10)]})
    assert embedder.run(_job(output, frame)).chunks == 10
    grown = pd.concat([frame, pd.DataFrame({"id": ["d10", "d11"], "text": ["new one", "new two"]})], ignore_index=True)
    grown.loc[3, "text"] = "changed text"
    job = _job(output, grown)
    job["output"]["mode"] = "incremental"
    result = embedder.run(job)
    assert (result.state, result.chunks, result.added, result.updated, result.unchanged) == ("done", 3, 2, 1, 9)
    table = _rows(output)
    assert sorted(table.column("doc_id").to_pylist()) == sorted(grown["id"])
    assert dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))["d3"] == "changed text"
