"""The output's lease: a corrupt lease file (0 bytes, truncated JSON) is a dead job's, never a lock
for good (issue #19 item 12)."""

from __future__ import annotations

import os
import subprocess
import sys
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
