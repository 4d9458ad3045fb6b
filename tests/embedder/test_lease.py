"""The output's lease: a corrupt lease file (0 bytes, truncated JSON) is a dead job's, never a lock
for good (issue #19 item 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedder.lease import Lease

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "embedder.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _run(output: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("run", "configs/quickstart.yaml", "--output", str(output), "--no-progress", *extra)


@pytest.mark.parametrize(
    "content,why,flags",
    [
        pytest.param(b"", "0 bytes", [], id="empty"),
        pytest.param(b"", "0 bytes", ["--force-unlock"], id="empty-force-unlock"),
        pytest.param(
            b'{"owner": "4f1c", "host": "spot-7", "pid": 81, "heartbeat_at": 17',
            "65 bytes that are not a lease record (truncated JSON?)", [], id="truncated-json",
        ),
    ],
)
def test_a_corrupt_lease_file_is_taken_over_with_a_warning_naming_it(content, why, flags, tmp_path) -> None:
    output = tmp_path / "db"
    first = _run(output)
    assert first.returncode == 0, first.stderr
    lease_file = output / "_embedder" / "lease.json"
    assert not lease_file.exists()
    lease_file.write_bytes(content)  # what a full disk or a killed copy leaves

    proc = _run(output, *flags)
    assert proc.returncode == 0, proc.stderr
    assert f"the lease file {lease_file} is corrupt ({why}); taking the output over as from a dead job" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 already done" in proc.stdout  # resumed the finished output: nothing embedded twice
    assert not lease_file.exists()  # released at the end like any lease


def test_a_corrupt_lease_reads_as_expired_and_is_not_mistaken_for_a_newer_one(tmp_path) -> None:
    lease = Lease(str(tmp_path))
    (tmp_path / "_embedder").mkdir()
    (tmp_path / "_embedder" / "lease.json").write_bytes(b"[1, 2")
    record = lease.read()
    assert record is not None and record["expires_at"] == 0
    assert record["broken"] == "5 bytes that are not a lease record (truncated JSON?)"
    lease.acquire()
    try:
        current = lease.read()
        assert current["owner"] == lease.owner and "broken" not in current
    finally:
        lease.release()
    assert lease.read() is None


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_late_renewal_by_the_job_taken_over_is_undone_and_a_newer_job_still_wins(tmp_path, caplog) -> None:
    """A renewal that lands after a takeover (the old job froze between its read and its write)
    puts the old record back in the file; the job that took over writes its own again and keeps
    running. A lease of any other job (a later takeover) still stops it."""
    output = str(tmp_path)
    old = Lease(output, ttl_s=0.8)
    old.acquire()
    old._stop.set()  # its heartbeat dies: the lease expires
    old._thread.join()
    stale_record = json.dumps(old._record()).encode()
    assert _wait_until(lambda: old.read()["expires_at"] < time.time())

    lost: list[str] = []
    new = Lease(output, ttl_s=0.8, on_lost=lambda: lost.append("lost"))
    new.acquire()
    assert new.generation == old.generation + 1
    path = tmp_path / "_embedder" / "lease.json"
    path.write_bytes(stale_record)  # the old job's late write
    assert _wait_until(lambda: new.read()["owner"] == new.owner), "the takeover's record was not put back"
    assert not lost
    assert "renewed its old lease late; putting ours back" in caplog.text

    newer = Lease(output, ttl_s=0.8)
    path.write_bytes(json.dumps(newer._record()).encode())  # a job that is not the one `new` replaced
    assert _wait_until(lambda: lost == ["lost"]), "a foreign lease did not stop the heartbeat"
    assert new.read()["owner"] == newer.owner  # left alone
    new._stop.set()
