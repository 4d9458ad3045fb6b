"""A connector (``register_connector``) or a sink (``register_sink``) from the user's own module runs
through ``embedder.run``: the config takes its name, reader processes import its module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PLUGIN = '''
from connectors.base import Connector
from connectors.registry import register_connector
from embedder.records import Shard


@register_connector("csv")
class CsvConnector(Connector):
    """id,text lines; one shard per file."""

    suffixes = (".csv",)

    def list_shards(self):
        return [Shard(self.relative(p), self.url(p), size_bytes=size) for p, size in self.list_files()]

    def read_shard(self, shard):
        with self.fs.open(shard.path, "rt") as f:
            for n, line in enumerate(f):
                doc_id, _, text = line.rstrip("\\n").partition(",")
                yield self.make_document({"id": doc_id, "text": text}, shard, f"line {n + 1}")
'''

SCRIPT = '''
import my_connectors  # registers "csv"
from embedder import run, open_index

result = run({"source": {"uri": "notes", "format": "csv"}, "output": {"uri": "out", "sink": "parquet"},
              "model": {"device": "cpu"}, "runner": {"workers": 2, "show_progress": False}})
print("RESULT", result.state, result.documents, result.shards_total)
print("TOP", open_index("out").search("a glacier of ice", k=1)[0].doc_id)
'''


def test_a_connector_from_the_users_module_runs_through_embedder_run(tmp_path) -> None:
    (tmp_path / "my_connectors.py").write_text(PLUGIN)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.csv").write_text("n1,Rivers carry water to the sea.\nn2,A glacier is a slow river of ice.\n")
    (notes / "b.csv").write_text("n3,Deserts get little rain.\nn4,Harbors shelter ships from storms.\n")
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT done 4 2" in proc.stdout and "TOP n2" in proc.stdout, proc.stdout


SINK_PLUGIN = '''
import threading

from indexes.parquet import ParquetSink
from indexes.registry import register_sink


@register_sink("tagged-parquet")
class TaggedParquetSink(ParquetSink):
    """Parquet part files; says which thread imports its libraries."""

    @classmethod
    def preload(cls):
        print("PRELOAD in", threading.current_thread().name, flush=True)
        super().preload()
'''

SINK_SCRIPT = '''
import threading

import my_sinks  # registers "tagged-parquet"
from embedder import run, open_index

def job():
    result = run({"source": {"uri": "docs.jsonl"}, "output": {"uri": "out", "sink": "tagged-parquet"},
                  "model": {"device": "cpu"}, "runner": {"workers": 2, "show_progress": False}})
    print("RESULT", result.state, result.documents, flush=True)

thread = threading.Thread(target=job, name="callers-thread")
thread.start()
thread.join()
print("TOP", open_index("out").search("a glacier of ice", k=1)[0].doc_id)
'''


def test_a_sink_from_the_users_module_runs_through_embedder_run(tmp_path) -> None:
    """Reader processes validate the whole job, sink name included, so they import the sink's module
    too; and the run imports the sink's libraries (``Sink.preload``) in its own thread, never in a
    background one, where it had raced the model's imports ("cannot import name 'fft' from partially
    initialized module 'torch'", one quickstart run in 42 on a loaded 2-core machine)."""
    (tmp_path / "my_sinks.py").write_text(SINK_PLUGIN)
    (tmp_path / "docs.jsonl").write_text(
        '{"id": "n1", "text": "Rivers carry water to the sea."}\n{"id": "n2", "text": "A glacier is a slow river of ice."}\n'
    )
    (tmp_path / "job.py").write_text(SINK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT done 2" in proc.stdout and "TOP n2" in proc.stdout, proc.stdout
    assert proc.stdout.count("PRELOAD in") == 1 and "PRELOAD in callers-thread" in proc.stdout, proc.stdout


def test_an_unknown_format_names_the_registered_ones(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "a.jsonl").write_text('{"id": "1", "text": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "embedder.cli", "run", "--source", str(tmp_path / "a.jsonl"),
                           "--output", str(tmp_path / "out"), "--format", "csv"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "source.format" in proc.stderr and "Valid: 'auto', 'jsonl', 'lance', 'memory', 'parquet', 'text' or 'wikipedia'" in proc.stderr
    assert not (tmp_path / "out").exists()
