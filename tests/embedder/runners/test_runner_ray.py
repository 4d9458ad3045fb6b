"""The Ray runner on a local Ray cluster (CPU machine): same output as the local runner, with two
encoder actors; an encoder actor killed mid-job and a SIGKILLed driver lose and duplicate nothing.

The cluster (``ray_cluster``, tests/embedder/conftest.py) is started once for the module (3 logical
CPUs: 2 encoder actors of 1 CPU, 1 for reading) and the encoder actors run the model on CPU; the
code path is the GPU one except for the resource each actor asks for (see
``test_encoder_pool_follows_the_cluster`` for GPU clusters).
"""

from __future__ import annotations

import bz2
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.config import ConfigError, build_job
from embedder.records import BadRecord, Chunk, ShardEnd
from embedder.runners.ray import (
    KILL_ENCODER_ENV,
    RayRunner,
    RayScheduler,
    chunks_to_rows,
    end_to_rows,
    partition_rows,
    plan_encoder_pool,
    read_tasks,
    rows_to_chunks,
    rows_to_ends,
)
from tests.embedder.outputs import assert_same_rows, read_output, sample_articles, wait_lease_expired
from tests.embedder.runners.ray_nodes import LocalRayCluster

REPO = Path(__file__).resolve().parents[3]
CHARS_PER_ARTICLE = 800  # keeps CPU encoding of the sample to seconds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_sample) -> Path:
    path = tmp_path_factory.mktemp("ray-corpus") / "wiki.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for article in sample_articles(wiki_sample, CHARS_PER_ARTICLE):
            f.write(json.dumps(article) + "\n")
    return path


def _job(source: str, output: str, fmt: str, sink: str, runner: str, **extra) -> dict:
    job = {
        "source": {"uri": source, "format": fmt, "metadata_fields": ["url"], "shard_size_mb": 0.01},
        "output": {"uri": output, "sink": sink},
        "model": {"name": "all-MiniLM-L6-v2", "device": "cpu", "token_budget": 1024},
        "chunking": {"max_tokens": 128},
        "runner": {"kind": runner, "workers": 2, "show_progress": False, "lease_ttl_s": 2},
        "validation": {},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        job[section][name] = value
    return job


def _read(output: str, sink: str) -> pa.Table:
    return read_output(output, sink).sort_by("id")


@pytest.fixture(scope="module")
def local_jsonl_output(tmp_path_factory, corpus) -> str:
    """The JSONL corpus through the local runner (the output's path; tests copy it, never write it)."""
    out = str(tmp_path_factory.mktemp("local") / "db")
    result = run(build_job(_job(str(corpus), out, "jsonl", "lance", "local")))
    assert result.state == "done" and result.shards_total >= 8
    return out


@pytest.fixture(scope="module")
def local_jsonl(local_jsonl_output) -> pa.Table:
    """The reference every Ray run of the JSONL corpus must equal."""
    return _read(local_jsonl_output, "lance")


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
    # Encoder actors never take the last CPU: read tasks must still be schedulable (else a hang).
    few_cpus = plan_encoder_pool(gpu_job, {"CPU": 2.0, "GPU": 2.0})
    assert few_cpus.size == 2 and few_cpus.size * few_cpus.num_cpus <= 1.0
    two_actors = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray", runner__encoders=2))
    with pytest.raises(ConfigError, match="leave none to read"):
        plan_encoder_pool(two_actors, {"CPU": 2.0})


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


def test_dry_run_counts_the_readers_of_the_cluster_a_run_would_use() -> None:
    """A Ray job's plan counts read tasks as its run does: the CPUs the encoder actors leave."""
    gpu_job = build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray", model__device="auto", runner__workers="auto"))
    cluster = {"CPU": 128.0, "GPU": 8.0}
    assert read_tasks(gpu_job, cluster, plan_encoder_pool(gpu_job, cluster)) == 120  # 8 actors hold 1 CPU each
    assert read_tasks(build_job(_job("in.jsonl", "out", "jsonl", "lance", "ray")), cluster, None) == 2  # workers: 2
    import ray

    if not ray.is_initialized():  # no cluster and no address: this machine's resources, nothing started
        RayScheduler(gpu_job, None).planned_read_parallelism()
        assert not ray.is_initialized()


# --- on the cluster -----------------------------------------------------------------------------


def test_ray_equals_local_on_jsonl(ray_cluster, corpus, local_jsonl, tmp_path) -> None:
    out = str(tmp_path / "db")
    runner = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray")))
    result = runner.run()
    assert result.state == "done" and result.runner == "ray"
    assert runner.scheduler.pool is not None and runner.scheduler.pool.size == 2
    assert len(runner.scheduler.encoders_seen) >= 2, f"work went to {len(runner.scheduler.encoders_seen)} encoder actor(s)"
    table = _read(out, "lance")
    assert_same_rows(table, local_jsonl)
    assert result.rows_written == result.chunks == table.num_rows
    assert result.tokens > 0 and result.tokens_per_second > 0 and result.encode_seconds > 0
    assert result.canary is not None and result.canary["min_cosine"] >= 0.999
    record = Checkpoint(out).runs()[-1]
    assert record["runner"] == "ray" and record["state"] == "done" and record["shards_done"] == result.shards_total
    # Start-up: the encoder actors are asked for on connecting, before the shards are listed, and
    # the model's facts come from one of them (no separate load); the record keeps the order.
    startup = record["startup"]
    order = ["encoders_started", "listed", "encoder_ready", "planned", "first_vectors", "first_commit"]
    assert all(startup[a] <= startup[b] for a, b in zip(order, order[1:])), startup
    assert runner.scheduler.facts_from in runner.scheduler.encoders_seen
    # A rerun finds every shard committed and writes nothing.
    again = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray"))).run()
    assert again.shards_skipped == again.shards_total and again.rows_written == 0
    assert _read(out, "lance").num_rows == table.num_rows


def test_dry_run_of_a_ray_job_plans_for_the_connected_clusters_readers(ray_cluster, corpus, tmp_path) -> None:
    """``plan`` of a Ray job asks the cluster it would run on: one encoder actor of this module's 3
    CPUs leaves 2 read tasks (this machine's local default would be its CPUs but one)."""
    import ray

    from embedder.api import plan

    job = build_job(_job(str(corpus), str(tmp_path / "db"), "jsonl", "lance", "ray", runner__workers="auto",
                         runner__encoders=1))
    info = plan(job)
    cluster = ray.cluster_resources()  # what a run's setup sizes its pool on, and counts read tasks from
    assert info["readers"] == read_tasks(job, cluster, plan_encoder_pool(job, cluster)) == 2
    assert info["shards_to_embed"] == info["shards_total"] >= 8 and not (tmp_path / "db").exists()
    assert ray.is_initialized()  # the dry run left the test's connection as it found it


def test_a_one_shard_job_equals_the_local_run(ray_cluster, corpus, tmp_path) -> None:
    """One pending shard (the one the driver reads; no Ray Data read stage is made for the rest):
    the rows equal the local runner's. The rows show the output is right, not which process read."""
    source = tmp_path / "one.jsonl"
    source.write_text(corpus.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    outputs = {}
    for kind in ("local", "ray"):
        outputs[kind] = str(tmp_path / kind)
        result = run(build_job(_job(str(source), outputs[kind], "jsonl", "parquet", kind)))
        assert result.state == "done" and result.shards_total == 1 and result.chunks >= 2
    assert_same_rows(_read(outputs["ray"], "parquet"), _read(outputs["local"], "parquet"))


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
    assert_same_rows(ray_table, local_table)


def test_kept_encoder_actors_serve_the_next_run_then_end(ray_cluster, corpus, local_jsonl, tmp_path) -> None:
    """``runner.keep_encoders_s``: the second run takes over the first run's loaded actors (the
    same processes encode), its output equals the local runner's, and the idle actors end themselves."""
    import ray

    from embedder.runners.ray import KEPT_NAMESPACE

    seen = []
    for i in range(2):
        out = str(tmp_path / f"db{i}")
        runner = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray", runner__keep_encoders_s=30)))
        assert runner.run().state == "done"
        assert_same_rows(_read(out, "lance"), local_jsonl)
        seen.append(set(runner.scheduler.encoders_seen))
    assert seen[1] <= seen[0], f"the second run loaded new actors: {seen}"

    def kept() -> list:
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == KEPT_NAMESPACE]

    deadline = time.time() + 120
    while kept():
        assert time.time() < deadline, f"kept encoder actors still up: {kept()}"
        time.sleep(0.5)


def test_killed_encoder_actor_loses_and_duplicates_nothing(ray_cluster, corpus, local_jsonl, tmp_path, monkeypatch) -> None:
    marker = tmp_path / "encoder-died"
    monkeypatch.setenv(KILL_ENCODER_ENV, f"3:{marker}")
    out = str(tmp_path / "db")
    runner = RayRunner(build_job(_job(str(corpus), out, "jsonl", "lance", "ray")))
    result = runner.run()
    assert marker.exists(), "the test hook never killed an actor"
    assert result.state == "done"
    # the dead actor's calls, its restart's and the other actor's: three actor processes did work
    assert len(runner.scheduler.encoders_seen) >= 3
    assert_same_rows(_read(out, "lance"), local_jsonl)
    assert result.rows_written == local_jsonl.num_rows


# --- incremental passes ---------------------------------------------------------------------------


def _edited(articles: list[dict], reference: pa.Table) -> list[dict]:
    """The corpus after an edit: 4 articles changed mid-text, one shrunk to one chunk, 2 deleted, 2 added."""
    counts: dict[str, int] = {}
    for doc_id in reference.column("doc_id").to_pylist():
        counts[doc_id] = counts.get(doc_id, 0) + 1
    multi = [a for a in articles if counts.get(a["id"], 0) >= 2]
    assert len(multi) >= 6, "the corpus needs articles of several chunks"
    changed, shrunk, deleted = {a["id"] for a in multi[:4]}, multi[4]["id"], {a["id"] for a in multi[5:7]}
    out = []
    for article in articles:
        article = dict(article)
        if article["id"] in deleted:
            continue
        if article["id"] in changed:
            words = article["text"].split()
            article["text"] = " ".join(words[: len(words) // 2] + ["A", "sentence", "edited", "in."] + words[len(words) // 2 :])
        if article["id"] == shrunk:
            article["text"] = " ".join(article["text"].split()[:20])
        out.append(article)
    for i in range(2):
        out.append({"id": f"new-{i}", "title": f"New {i}", "text": f"A new article number {i} about rivers. " * 12,
                    "url": f"https://example.org/new-{i}"})
    return out


def test_ray_incremental_equals_local_incremental(ray_cluster, corpus, local_jsonl_output, local_jsonl, tmp_path) -> None:
    """The same edits over copies of one full output: ``runner: ray`` writes what the local runner
    writes, counts the same changes, and encodes only the added and changed chunks."""
    edited = tmp_path / "edited.jsonl"
    articles = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    edited.write_text("".join(json.dumps(a) + "\n" for a in _edited(articles, local_jsonl)), encoding="utf-8")
    results, tables = {}, {}
    for kind in ("local", "ray"):
        out = str(tmp_path / kind)
        shutil.copytree(local_jsonl_output, out)
        results[kind] = run(build_job(_job(str(edited), out, "jsonl", "lance", kind, output__mode="incremental")))
        assert results[kind].state == "done" and results[kind].mode == "incremental" and results[kind].runner == kind
        tables[kind] = _read(out, "lance")
    local, remote = results["local"], results["ray"]
    counts = ("added", "updated", "unchanged", "deleted", "chunks", "tokens", "rows_written")
    assert {k: getattr(remote, k) for k in counts} == {k: getattr(local, k) for k in counts}
    assert remote.added >= 2 and remote.updated >= 4 and remote.deleted >= 3 and remote.unchanged > 0
    # Unchanged chunks never reached an encoder: what was encoded is exactly the added + updated chunks.
    assert remote.chunks == remote.added + remote.updated < local_jsonl.num_rows
    table, reference = tables["ray"], tables["local"]
    assert table.column("id").to_pylist() == reference.column("id").to_pylist()
    assert table.column("content_hash").to_pylist() == reference.column("content_hash").to_pylist()
    assert table.column("text").to_pylist() == reference.column("text").to_pylist()
    untagged = [[s.split("@")[0] for s in t.column("shard_id").to_pylist()] for t in (table, reference)]
    assert untagged[0] == untagged[1]  # rows of this pass carry their pass's tag (run ids differ)
    a = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    b = np.asarray(reference.column("vector").to_pylist(), dtype=np.float32)
    assert np.sum(a * b, axis=1).min() >= 0.9999
    assert "new-0#0" in set(table.column("id").to_pylist())


def _small_dump(wiki_sample: Path, path: Path, pages: int = 40, new_revisions: int = 0) -> list[str]:
    """A dump of the sample's ``pages`` smallest articles (real markup, fast to embed on CPU); the
    first ``new_revisions`` of them get a new revision with one more paragraph. Returns their ids."""
    import re

    raw = bz2.open(wiki_sample, "rt", encoding="utf-8").read()
    articles = sorted((p for p in re.findall(r"<page>.*?</page>", raw, flags=re.S)
                       if "<redirect" not in p and "<ns>0</ns>" in p), key=len)[:pages]
    changed = []
    for i in range(new_revisions):
        revision = re.search(r"<revision>\s*<id>(\d+)</id>", articles[i]).group(1)
        page = articles[i].replace(f"<id>{revision}</id>", f"<id>{int(revision) + 10**6}</id>", 1)
        articles[i] = page.replace("</text>", "\n\nA closing paragraph added in a new revision.</text>", 1)
        changed.append(re.search(r"<id>(\d+)</id>", page).group(1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(raw[: raw.index("<page>")] + "".join(articles) + "</mediawiki>\n")
    return changed


def _wiki_job(dump: Path, out: str, runner: str) -> dict:
    return _job(str(dump), out, "wikipedia", "parquet", runner, source__metadata_fields=["url", "revision_id"],
                validation__canary_samples=0)


@pytest.fixture(scope="module")
def wiki_full_output(tmp_path_factory, wiki_sample) -> tuple[Path, str, int]:
    """A full pass over 40 articles of the sample (the dump, the output the tests copy, its rows).
    The full pass's runner does not matter: both write the same rows."""
    root = tmp_path_factory.mktemp("wiki-full")
    dump = root / "v1" / "enwiki-pages-articles.xml.bz2"
    _small_dump(wiki_sample, dump)
    result = run(build_job(_wiki_job(dump, str(root / "out"), "local")))
    assert result.state == "done" and result.documents == 40 and result.rows_written >= 40
    return dump, str(root / "out"), result.rows_written


def test_ray_incremental_over_an_unchanged_dump_embeds_nothing(ray_cluster, wiki_full_output, tmp_path) -> None:
    """Every page is skipped by its revision id: nothing parsed, embedded or written."""
    dump, full, rows_before = wiki_full_output
    out = str(tmp_path / "out")
    shutil.copytree(full, out)
    job = _wiki_job(dump, out, "ray")
    job["output"]["mode"] = "incremental"
    result = run(build_job(job))
    assert result.state == "done" and result.runner == "ray" and result.mode == "incremental"
    assert result.documents == 0, "pages with a known revision are skipped before parsing"
    assert result.chunks == result.tokens == result.rows_written == 0
    assert result.added == result.updated == result.deleted == 0
    assert result.unchanged == rows_before
    before, after = _read(full, "parquet"), _read(out, "parquet")
    assert after.column("id").to_pylist() == before.column("id").to_pylist()
    assert after.column("shard_id").to_pylist() == before.column("shard_id").to_pylist()


def test_ray_incremental_embeds_only_pages_with_a_new_revision(ray_cluster, wiki_sample, wiki_full_output, tmp_path) -> None:
    _, full, rows_before = wiki_full_output
    dump = tmp_path / "v2" / "enwiki-pages-articles.xml.bz2"
    changed = _small_dump(wiki_sample, dump, new_revisions=2)
    out = str(tmp_path / "out")
    shutil.copytree(full, out)
    job = _wiki_job(dump, out, "ray")
    job["output"]["mode"] = "incremental"
    result = run(build_job(job))
    assert result.state == "done" and result.documents == 2, "the 38 other pages were skipped by revision"
    assert result.added + result.updated >= 2 and result.chunks == result.added + result.updated
    rows = _read(out, "parquet")
    written = {d for d, s in zip(rows.column("doc_id").to_pylist(), rows.column("shard_id").to_pylist())
               if s.endswith("@" + result.run_id)}
    assert written == set(changed), "only the pages with a new revision were embedded"
    assert len(set(rows.column("id").to_pylist())) == rows.num_rows
    assert rows.num_rows == rows_before + result.added - result.deleted


def test_existing_chunks_reach_ray_workers_without_a_copy(ray_cluster) -> None:
    """Put once, the lookup arrays arrive in a task as read-only views of the object store (one copy
    per node, however many workers read it) and answer as on the driver."""
    import ray

    from embedder.incremental import SAME, ExistingChunks

    table = pa.table({"id": [f"d{i}#0" for i in range(1000)], "doc_id": [f"d{i}" for i in range(1000)],
                      "chunk_index": pa.array([0] * 1000, pa.int32()), "content_hash": [f"{i:032x}" for i in range(1000)]})
    ref = ray.put(ExistingChunks.from_table(table))

    @ray.remote(num_cpus=0)
    def probe(wrapped: tuple) -> tuple[bool, bool, list[int]]:
        held = ray.get(wrapped[0])
        return held.chunk_keys.flags.owndata, held.chunk_keys.flags.writeable, held.match(["d7#0", "d8#0"], [f"{7:032x}", "x"]).tolist()

    owns, writeable, status = ray.get(probe.remote((ref,)))
    assert not owns and not writeable
    assert status[0] == SAME and status[1] != SAME


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
    assert_same_rows(_read(out, "lance"), local_jsonl)
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
    assert_same_rows(_read(out, "lance"), local_jsonl)


def test_a_driver_a_token_cluster_refuses_is_told_what_to_set(corpus, tmp_path, monkeypatch) -> None:
    """A cluster started with token auth (RAY_AUTH_MODE=token) and ``embedder run`` against it with
    no token, without RAY_AUTH_MODE=token, or with another token: exit 2 and one line that names
    RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH, not Ray's "Failed to connect to Ray cluster at ..."."""
    import socket
    import uuid

    token, other = tmp_path / "token", tmp_path / "other"
    token.write_text(uuid.uuid4().hex * 2)
    other.write_text(uuid.uuid4().hex * 2)
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    drivers = {  # the driver's auth settings → what its error line must say
        "disabled": ({"RAY_AUTH_MODE": "disabled"}, "has RAY_AUTH_MODE=disabled: set RAY_AUTH_MODE=token and "
                     "RAY_AUTH_TOKEN_PATH to the file holding the cluster's token"),
        "no token": ({"RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}, "RAY_AUTH_MODE=token but no Ray auth "
                     "token was found"),
        "another token": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(other)},
                          f"refused this process's Ray auth token (from RAY_AUTH_TOKEN_PATH={other}"),
    }
    with LocalRayCluster(head_cpus=1, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}) as cluster:
        host, port = cluster.address.split(":")
        deadline = time.time() + 60
        while True:  # the head's GCS is up once its port answers (connecting as a driver needs the token)
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and cluster.head.process.poll() is None, cluster.log(cluster.head)[-2000:]
                time.sleep(0.25)
        for name, (env, says) in drivers.items():
            # 3 connection attempts of about a second each, not Ray's default 20
            proc = _run_cli(corpus, str(tmp_path / "db"), cluster.address, {**env, "RAY_gcs_server_port_wait_time_s": "3"})
            error = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == 2 and error.startswith("error: ") and says in error, (name, proc.stderr[-3000:])
            assert "Traceback" not in proc.stderr, name


@pytest.mark.slow
def test_address_local_starts_a_cluster_of_the_runs_own(corpus, local_jsonl, tmp_path) -> None:
    """``RAY_ADDRESS=local`` (or ``runner.address: local``): the driver starts a Ray cluster of its
    own on this machine (not the module's, which it is not given) and embeds the same rows as the
    local runner."""
    out = str(tmp_path / "db")
    proc = _run_cli(corpus, out, "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(_read(out, "lance"), local_jsonl)
    last = Checkpoint(out).runs()[-1]
    assert last["runner"] == "ray" and last["state"] == "done"


def test_an_address_nothing_answers_at_is_refused_in_seconds(corpus, tmp_path) -> None:
    """RAY_ADDRESS at a port nothing listens on: exit 2 and one line naming the address, where it
    came from and the fix, before ``ray.init`` (which retries such an address for minutes)."""
    import socket

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    started = time.monotonic()
    proc = _run_cli(corpus, str(tmp_path / "db"), address)
    assert time.monotonic() - started < 60, "not refused before ray.init's retries"
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error.startswith(f"error: nothing answers at the Ray cluster address {address} (from RAY_ADDRESS)"), error
    assert "set RAY_ADDRESS to a running cluster's address" in error


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
    assert runner.scheduler.pool is not None and runner.scheduler.pool.on_gpu and runner.scheduler.pool.size == torch.cuda.device_count()
    assert len(runner.scheduler.encoders_seen) >= 2
    table, reference = _read(outputs["ray"], "parquet"), _read(outputs["local"], "parquet")
    assert table.column("id").to_pylist() == reference.column("id").to_pylist()
    a = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    b = np.asarray(reference.column("vector").to_pylist(), dtype=np.float32)
    assert np.sum(a * b, axis=1).min() >= 0.999  # bf16 on both sides
    from embedder.schema import provenance_of

    assert provenance_of(table.schema)["dtype"] == provenance_of(reference.schema)["dtype"] == "bfloat16"
    print(f"tokens/s: local {local.tokens_per_second:,.0f} on 1 GPU; ray {remote.tokens_per_second:,.0f} "
          f"on {runner.scheduler.pool.size} GPUs; encode seconds per actor {sorted(runner.scheduler.encoders_seen.values())}")
