"""Issue #19 case 15: what the machine or the store refuses (a full disk, a read-only output, a
missing bucket) ends a command with exit 2 and one line naming the problem and the fix, never a
library's internals (``LanceError(IO) ... os error 28``, ``[Errno 30]``, a bare FileNotFoundError).

The full disk and the read-only output are real: a small tmpfs and a read-only bind mount, each in a
private mount namespace of the command (``unshare -m``), so nothing is mounted for the rest of the
machine. Tests run as root here, which ``chmod`` does not stop; ``mount -o ro`` stops root too. Where
mounting is not permitted those tests are skipped (saying so); the ``chmod`` test runs only as a
non-root user. The missing bucket is one the moto S3 server does not have.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.embedder.execution.test_resume import _corpus
from tests.embedder.outputs import read_output

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [
    "--format", "jsonl", "--no-progress", "--set", "source.shard_size_mb=0.002", "--set", "chunking.max_tokens=64",
    "--set", "runner.workers=1", "--set", "model.device=cpu", "--set", "model.token_budget=512",
]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedder.cli", *args]


def _run_args(source: Path, output: str, sink: str, *extra: str) -> list[str]:
    return _cli("run", "--source", str(source), "--output", output, "--sink", sink, *SETTINGS, *extra)


def _in_mount_namespace(script: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs shell lines in a private mount namespace (mounts vanish with it); stops at the first failing mount."""
    return subprocess.run(["unshare", "-m", "sh", "-c", "\n".join(script)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount in a private namespace")
    proc = _in_mount_namespace([f"mount -t tmpfs -o size=64k tmpfs {probe} && mount --bind -o ro {probe} {probe}"])
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs / read-only bind mount is not permitted here: {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("env") / "corpus.jsonl")


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run of the corpus per sink, each alone in its folder: what a full-disk run
    and its rerun must end equal to, and the output written before that the read-only test mounts."""
    outputs = {}
    for sink in ("lance", "parquet"):
        output = tmp_path_factory.mktemp(f"written-{sink}") / "old"
        assert subprocess.run(_run_args(corpus, str(output), sink), env=_env(), capture_output=True).returncode == 0
        outputs[sink] = output
    return outputs


def _error_line(stderr: str) -> str:
    """The command's one error line, after checking nothing else it printed is a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _assert_plain(line: str) -> None:
    for internal in ("LanceError", "os error", "Errno", "FileNotFoundError", "OSError", ".rs:", "EMBEDDER_DEBUG"):
        assert internal not in line, line


@pytest.mark.parametrize("sink", ["lance", "parquet"])
def test_a_full_disk_is_one_line_naming_the_fix_and_the_rerun_resumes(can_mount, corpus, written, sink, tmp_path) -> None:
    """A 300 KB disk fills mid-run (Lance's Rust writer or pyarrow's): exit 2, "no space left on the
    device holding <output>: free space there ... run the same command again". Growing the disk and
    rerunning, as the message says, gives the whole output."""
    disk, output = tmp_path / "disk", tmp_path / "disk" / "out"
    disk.mkdir()
    run = shlex.join(_run_args(corpus, str(output), sink))
    proc = _in_mount_namespace([
        f"mount -t tmpfs -o size=300k tmpfs {disk} || exit 99",
        f"{run} 2>{tmp_path / 'full.err'}; echo $? >{tmp_path / 'full.rc'}",
        f"mount -o remount,size=64m {disk} || exit 98",  # the fix: free space
        f"{run} 2>{tmp_path / 'again.err'}; echo $? >{tmp_path / 'again.rc'}",
        f"cp -a {output} {tmp_path / 'copy'}",
    ])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "full.rc").read_text().strip() == "2", (tmp_path / "full.err").read_text()
    line = _error_line((tmp_path / "full.err").read_text())
    assert line.startswith(f"error: no space left on the device holding {output}: free space there"), line
    assert "run the same command again" in line
    _assert_plain(line)
    assert (tmp_path / "again.rc").read_text().strip() == "0", (tmp_path / "again.err").read_text()
    reference = written[sink]  # the same command, uninterrupted
    ids = read_output(str(tmp_path / "copy"), sink).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(read_output(str(reference), sink).column("id").to_pylist())


@pytest.mark.parametrize("sink", ["lance", "parquet"])
def test_a_read_only_output_is_one_line_naming_the_fix(can_mount, corpus, written, sink, tmp_path) -> None:
    """An output on a read-only mount (new, or written before and rerun with --mode reembed): exit 2,
    "<path> is on a read-only file system ... choose another --output", the old output untouched;
    searching it still works (reading needs no write access)."""
    old = written[sink]
    folder = old.parent  # holds nothing else: mounted read-only below
    before = sorted(read_output(str(old), sink).column("id").to_pylist())
    new_run = shlex.join(_run_args(corpus, str(folder / "new"), sink))
    rerun = shlex.join(_run_args(corpus, str(old), sink, "--mode", "reembed"))
    search = shlex.join(_cli("search", str(old), "rivers", "--json"))
    proc = _in_mount_namespace([
        f"mount --bind -o ro {folder} {folder} || exit 99",
        f"{new_run} 2>{tmp_path / 'new.err'}; echo $? >{tmp_path / 'new.rc'}",
        f"{rerun} 2>{tmp_path / 'rerun.err'}; echo $? >{tmp_path / 'rerun.rc'}",
        f"{search} >{tmp_path / 'search.out'} 2>{tmp_path / 'search.err'}; echo $? >{tmp_path / 'search.rc'}",
    ])
    assert proc.returncode == 0, proc.stderr
    for name, path in (("new", folder / "new"), ("rerun", old)):
        assert (tmp_path / f"{name}.rc").read_text().strip() == "2", (tmp_path / f"{name}.err").read_text()
        line = _error_line((tmp_path / f"{name}.err").read_text())
        assert line.startswith(f"error: {path}") and "is on a read-only file system" in line, line
        assert "remount it read-write or choose another --output" in line
        _assert_plain(line)
    assert (tmp_path / "search.rc").read_text().strip() == "0", (tmp_path / "search.err").read_text()
    assert '"id"' in (tmp_path / "search.out").read_text()
    assert sorted(read_output(str(old), sink).column("id").to_pylist()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 555; the read-only mount test covers root")
def test_an_output_folder_without_write_permission_is_one_line(corpus, tmp_path) -> None:
    """A folder this (non-root) user may not write: exit 2, "permission denied on <path>: give the
    user running embedder access to it ... or choose another --output"."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = subprocess.run(_run_args(corpus, str(folder / "out"), "parquet"), env=_env(), capture_output=True, text=True)
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr)
    assert line.startswith("error: permission denied on ") and "choose another --output" in line, line
    _assert_plain(line)


@pytest.mark.parametrize("sink", ["lance", "parquet"])
def test_a_missing_bucket_is_one_line_naming_the_fix(s3_server, corpus, sink) -> None:
    """An output in a bucket the store does not have (S3 NoSuchBucket): exit 2, "the bucket s3://x
    does not exist ... create it (aws s3 mb s3://x) or fix the output URI", for run and search."""
    bucket = f"s3://missing-{uuid.uuid4().hex[:10]}"
    output = f"{bucket}/out"
    for args in (_run_args(corpus, output, sink), _cli("search", output, "rivers")):
        proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr
        line = _error_line(proc.stderr)
        assert line == (
            f"error: the bucket {bucket} does not exist (output {output}): create it (aws s3 mb {bucket}) or fix "
            "the output URI; check the endpoint (AWS_ENDPOINT_URL) and region if it does exist"
        ), line
    import boto3

    assert bucket[5:] not in [b["Name"] for b in boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]]


def test_only_the_environment_conditions_are_mapped() -> None:
    """Precise matching: errno or the libraries' own words for the four conditions, through a
    wrapper's cause chain; any other error (a missing file, a bad value) is left as it is."""
    import errno

    from embedder.errors import BucketMissing, DiskFull, OutputNotWritable, environment_failure

    lance_full = OSError("LanceError(IO): No space left on device (os error 28), .../structural.rs:254:9")
    try:
        try:
            raise lance_full
        except OSError as err:
            raise RuntimeError("shard 'a.jsonl@0-10' failed") from err
    except RuntimeError as wrapped:
        assert isinstance(environment_failure(wrapped, "out"), DiskFull)
    assert isinstance(environment_failure(OSError(errno.EROFS, "Read-only file system", "/x/out"), "/x/out"),
                      OutputNotWritable)
    assert isinstance(environment_failure(FileNotFoundError("The specified bucket does not exist"), "s3://b/o"),
                      BucketMissing)
    for other in (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/a.jsonl"), ValueError("bad"),
                  RuntimeError("lance error: Not found: /x/chunks.lance/data/1.lance")):
        assert environment_failure(other, "/x") is None
