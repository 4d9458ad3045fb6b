"""Every reader has work: small sources split into enough shards for the readers, large ones keep
about ``source.shard_size_mb``, and an output keeps its shard size across runs and machines."""

from __future__ import annotations

import json
import random

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.config import build_job
from embedder.execution.job import resolve_job
from embedder.pipeline.read import MIN_SHARD_BYTES, make_connector, plan_shards
from tests.embedder.outputs import read_output

WORDS = "river mountain valley glacier forest desert ocean island harbor bridge castle village".split()


def _jsonl(path, megabytes: float) -> int:
    rng = random.Random(1)
    count = 0
    with open(path, "w") as f:
        while f.tell() < megabytes * 2**20:
            f.write(json.dumps({"id": f"d{count}", "text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n")
            count += 1
    return count


def _connector(source, **source_options):
    job = resolve_job(build_job({"source": {"uri": str(source), **source_options}, "output": {"uri": "unused"}}))
    return make_connector(job)


def test_a_2mb_jsonl_with_4_readers_gives_every_reader_shards(tmp_path) -> None:
    source = tmp_path / "small.jsonl"
    _jsonl(source, 2)
    assert len(_connector(source).list_shards()) == 1  # at the default 64 MB: one shard, one busy reader
    shards, shard_bytes = plan_shards(_connector(source), readers=4)
    assert len(shards) >= 4 * 2 - 1 and shard_bytes >= MIN_SHARD_BYTES
    assert sum(s.size_bytes for s in shards) == source.stat().st_size  # the whole file, no overlap
    tiny = tmp_path / "tiny.jsonl"
    _jsonl(tiny, 0.1)
    assert len(plan_shards(_connector(tiny), readers=8)[0]) == 1  # never below MIN_SHARD_BYTES


def test_a_large_file_keeps_shard_size_mb(tmp_path) -> None:
    source = tmp_path / "large.jsonl"
    _jsonl(source, 6)
    shards, shard_bytes = plan_shards(_connector(source, shard_size_mb=1), readers=2)
    assert shard_bytes == 2**20 and len(shards) == -(-source.stat().st_size // 2**20)
    assert all(abs(s.size_bytes - 2**20) < 0.01 * 2**20 for s in shards[:-1])


def test_the_shard_size_is_stored_and_kept_by_later_runs(tmp_path) -> None:
    source = tmp_path / "corpus.jsonl"
    docs = _jsonl(source, 1)
    out = tmp_path / "out"

    def job(workers: int) -> dict:
        return {"source": {"uri": str(source)}, "output": {"uri": str(out), "sink": "parquet"},
                "model": {"device": "cpu"}, "chunking": {"max_tokens": 64},
                "runner": {"workers": workers, "show_progress": False}, "validation": {"canary_samples": 2}}

    first = run(build_job(job(2)))
    planned = first.shards_total  # 2 readers want 4 shards: 1 MB in quarters
    assert first.state == "done" and planned >= 4 and first.shard_bytes == source.stat().st_size // 4
    assert Checkpoint(str(out)).generation()["shard_bytes"] == first.shard_bytes
    # a machine with more readers resumes/extends the same output: the same shards, nothing redone
    again = run(build_job(job(6)))
    assert again.shards_total == planned and again.shards_skipped == planned and again.chunks == 0
    ids = read_output(str(out), "parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) and len({i.split("#")[0] for i in ids}) == docs
