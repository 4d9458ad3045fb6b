"""Exactly-once resume: SIGKILL at named failpoints and at random times, SIGTERM drains, the lease
admits one writer, the spot watcher drains. After every crash a rerun of the same command must give
exactly the output of an uninterrupted run."""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.config import build_job
from embedder.lease import LEASE_FILE
from tests.embedder.outputs import read_output, wait_lease_expired

REPO = Path(__file__).resolve().parents[3]
CHAIN = ["after_read@2", "mid_encode@2", "after_sink_write@1", "after_commit@2", "during_finish"]
TOPICS = ["rivers", "mountains", "bread", "stars", "bees", "chess", "tides", "volcanoes", "coffee", "sleep"]


def _corpus(path: Path, docs: int = 120) -> Path:
    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            topic = TOPICS[i % len(TOPICS)]
            words = " ".join(rng.choice(["the", "a", "of", topic, "water", "light", "time", "people", "small", "old"]) for _ in range(rng.randint(20, 160)))
            f.write(json.dumps({"id": f"doc-{i}", "title": topic, "text": f"A note about {topic}. {words}."}) + "\n")
            if i % 40 == 5:
                f.write('{"id": "broken-' + str(i) + '", "text": \n')  # malformed: quarantined
    return path


def _settings(output: str, sink: str) -> list[str]:
    return [
        "--output", output, "--sink", sink, "--format", "jsonl", "--no-progress",
        "--set", "source.shard_size_mb=0.002", "--set", "chunking.max_tokens=64",
        "--set", "runner.workers=1", "--set", "runner.lease_ttl_s=2", "--set", "model.device=cpu",
        "--set", "model.token_budget=512",
    ]


def _run_cli(source: Path, output: str, sink: str, env_extra: dict | None = None, extra: list[str] | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    cmd = [sys.executable, "-m", "embedder.cli", "run", "--source", str(source), *_settings(output, sink), *(extra or [])]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _assert_equal_to_reference(output: str, sink: str, reference) -> None:
    table = read_output(output, sink).sort_by("id")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids after resume"
    assert ids == reference["ids"], "missing or extra chunks after resume"
    vectors = np.asarray(table.column("vector").to_pylist())
    assert np.sum(vectors * reference["vectors"], axis=1).min() >= 0.9999
    checkpoint = Checkpoint(output)
    assert len(checkpoint.quarantine()) == reference["quarantined"]
    assert len(checkpoint.completed()) == reference["shards"]
    if sink == "parquet":  # no orphan part files: one per shard with rows, nothing else visible
        fs, path = fsspec.core.url_to_fs(output)
        files = ds.dataset(path, format="parquet", filesystem=fs).files
        assert len(files) == len(set(table.column("shard_id").to_pylist()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("resume") / "corpus.jsonl")


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory) -> dict:
    out = {}
    for sink in ("parquet", "lance"):
        output = str(tmp_path_factory.mktemp("ref") / sink)
        proc = _run_cli(corpus, output, sink)
        assert proc.returncode == 0, proc.stderr
        table = read_output(output, sink).sort_by("id")
        checkpoint = Checkpoint(output)
        out[sink] = {
            "ids": table.column("id").to_pylist(),
            "vectors": np.asarray(table.column("vector").to_pylist()),
            "quarantined": len(checkpoint.quarantine()),
            "shards": len(checkpoint.completed()),
            "run": checkpoint.runs()[-1],
            "output": output,  # the clean output itself: copied by tests that damage one
        }
        assert out[sink]["shards"] >= 8 and out[sink]["quarantined"] == 3
    return out


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_crash_chain_then_resume(corpus, references, sink, storage, tmp_path, request) -> None:
    """A SIGKILL at each named failpoint in a row (Lance: also inside the final compaction), then a
    clean rerun."""
    if storage == "s3":
        output = f"{request.getfixturevalue('s3_bucket')}/out-{sink}"
    else:
        output = str(tmp_path / sink)
    for point in CHAIN + (["during_compaction"] if sink == "lance" else []):
        proc = _run_cli(corpus, output, sink, {"EMBEDDER_FAILPOINT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: expected SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}"
        wait_lease_expired(output)
    proc = _run_cli(corpus, output, sink)
    assert proc.returncode == 0, proc.stderr
    _assert_equal_to_reference(output, sink, references[sink])


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_random_kills_then_resume(corpus, references, sink, tmp_path) -> None:
    output = str(tmp_path / sink)
    rng = random.Random(11)
    for _ in range(2):
        proc = _run_cli(corpus, output, sink, {"EMBEDDER_FAILPOINT_DELAY": "mid_encode:0.05"}, wait=False)
        time.sleep(rng.uniform(4.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        wait_lease_expired(output)
    proc = _run_cli(corpus, output, sink)
    assert proc.returncode == 0, proc.stderr
    _assert_equal_to_reference(output, sink, references[sink])


def _wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_a_killed_runner_leaves_no_reader_process_behind(corpus, tmp_path) -> None:
    """Readers fork from a fork server, not from the runner; when the runner is SIGKILLed they must
    still end at once. They share its stdout/stderr, so ``communicate`` returning proves it: an
    orphaned reader would hold the pipes open and the caller would wait forever."""
    output = str(tmp_path / "out")
    proc = _run_cli(corpus, output, "parquet", {"EMBEDDER_FAILPOINT": "mid_encode@2"},
                    extra=["--set", "runner.workers=2"], wait=False)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, stderr


def test_sigterm_drains_exits_75_and_resumes(corpus, references, tmp_path) -> None:
    output = str(tmp_path / "out")
    proc = _run_cli(corpus, output, "parquet", {"EMBEDDER_FAILPOINT_DELAY": "mid_encode:0.3"},
                    extra=["--set", "runner.grace_period_s=20"], wait=False)
    _wait_for(lambda: len(Checkpoint(output).completed()) >= 1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert time.time() - sent < 20 + 10
    assert "interrupted" in stderr
    done_after_stop = len(Checkpoint(output).completed())
    assert 1 <= done_after_stop < references["parquet"]["shards"]
    assert Checkpoint(output).runs()[-1]["state"] == "interrupted"
    proc = _run_cli(corpus, output, "parquet")
    assert proc.returncode == 0, proc.stderr
    _assert_equal_to_reference(output, "parquet", references["parquet"])


def test_one_writer_per_output(corpus, references, tmp_path) -> None:
    output = str(tmp_path / "out")
    first = _run_cli(corpus, output, "lance", {"EMBEDDER_FAILPOINT_DELAY": "mid_encode:0.3"}, wait=False)
    _wait_for(lambda: Path(output, "_embedder", "lease.json").exists())
    second = _run_cli(corpus, output, "lance")
    assert second.returncode == 75
    assert "being written by another job" in second.stderr and "--force-unlock" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # The dead job's lease still stands until it expires; then a new job takes over and completes.
    wait_lease_expired(output)
    third = _run_cli(corpus, output, "lance")
    assert third.returncode == 0, third.stderr
    _assert_equal_to_reference(output, "lance", references["lance"])


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): state ``T`` in /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _stale_writer_thawed_after_a_takeover(corpus, output: str, sink: str, stale_env: dict) -> str:
    """A run frozen by ``stale_env``'s failpoint, past its lease, a second run started once the
    lease expired, the first thawed after the second's first commit: the stale one must exit 1
    with the lease-lost line and no traceback, the second 0. Returns the second's stderr."""
    stale = _run_cli(corpus, output, sink, stale_env, wait=False)
    takeover = None
    try:
        _wait_for(lambda: stale.poll() is None and _stopped(stale.pid))
        wait_lease_expired(output)
        takeover = _run_cli(corpus, output, sink, {"EMBEDDER_FAILPOINT_DELAY": "mid_encode:0.3"}, wait=False)
        _wait_for(lambda: len(Checkpoint(output).completed()) >= 1)
    finally:
        os.kill(stale.pid, signal.SIGCONT)
    _, stderr = stale.communicate(timeout=120)
    assert stale.returncode == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "another job took this output over" in last or "lease was taken over by another job" in last, last
    _, takeover_err = takeover.communicate(timeout=300)
    assert takeover.returncode == 0, takeover_err
    return takeover_err


@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_a_writer_paused_past_its_lease_cannot_commit_after_a_takeover(corpus, references, sink, tmp_path) -> None:
    """Issue #19 case 1: a writer frozen (SIGSTOP, every thread) right before it publishes a shard,
    past runner.lease_ttl_s, while a second run takes the output over. Resumed in the middle of the
    second run (after its first commit), the stale writer's commit is refused by the fence: it
    exits 1 with one clear line, adds no version and no row, its staged rows are gone, and the
    second run ends exactly like a clean run (no duplicate id)."""
    output = str(tmp_path / "out")
    takeover_err = _stale_writer_thawed_after_a_takeover(corpus, output, sink, {"EMBEDDER_FAILPOINT_STOP": "before_publish"})
    assert "taking over the expired lease" in takeover_err
    _assert_equal_to_reference(output, sink, references[sink])
    if sink == "parquet":
        assert not list(Path(output, "_embedder", "staging").glob("part-*"))  # staged rows removed
    else:
        runs = {r["run_id"]: r for r in Checkpoint(output).runs()}
        assert {c["run_id"] for c in Checkpoint(output).completed().values()} == {
            r for r, rec in runs.items() if rec.get("state") == "done"
        }  # every shard committed by the second run


@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_a_writer_frozen_before_fencing_does_not_fence_out_the_takeover(corpus, references, sink, tmp_path) -> None:
    """The stale writer freezes after checking its lease and before fencing the output (SIGSTOP at
    ``before_fence``) and thaws after a second run took the output over and committed a shard: its
    late fence must not replace the newer token (the second run would then be the one refused, and
    the Parquet fence would delete its staged files). It stops with the lease-lost line; the second
    run ends like a clean run."""
    output = str(tmp_path / "out")
    _stale_writer_thawed_after_a_takeover(corpus, output, sink, {"EMBEDDER_FAILPOINT_STOP": "before_fence"})
    _assert_equal_to_reference(output, sink, references[sink])


@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_a_run_whose_lease_generation_restarted_still_fences(corpus, references, sink, tmp_path) -> None:
    """Lease generations restart at 1 once a finished run removed its lease file, so the next run's
    token can carry a smaller generation than the token stored in the sink (a job took an expired
    lease of generation 5 over, finished, and the next run starts at 1). It must still fence and
    run: a sink that ordered tokens by generation refused it (CI's test_random_kills_then_resume)."""
    output = str(tmp_path / "out")
    lease = Path(output, LEASE_FILE)
    lease.parent.mkdir(parents=True)
    lease.write_text(json.dumps({"owner": "dead", "generation": 5, "host": "gone", "pid": 1, "expires_at": 0}))
    first = _run_cli(corpus, output, sink)
    assert first.returncode == 0, first.stderr
    assert not lease.exists()  # released: the next run's lease is generation 1
    second = _run_cli(corpus, output, sink)  # nothing pending, but it fences like every run
    assert second.returncode == 0, second.stderr
    _assert_equal_to_reference(output, sink, references[sink])


def test_a_writer_frozen_mid_renewal_does_not_overwrite_the_takeovers_lease(corpus, references, tmp_path) -> None:
    """The stale writer freezes inside its lease heartbeat, after reading its own lease and before
    renewing it (SIGSTOP at ``lease_renew``), and thaws after a second run took the output over:
    its late renewal must not replace the new lease (the second run would then stop as if taken
    over). It stops with the lease-lost line; the second run ends like a clean run. The lease is
    the same for both sinks."""
    output = str(tmp_path / "out")
    stale_env = {"EMBEDDER_FAILPOINT_STOP": "lease_renew", "EMBEDDER_FAILPOINT_DELAY": "mid_encode:0.3"}
    _stale_writer_thawed_after_a_takeover(corpus, output, "parquet", stale_env)
    _assert_equal_to_reference(output, "parquet", references["parquet"])


class _SpotHandler(http.server.BaseHTTPRequestHandler):
    notice_after = 0.0

    def do_PUT(self) -> None:  # IMDSv2 token
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"token")

    def do_GET(self) -> None:
        if time.time() < type(self).notice_after:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"action": "terminate", "time": "2026-11-28T12:00:00Z"}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_spot_notice_drains_and_exits_75(corpus, references, tmp_path) -> None:
    _SpotHandler.notice_after = time.time() + 12
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SpotHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data/spot/instance-action"
    output = str(tmp_path / "out")
    try:
        proc = _run_cli(corpus, output, "parquet", {"EMBEDDER_FAILPOINT_DELAY": "mid_encode:1.0"},
                        extra=["--set", "runner.spot_watch=true", "--set", f"runner.spot_url={url}",
                               "--set", "runner.spot_poll_s=0.5", "--set", "runner.grace_period_s=20"])
    finally:
        server.shutdown()
    assert proc.returncode == 75, proc.stderr
    assert "spot interruption notice" in proc.stderr
    proc = _run_cli(corpus, output, "parquet")
    assert proc.returncode == 0, proc.stderr
    _assert_equal_to_reference(output, "parquet", references["parquet"])


def test_in_process_rerun_is_idempotent(corpus, references, tmp_path) -> None:
    job = {
        "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": 0.002},
        "output": {"uri": str(tmp_path / "out"), "sink": "parquet"},
        "model": {"device": "cpu", "token_budget": 512}, "chunking": {"max_tokens": 64},
        "runner": {"workers": 1, "show_progress": False},
    }
    first = run(build_job(job))
    second = run(build_job(job))
    assert first.state == second.state == "done" and second.rows_written == 0
    _assert_equal_to_reference(str(tmp_path / "out"), "parquet", references["parquet"])


def _truncate(path: Path) -> None:
    """Cuts a state file in half, as a full disk or a copy killed halfway leaves it."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _clean_copy(references: dict, sink: str, tmp_path: Path) -> str:
    """A copy of the fixture's uninterrupted run of the same command (exit 0, checked there)."""
    output = str(tmp_path / "out")
    shutil.copytree(references[sink]["output"], output, symlinks=True)
    return output


def test_a_truncated_completion_record_is_dropped_and_its_shard_redone_exactly(corpus, references, tmp_path) -> None:
    """Issue #19 item 13: a cut completion record gave a bare JSON error naming no file."""
    output = _clean_copy(references, "lance", tmp_path)
    before = read_output(output, "lance").sort_by("id")
    records = sorted(Path(output, "_embedder", "shards").glob("*.json"))
    victim = next(p for p in records if json.loads(p.read_text())["rows"] > 0)
    shard_id, rows = json.loads(victim.read_text())["shard_id"], json.loads(victim.read_text())["rows"]
    _truncate(victim)

    proc = _run_cli(corpus, output, "lance")
    assert proc.returncode == 0, proc.stderr
    assert f"ignoring the corrupt completion record {victim} (" in proc.stderr
    assert "its shard is embedded again by the next run" in proc.stderr
    assert f"1 embedded, {len(records) - 1} already done" in proc.stdout
    after = read_output(output, "lance").sort_by("id")
    ids = after.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == before.num_rows  # the shard's old rows were aborted first
    assert ids == before.column("id").to_pylist()
    assert set(after.column("doc_id").to_pylist()) == set(before.column("doc_id").to_pylist())
    assert after.filter(pc.equal(after.column("shard_id"), shard_id)).num_rows == rows
    assert json.loads(victim.read_text())["shard_id"] == shard_id  # the record is whole again


def test_a_truncated_generation_record_is_one_line_naming_the_file_and_the_fix(corpus, references, tmp_path) -> None:
    output = _clean_copy(references, "parquet", tmp_path)
    before = read_output(output, "parquet").sort_by("id").column("id").to_pylist()
    generation = Path(output, "_embedder", "generation.json")
    size = len(generation.read_bytes()) // 2
    _truncate(generation)
    message = (
        f"error: the generation record {generation} is corrupt ({size} bytes that are not a whole record "
        "(truncated JSON?)); which pass the output is in cannot be rebuilt from the other state files. Remove it "
        "and embed everything again with --mode reembed (the old rows are replaced), or write to a new output"
    )
    proc = _run_cli(corpus, output, "parquet")
    assert (proc.returncode, proc.stderr.strip()) == (2, message)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    status = subprocess.run([sys.executable, "-m", "embedder.cli", "status", output], env=env, capture_output=True, text=True)
    assert (status.returncode, status.stderr.strip()) == (2, message)

    generation.unlink()  # the fix the message names
    proc = _run_cli(corpus, output, "parquet", extra=["--mode", "reembed"])
    assert proc.returncode == 0, proc.stderr
    ids = read_output(output, "parquet").sort_by("id").column("id").to_pylist()
    assert ids == before


def test_history_marks_a_killed_run_killed(corpus, tmp_path) -> None:
    """A SIGKILLed run never writes its end: the next run (holding the lease, so nothing else is
    alive) marks its record ``killed`` instead of leaving it ``running`` for ever."""
    output = str(tmp_path / "out")
    killed = _run_cli(corpus, output, "parquet", {"EMBEDDER_FAILPOINT": "after_commit@2"})
    assert killed.returncode == -signal.SIGKILL
    assert [r["state"] for r in Checkpoint(output).runs()] == ["running"]
    resumed = _run_cli(corpus, output, "parquet", extra=["--force-unlock"])
    assert resumed.returncode == 0, resumed.stderr
    runs = Checkpoint(output).runs()
    assert [r["state"] for r in runs] == ["killed", "done"] and "killed or crashed" in runs[0]["error"]


@pytest.mark.parametrize("sink", ["parquet", "lance"])
def test_history_after_a_crash_shows_the_whole_pass(corpus, references, sink, tmp_path) -> None:
    """Issue #19 case 14, second half: after a SIGKILL mid-way and a resume, ``history`` shows the
    killed run as killed and the resumed run's record carries the totals of the whole pass (rows,
    shards, documents, chunks, tokens of both runs together, equal to an uninterrupted run's), not
    only the part it embedded itself; ``status`` shows the same totals."""
    output = str(tmp_path / "out")
    reference = references[sink]
    killed = _run_cli(corpus, output, sink, {"EMBEDDER_FAILPOINT": "after_commit@3"})
    assert killed.returncode == -signal.SIGKILL
    resumed = _run_cli(corpus, output, sink, extra=["--force-unlock"])
    assert resumed.returncode == 0, resumed.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    history = subprocess.run([sys.executable, "-m", "embedder.cli", "history", output, "--json"], env=env,
                             capture_output=True, text=True)
    assert history.returncode == 0, history.stderr
    first, last = json.loads(history.stdout)
    assert (first["state"], last["state"]) == ("killed", "done") and first["pass_totals"] is None
    totals, clean = last["pass_totals"], reference["run"]
    assert totals["rows"] == len(reference["ids"]) == clean["rows_written"] == clean["pass_totals"]["rows"]
    assert totals["shards"] == reference["shards"]
    assert (totals["documents"], totals["chunks"], totals["tokens"]) == (clean["documents"], clean["chunks"], clean["tokens"])
    assert totals["runs"] == 2 and totals["complete"]
    assert last["tokens_embedded"] < totals["tokens"]  # its own part: the killed run committed shards first
    table = subprocess.run([sys.executable, "-m", "embedder.cli", "history", output], env={**env, "COLUMNS": "250"},
                           capture_output=True, text=True)
    assert "killed" in table.stdout and f"{totals['rows']:,}" in table.stdout
    status = subprocess.run([sys.executable, "-m", "embedder.cli", "status", output, "--json"], env=env,
                            capture_output=True, text=True)
    info = json.loads(status.stdout)
    assert {k: info[k] for k in ("rows", "documents", "chunks", "tokens", "shards_done", "pass_runs")} == {
        "rows": totals["rows"], "documents": totals["documents"], "chunks": totals["chunks"],
        "tokens": totals["tokens"], "shards_done": totals["shards"], "pass_runs": 2,
    }


def _append_docs(path: Path, start: int, count: int) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for i in range(start, start + count):
            f.write(json.dumps({"id": f"doc-{i}", "title": "added", "text": f"An added note number {i} about tides."}) + "\n")


@pytest.mark.parametrize("shard_mb", ["0.002", "64"], ids=["eleven-shards", "one-shard"])
def test_a_full_rerun_over_a_changed_source_is_refused_naming_incremental(shard_mb, tmp_path) -> None:
    """Issue #19 case 3: lines appended to a many-shard JSONL move its byte-range shard ids (a full
    rerun kept the old ranges' rows beside the new ones: duplicates), and a one-shard file keeps its
    id (a full rerun skipped it: only the old rows). Either is refused with exit 2 naming the modes
    that handle a changed source, the output untouched; --mode incremental then makes it exact."""
    source = _corpus(tmp_path / "corpus.jsonl", docs=120 if shard_mb == "0.002" else 20)
    output = str(tmp_path / "out")
    size = ["--set", f"source.shard_size_mb={shard_mb}"]
    first = _run_cli(source, output, "parquet", extra=size)
    assert first.returncode == 0, first.stderr
    before = read_output(output, "parquet").sort_by("id")
    shards = len(Checkpoint(output).completed())
    assert shards >= 8 if shard_mb == "0.002" else shards == 1
    _append_docs(source, 1000, 100)
    again = _run_cli(source, output, "parquet", extra=size)
    assert again.returncode == 2, again.stderr
    last = again.stderr.strip().splitlines()[-1]
    assert "changed since this output was written" in last and "--mode incremental" in last, last
    assert "--mode reembed" in last and "Traceback" not in again.stderr
    assert read_output(output, "parquet").sort_by("id").equals(before)
    fixed = _run_cli(source, output, "parquet", extra=[*size, "--mode", "incremental"])
    assert fixed.returncode == 0, fixed.stderr
    table = read_output(output, "parquet")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    docs = set(table.column("doc_id").to_pylist())
    assert {f"doc-{i}" for i in range(1000, 1100)} <= docs
    assert set(before.column("doc_id").to_pylist()) <= docs


def test_search_keeps_working_while_a_run_finishes(corpus, references, tmp_path) -> None:
    """Issue #19 case 9: a search that opened the table before a run's ``finish`` (compaction, the
    full-text index, then the old versions' files deleted) read a data file the cleanup removed:
    "lance error: Not found .../data/....lance". Searches run in a loop from a thread, each opening
    the output and then waiting as the CLI does while it loads the model, from before the finish to
    after it; one index opened before the finish is searched after it. Every search succeeds, and
    finds the row whose vector is the query."""
    from indexes.search import open_index

    output = str(tmp_path / "out")
    reference = references["lance"]
    query_id, query_vector = reference["ids"][0], reference["vectors"][0]
    proc = _run_cli(corpus, output, "lance", {"EMBEDDER_FAILPOINT_DELAY": "during_finish:3"}, wait=False)
    try:
        deadline = time.monotonic() + 300
        while len(Checkpoint(output).completed()) < reference["shards"]:  # every shard in: the end phase
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        held = open_index(output, embed_query=lambda _: query_vector)
        assert held.search("rivers", k=3, mode="fts")  # before the finish: no FTS index yet, a scan
        outcomes: list[tuple[str, list[str]] | BaseException] = []

        def searches() -> None:
            while proc.poll() is None or len(outcomes) < 4:
                try:
                    index = open_index(output, embed_query=lambda _: query_vector)
                    time.sleep(0.3)  # the CLI loads the model between opening and querying
                    for mode in ("vector", "fts", "hybrid"):
                        outcomes.append((mode, [h.id for h in index.search("rivers", k=3, mode=mode)]))
                except BaseException as err:  # noqa: BLE001 - every failure is the test's
                    outcomes.append(err)

        thread = threading.Thread(target=searches)
        thread.start()
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
        thread.join(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    assert len(outcomes) >= 12 and all(ids for _, ids in outcomes)
    assert all(ids[0] == query_id for mode, ids in outcomes if mode == "vector")
    assert [h.id for h in held.search("rivers", k=3)][0] == query_id  # its version's files are gone
    assert held.search("rivers", k=3, mode="fts") and held.has_text_index  # moved on to the latest version
    assert held.count_rows() == len(reference["ids"])
