"""The Ray runner on a cluster of three nodes on this machine — a head and two worker nodes, each its
own raylet, object store and workers (``tests/embedder/runners/ray_nodes.py``) — and one worker node killed
mid-run, as a machine that vanishes: its encoder actor, its read tasks and the blocks in its object
store are gone. The job still finishes with exactly the output of an uninterrupted single-process
run (same ids, no duplicate, no loss, vectors at cosine ≥ 0.9999).

The run with the kill and a clean run on the same cluster are both timed; the difference (the time
the loss cost) is printed as a figure, not asserted — ``benchmarks/bench_multi_gpu.py`` measures it
on GPUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from embedder import run
from embedder.config import build_job
from embedder.execution.result import RunResult
from tests.embedder.outputs import assert_same_rows, read_output, sample_articles
from tests.embedder.runners.ray_nodes import RAY_ENV, LocalRayCluster

pytestmark = pytest.mark.slow  # three raylets start (~30 s on 2 cores) and the sample is embedded 3 times

CHARS_PER_ARTICLE = 800
KILL_AFTER_COMMITS = 2


@pytest.fixture(scope="module")
def cluster():
    """A head of 1 CPU and two worker nodes of 2 CPUs; the test process is its driver.

    5 CPUs: 2 encoder actors of 1 CPU and read tasks; after one worker node is lost, 3 CPUs still
    hold both actors (the lost one restarts on a surviving node) and one read task.
    """
    import ray

    env = pytest.MonkeyPatch()
    for key, value in RAY_ENV.items():
        env.setenv(key, value)
    nodes = LocalRayCluster(head_cpus=1)
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=2)
        nodes.wait_for_nodes(3)
        nodes.connect()
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, wiki_sample) -> Path:
    path = tmp_path_factory.mktemp("nodes-corpus") / "wiki.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for article in sample_articles(wiki_sample, CHARS_PER_ARTICLE):
            f.write(json.dumps(article) + "\n")
    return path


def _job(source: Path, output: Path, runner: str) -> dict:
    return {
        "source": {"uri": str(source), "format": "jsonl", "metadata_fields": ["url"], "shard_size_mb": 0.01},
        "output": {"uri": str(output), "sink": "lance"},
        "model": {"name": "all-MiniLM-L6-v2", "device": "cpu", "token_budget": 1024},
        "chunking": {"max_tokens": 128},
        "runner": {"kind": runner, "workers": 2, "show_progress": False,
                   **({"encoders": 2} if runner == "ray" else {})},
        "validation": {"canary_samples": 0},
    }


def test_ray_job_survives_a_lost_worker_node(cluster, corpus, tmp_path) -> None:
    import ray

    nodes = cluster
    reference_run = run(build_job(_job(corpus, tmp_path / "local", "local")))
    assert reference_run.state == "done" and reference_run.shards_total > KILL_AFTER_COMMITS + 2
    reference = read_output(str(tmp_path / "local"), "lance").sort_by("id")

    t0 = time.perf_counter()
    clean = run(build_job(_job(corpus, tmp_path / "clean", "ray")))
    clean_s = time.perf_counter() - t0
    assert clean.state == "done" and clean.runner == "ray"
    assert_same_rows(read_output(str(tmp_path / "clean"), "lance").sort_by("id"), reference)

    killed: dict[str, object] = {}

    def kill_a_node(result: RunResult, _sequences: int) -> None:
        if killed or result.shards_done < KILL_AFTER_COMMITS:
            return
        victim = nodes.node_running("EncoderActor")
        if victim is None:
            return  # no actor on a worker node at this instant: try at the next progress call
        killed.update(node=victim.name, at_s=time.perf_counter() - t1, shards_done=result.shards_done,
                      processes=nodes.kill(victim))

    t1 = time.perf_counter()
    faulted = run(build_job(_job(corpus, tmp_path / "faulted", "ray")), on_progress=kill_a_node)
    faulted_s = time.perf_counter() - t1
    assert killed, "no worker node held an encoder actor after the first commits: nothing was killed"
    assert killed["shards_done"] < faulted.shards_total, "the node died after the last commit"
    # The GCS marks a silent node dead after missed health checks (~15-30 s): the run may end first.
    deadline = time.time() + 90
    while [n["Alive"] for n in ray.nodes()].count(True) > 2:
        assert time.time() < deadline, f"the cluster never saw the node die: {killed}"
        time.sleep(0.5)
    assert faulted.state == "done" and faulted.shards_done == faulted.shards_total == reference_run.shards_total
    table = read_output(str(tmp_path / "faulted"), "lance").sort_by("id")
    assert_same_rows(table, reference)
    assert faulted.rows_written == table.num_rows == reference.num_rows
    print(f"\nray on 3 nodes, {faulted.shards_total} shards, {faulted.tokens:,} tokens: clean {clean_s:.1f} s; "
          f"{killed['node']} killed ({killed['processes']} processes) at {killed['at_s']:.1f} s after "
          f"{killed['shards_done']} commits: {faulted_s:.1f} s (lost {faulted_s - clean_s:+.1f} s)")
