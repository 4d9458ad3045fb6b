"""One ``embedder.run`` in a fresh process, and what the benchmarks that compare runs read of it.

``bench_ray.py`` and ``bench_multi_gpu.py`` run the same job several ways (one GPU, every GPU, Ray),
each in its own process so no run inherits another's CUDA context, imported modules or warm caches.
The child prints the run record's figures as one ``RESULT {json}`` line; the parent adds the wall
time and the peak memory of the child's process tree (PSS: shared pages such as Ray's object store
counted once), plus any other processes the caller names (the nodes of a Ray cluster it started).

Run as a script it is the child: ``python benchmarks/fresh_run.py --job '<job json>'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models

MEMORY_PERIOD_S = 0.5


def child(job_json: str) -> None:
    """One run, in this process: prints the run record's figures as one JSON line."""
    from benchmarks.bench_pipeline import _timeline_figures
    from embedder import run
    from embedder.config import build_job
    from embedder.execution.telemetry import TimelineSampler

    TimelineSampler.PERIOD_S = 0.25  # a finer timeline than the run record's default, for the steady rate
    job = build_job(json.loads(job_json))
    t0 = time.perf_counter()
    result = run(job)
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        **_timeline_figures(result.timeline, result.tokens),
        "state": result.state, "tokens": result.tokens, "chunks": result.chunks, "rows": result.rows_written,
        "embed_s": result.pipeline_seconds, "wall_s": wall, "tokens_per_s": result.tokens_per_second,
        "load_s": result.load_seconds, "encode_s": result.encode_seconds,
        "canary_min_cos": (result.canary or {}).get("min_cosine"), "commit_s": result.commit_seconds,
        "shards": result.shards_total, "encoders": result.encoders,
        "encoder_tokens_per_s": result.encoder_tokens_per_second,
    }), flush=True)


def run_fresh(job: dict[str, Any], gpus: str | None = None, env: dict[str, str] | None = None,
              also_measure: Callable[[], set[int]] | None = None,
              watch: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Runs ``job`` in a fresh process and returns the child's figures plus ``process_wall_s`` and
    ``peak_memory_gb`` (PSS of the child's process tree and of ``also_measure()``'s processes).

    Args:
        job: The job, as a dict.
        gpus: ``CUDA_VISIBLE_DEVICES`` of the child (None: inherited).
        env: More environment of the child.
        also_measure: Other processes the run uses (a Ray cluster's nodes), sampled with the child's.
        watch: Called with the seconds since the child started, every ``MEMORY_PERIOD_S`` (a fault
            injector: it may kill a Ray node while the run goes on).

    Raises:
        SystemExit: the run failed (its output's tail is printed).
    """
    from tests.embedder.runners.ray_nodes import processes_of

    child_env = {**os.environ, **(env or {})}
    if gpus is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = gpus
    cmd = [sys.executable, __file__, "--job", json.dumps(job)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(MEMORY_PERIOD_S):
            pids = processes_of(proc.pid) | (also_measure() if also_measure else set())
            peak[0] = max(peak[0], pss_bytes(pids))
            if watch is not None:
                watch(time.perf_counter() - started)

    sampler = threading.Thread(target=sample, name="bench-memory", daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-6000:])
        raise SystemExit(f"{job['runner'].get('kind', 'local')} run failed (exit {proc.returncode})")
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    return {**figures, "process_wall_s": time.perf_counter() - started, "peak_memory_gb": peak[0] / 1e9}


def pss_bytes(pids: set[int]) -> int:
    """Proportional set size of ``pids`` together (0 for those gone or unreadable)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def read_vectors(output: str) -> tuple[list[str], np.ndarray]:
    """A Parquet output's ids (sorted) and their vectors, fp32."""
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["id", "vector"]).sort_by("id")
    ids = table.column("id").to_pylist()
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, flat.reshape(len(ids), -1).astype(np.float32)


def compare_outputs(reference: str, other: str) -> dict[str, Any]:
    """``other`` against ``reference``: same ids (no duplicate, none missing), minimum cosine."""
    ids_a, vec_a = read_vectors(reference)
    ids_b, vec_b = read_vectors(other)
    same = ids_a == ids_b and len(set(ids_b)) == len(ids_b)
    if not same or not ids_a:
        return {"rows": len(ids_b), "same_ids": same, "min_cos": float("nan")}
    cos = (vec_a * vec_b).sum(1) / (np.linalg.norm(vec_a, axis=1) * np.linalg.norm(vec_b, axis=1))
    return {"rows": len(ids_b), "same_ids": True, "min_cos": float(cos.min())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="the job, as JSON")
    child(parser.parse_args().job)
