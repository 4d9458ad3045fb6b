"""Canaries and vector sanity checks: a broken encoder fails the run; bad vectors never land."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.config import build_job
from embedder.validate import CanarySampler, vector_problems

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart" / "docs.jsonl"


def test_vector_problems() -> None:
    vectors = np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 0.0], [np.inf, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert vector_problems(vectors).tolist() == [
        "", "vector has NaN or Inf values", "vector has zero norm", "vector has NaN or Inf values", ""]


def test_sampler_is_uniform_and_bounded() -> None:
    sampler = CanarySampler(10, seed=1)
    for i in range(10_000):
        sampler.offer(str(i), "t", np.zeros(2))
    assert len(sampler.samples) == 10
    assert np.mean([int(s[0]) for s in sampler.samples]) > 2000  # not just the first ten


def test_normal_run_records_canary_cosines(tmp_path) -> None:
    out = tmp_path / "out"
    result = run(build_job({"source": {"uri": str(QUICKSTART)}, "output": {"uri": str(out), "sink": "parquet"},
                            "model": {"device": "cpu"}, "runner": {"show_progress": False},
                            "validation": {"canary_samples": 8}}))
    assert result.canary["count"] == 8 and result.canary["min_cosine"] >= 0.9999
    assert Checkpoint(str(out)).runs()[-1]["canary"]["min_cosine"] >= 0.9999


def test_corrupted_encoder_fails_the_run_with_exit_1(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "EMBEDDER_TEST_CORRUPT_VECTORS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", "run", "--source", str(QUICKSTART), "--output", str(out),
         "--sink", "parquet", "--device", "cpu", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "canary check failed" in proc.stderr and "#0 (cos" in proc.stderr
    runs = Checkpoint(str(out)).runs()
    assert runs[-1]["state"] == "failed" and "canary" in json.dumps(runs[-1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "embedder.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_validate_fails_naming_the_rows_a_deleted_part_file_took(tmp_path) -> None:
    """Issue #19 item 13: a deleted part file (its rows gone) passed validate."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    proc = _cli("run", "--source", str(QUICKSTART), "--output", str(out), "--sink", "parquet", "--no-progress",
                "--set", "source.shard_size_mb=0.002", "--set", "model.device=cpu")
    assert proc.returncode == 0, proc.stderr
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 3
    ok = _cli("validate", str(out), "-n", "4", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report.get("row_count") is None and report["ok"] is True
    total, lost = report["rows"], pq.read_metadata(parts[1]).num_rows
    shards = len(Checkpoint(str(out)).completed())

    parts[1].unlink()
    proc = _cli("validate", str(out), "-n", "4")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (
        f"error: validation failed for {out}: the output holds {total - lost:,} rows but the completion records of "
        f"its {shards:,} shards count {total:,}: {lost:,} rows missing (a deleted part file, a rolled-back or "
        "outside-written table?); run again with --mode reembed to rebuild it"
    )
