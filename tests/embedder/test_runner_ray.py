"""The Ray runner on a local Ray cluster (CPU machine): same output as the local runner, with two
encoder actors; an encoder actor killed mid-job and a SIGKILLed driver lose and duplicate nothing.

The cluster is started once for the module (3 logical CPUs: 2 encoder actors of 1 CPU, 1 for
reading) and the encoder actors run the model on CPU; the code path is the GPU one except for the
resource each actor asks for (see ``test_encoder_pool_follows_the_cluster`` for GPU clusters).
"""

from __future__ import annotations

import bz2
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.config import ConfigError, build_job
from embedder.records import BadRecord, Chunk
from embedder.runners.ray import (
    KILL_ENCODER_ENV,
    RayRunner,
    chunks_to_rows,
    end_to_rows,
    partition_rows,
    plan_encoder_pool,
    rows_to_chunks,
    rows_to_ends,
)
from embedder.runners.stages import ShardEnd
from tests.embedder.outputs import read_output, wait_lease_expired

REPO = Path(__file__).resolve().parents[2]
CHARS_PER_ARTICLE = 800  # keeps CPU encoding of the sample to seconds


def _sample_articles(wiki_sample: Path) -> list[dict]:
    """Non-redirect ns-0 pages of the real sample, parsed independently of our connector."""
    with bz2.open(wiki_sample, "rb") as f:
        root = ET.parse(f).getroot()
    ns = root.tag.split("}")[0] + "}"
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title")
        text = page.find(f"{ns}revision/{ns}text").text or ""
        out.append({"id": page.findtext(f"{ns}id"), "title": title, "text": text[:CHARS_PER_ARTICLE],
                    "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")})
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module; yields its address (for drivers in subprocesses)."""
    import ray

    ray.init(num_cpus=3, object_store_memory=1_000_000_000, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_sample) -> Path:
    path = tmp_path_factory.mktemp("ray-corpus") / "wiki.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for article in _sample_articles(wiki_sample):
            f.write(json.dumps(article) + "\n")
    return path


def _job(source: str, output: str, fmt: str, sink: str, runner: str, **extra) -> dict:
    job = {
        "source": {"uri": source, "format": fmt, "metadata_fields": ["url"], "shard_size_mb": 0.01},
        "output": {"uri": output, "sink": sink},
        "model": {"name": "all-MiniLM-L6-v2", "device": "cpu", "token_budget": 1024},
        "chunking": {"max_tokens": 128},
        "runner": {"kind": runner, "workers": 2, "show_progress": False, "lease_ttl_s": 2},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        job[section][name] = value
    return job


def _read(output: str, sink: str) -> pa.Table:
    return read_output(output, sink).sort_by("id")


def _assert_same_rows(table: pa.Table, reference: pa.Table) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert ids == reference.column("id").to_pylist(), "missing or extra chunks"
    for column in ("text", "title", "shard_id", "content_hash", "url"):
        assert table.column(column).to_pylist() == reference.column(column).to_pylist(), column
    a = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    b = np.asarray(reference.column("vector").to_pylist(), dtype=np.float32)
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= 0.9999, f"min cos {cos.min()}"


@pytest.fixture(scope="module")
def local_jsonl(tmp_path_factory, corpus) -> pa.Table:
    """The JSONL corpus through the local runner: the reference every Ray run must equal."""
    out = str(tmp_path_factory.mktemp("local") / "db")
    result = run(build_job(_job(str(corpus), out, "jsonl", "lance", "local")))
    assert result.state == "done" and result.shards_total >= 8
    return _read(out, "lance")


# --- no cluster needed --------------------------------------------------------------------------


def test_encoder_pool_follows_the_cluster() -> None:
    gpu_job = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray", model__device="auto"))
    pool = plan_encoder_pool(gpu_job, {"CPU": 128.0, "GPU": 8.0})
    assert (pool.size, pool.num_gpus, pool.on_gpu) == (8, 1.0, True)  # one actor per GPU
    pool = plan_encoder_pool(gpu_job, {"CPU": 16.0})
    assert not pool.on_gpu and pool.size >= 1  # auto on a cluster without GPUs: CPU actors
    cpu_job = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray"))
    assert plan_encoder_pool(cpu_job, {"CPU": 128.0, "GPU": 8.0}).on_gpu is False  # device: cpu is obeyed
    assert plan_encoder_pool(cpu_job, {"CPU": 3.0}).size == 2  # this module's cluster: 2 actors + 1 reader CPU
    cuda_job = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray", model__device="cuda"))
    with pytest.raises(ConfigError, match="ray start --num-gpus"):
        plan_encoder_pool(cuda_job, {"CPU": 64.0})
    incremental = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray", output__mode="incremental"))
    with pytest.raises(ConfigError, match="runner.kind: local"):
        RayRunner(incremental)


def test_rows_between_stages_carry_chunks_exactly() -> None:
    """What the read stage sends the encoders (and they send the driver) comes back unchanged."""
    when = datetime.datetime(2024, 5, 1, 12, 30)
    chunks = [
        Chunk("d1", 0, "first", np.array([5, 6, 7], np.int32), "h1", "s1", "Title", {"url": "u1", "stamp": when, "_sections": [1]}),
        Chunk("d1", 1, "second", np.array([8], np.int32), "h2", "s1", None, {"views": 3}),
        Chunk("d2", 0, "third", np.zeros(0, np.int32), "h3", "s1", "T2", {}),
    ]
    end = ShardEnd("s1", documents=2, chunks=3, tokens=4, bad_records=[BadRecord("s1", "line 3", "bad json")])
    rows = pa.concat_tables([chunks_to_rows(chunks[:2], ["url", "stamp", "views"]), end_to_rows(end),
                             chunks_to_rows(chunks[2:], ["url", "stamp", "views"])])
    chunk_rows, end_rows = partition_rows(rows.slice(0))
    back = rows_to_chunks(chunk_rows.slice(1).take([1, 0]))  # sliced and reordered, as blocks are
    assert [c.id for c in back] == ["d2#0", "d1#1"]
    assert back[1].token_ids.tolist() == [8] and back[0].token_ids.tolist() == []
    assert back[1].metadata == {"views": 3} and back[1].title is None
    first = rows_to_chunks(chunk_rows)[0]
    assert first.metadata == {"url": "u1", "stamp": when}  # passthrough fields only, types kept
    assert (first.text, first.content_hash, first.shard_id, first.title) == ("first", "h1", "s1", "Title")
    assert rows_to_ends(end_rows) == [end]


# --- on the cluster -----------------------------------------------------------------------------


def test_ray_equals_local_on_jsonl(ray_cluster, corpus, local_jsonl, tmp_path) -> None:
    out = str(tmp_path / "db")
    runner = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray")))
    result = runner.run()
    assert result.state == "done" and result.runner == "ray"
    assert runner.pool is not None and runner.pool.size == 2
    assert len(runner.encoders_seen) >= 2, f"work went to {len(runner.encoders_seen)} encoder actor(s)"
    table = _read(out, "lance")
    _assert_same_rows(table, local_jsonl)
    assert result.rows_written == result.chunks == table.num_rows
    assert result.tokens > 0 and result.tokens_per_second > 0 and result.encode_seconds > 0
    assert result.canary is not None and result.canary["min_cosine"] >= 0.999
    record = Checkpoint(out).runs()[-1]
    assert record["runner"] == "ray" and record["state"] == "done" and record["shards_done"] == result.shards_total
    # A rerun finds every shard committed and writes nothing.
    again = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray"))).run()
    assert again.shards_skipped == again.shards_total and again.rows_written == 0
    assert _read(out, "lance").num_rows == table.num_rows


def test_ray_equals_local_on_wikipedia_dump(ray_cluster, wiki_sample, tmp_path) -> None:
    """The real dump through the Wikipedia connector, ``runner: ray`` dispatched by ``embedder.run``."""
    outputs = {}
    for kind in ("local", "ray"):
        outputs[kind] = str(tmp_path / kind)
        job = _job(str(wiki_sample), outputs[kind], "wikipedia", "parquet", kind,
                   chunking__max_document_chars=1000, chunking__context="title")
        result = run(build_job(job))
        assert result.state == "done" and result.runner == kind
    ray_table, local_table = _read(outputs["ray"], "parquet"), _read(outputs["local"], "parquet")
    assert ray_table.num_rows >= 100
    _assert_same_rows(ray_table, local_table)


def test_killed_encoder_actor_loses_and_duplicates_nothing(ray_cluster, corpus, local_jsonl, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "encoder-died"
    monkeypatch.setenv(KILL_ENCODER_ENV, f"3:{marker}")
    out = str(tmp_path / "db")
    runner = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray")))
    result = runner.run()
    assert marker.exists(), "the test hook never killed an actor"
    assert result.state == "done"
    # the dead actor's calls, its restart's and the other actor's: three actor processes did work
    assert len(runner.encoders_seen) >= 3
    _assert_same_rows(_read(out, "lance"), local_jsonl)
    assert result.rows_written == local_jsonl.num_rows


def _run_cli(source: Path, output: str, address: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RAY_ADDRESS": address, **(env_extra or {})}
    env.pop(KILL_ENCODER_ENV, None)
    cmd = [
        sys.executable, "-m", "embedder.cli", "run", "--source", str(source), "--output", output,
        "--format", "jsonl", "--sink", "lance", "--runner", "ray", "--device", "cpu", "--no-progress",
        "--set", "source.shard_size_mb=0.01", "--set", "source.metadata_fields=[url]",
        "--set", "chunking.max_tokens=128", "--set", "model.token_budget=1024",
        "--set", "runner.lease_ttl_s=2", "--set", "runner.grace_period_s=30",
    ]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkilled_driver_then_rerun_equals_uninterrupted(ray_cluster, corpus, local_jsonl, tmp_path) -> None:
    """``embedder run --runner ray`` killed (SIGKILL) after its second commit, then run again."""
    out = str(tmp_path / "db")
    proc = _run_cli(corpus, out, ray_cluster, {"EMBEDDER_FAILPOINT": "after_commit@2"})
    assert proc.returncode == -signal.SIGKILL, f"expected SIGKILL, got {proc.returncode}: {proc.stderr[-3000:]}"
    done_before = len(Checkpoint(out).completed())
    assert 1 <= done_before < len(set(local_jsonl.column("shard_id").to_pylist()))
    wait_lease_expired(out)
    proc = _run_cli(corpus, out, ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_rows(_read(out, "lance"), local_jsonl)
    last = Checkpoint(out).runs()[-1]
    assert last["runner"] == "ray" and last["state"] == "done" and last["shards_skipped"] == done_before


@pytest.mark.slow
def test_sigterm_drains_the_ray_driver_and_rerun_completes(ray_cluster, corpus, local_jsonl, tmp_path) -> None:
    out = str(tmp_path / "db")
    proc = _run_cli(corpus, out, ray_cluster, {"EMBEDDER_FAILPOINT_DELAY": "after_commit:1.0"}, wait=False)
    deadline = time.time() + 240
    while len(Checkpoint(out).completed()) < 1:
        assert time.time() < deadline and proc.poll() is None, "no shard committed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert Checkpoint(out).runs()[-1]["state"] == "interrupted"
    wait_lease_expired(out)
    proc = _run_cli(corpus, out, ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_rows(_read(out, "lance"), local_jsonl)


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs 2 or more CUDA GPUs")
def test_gpu_encoder_actors_match_local(ray_cluster, wiki_sample, tmp_path) -> None:
    """On a machine with 2+ GPUs: one bf16 encoder actor per GPU, rows equal to the local runner's
    on one GPU. Throughput of both runs is in their run records (``tokens_per_second``)."""
    import ray
    import torch

    assert ray.cluster_resources().get("GPU", 0) >= 2  # ray.init detects the GPUs
    outputs = {kind: str(tmp_path / kind) for kind in ("local", "ray")}
    jobs = {
        kind: build_job(_job(str(wiki_sample), outputs[kind], "wikipedia", "parquet", kind, model__device="cuda",
                             model__token_budget="auto", chunking__max_tokens=256, chunking__context="section"))
        for kind in outputs
    }
    local = run(jobs["local"])
    runner = RayRunner(jobs["ray"])
    remote = runner.run()
    assert runner.pool is not None and runner.pool.on_gpu and runner.pool.size == torch.cuda.device_count()
    assert len(runner.encoders_seen) >= 2
    table, reference = _read(outputs["ray"], "parquet"), _read(outputs["local"], "parquet")
    assert table.column("id").to_pylist() == reference.column("id").to_pylist()
    a = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    b = np.asarray(reference.column("vector").to_pylist(), dtype=np.float32)
    assert np.sum(a * b, axis=1).min() >= 0.999  # bf16 on both sides
    from embedder.schema import provenance_of

    assert provenance_of(table.schema)["dtype"] == provenance_of(reference.schema)["dtype"] == "bfloat16"
    print(f"tokens/s: local {local.tokens_per_second:,.0f} on 1 GPU; ray {remote.tokens_per_second:,.0f} "
          f"on {runner.pool.size} GPUs; encode seconds per actor {sorted(runner.encoders_seen.values())}")
