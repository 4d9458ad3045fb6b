"""The CLI as a user runs it: quickstart, status, search, exit codes, fast --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "embedder.cli", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_help_imports_no_heavy_library() -> None:
    code = "import sys, embedder.cli; print(sorted(m for m in ('torch', 'lancedb', 'transformers', 'pyarrow', 'sentence_transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert _cli("--help").returncode == 0


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "db"
    proc = _cli("run", "configs/quickstart.yaml", "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "embedder search" in proc.stdout
    return out


def test_quickstart_status_and_search(quickstart: Path) -> None:
    status = _cli("status", str(quickstart), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["shards_done"] == info["shards_total"] >= 1
    assert info["quarantined"] == 2  # the empty document and the malformed line
    assert info["documents"] == 22 and info["model"] == "all-MiniLM-L6-v2"
    search = _cli("search", str(quickstart), "how do I get my money back for an order?", "-k", "3", "--json")
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)
    assert hits[0]["doc_id"] == "refund-policy"
    assert {"id", "doc_id", "title", "text", "score"} <= set(hits[0])


@pytest.fixture(scope="module")
def quickstart_parquet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "parquet"
    proc = _cli("run", "configs/quickstart.yaml", "--output", str(out), "--sink", "parquet", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("sink", ["lance", "parquet"])
@pytest.mark.parametrize(
    "filter,needle",
    [
        ("nosuch = 'x'", "error: unknown column 'nosuch' in --filter; columns: id, doc_id, chunk_index, "),
        ("title = = 'x'", "title = = 'x'"),
    ],
)
def test_search_with_a_bad_filter_exits_2_with_one_line(sink, filter, needle, request) -> None:
    output = request.getfixturevalue("quickstart" if sink == "lance" else "quickstart_parquet")
    proc = _cli("search", str(output), "refund", "--filter", filter)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "--source", "/nonexistent/corpus.jsonl", "--output", "OUT"], "does not exist"),
        (["run", "--source", "examples/quickstart/docs.jsonl", "--format", "csv", "--output", "OUT"], "Valid:"),
        (["run", "--source", "examples/quickstart/docs.jsonl", "--output", "OUT", "--model", "/no/such/model"], "model"),
        (["run", "--source", "examples/quickstart/docs.jsonl", "--output", "OUT", "--set", "chunking.colour=red"], "chunking.colour"),
        pytest.param(
            ["run", "-s", "examples/quickstart/docs.jsonl", "-o", "OUT", "--set", "source.text_feild=x"],
            "unknown key 'source.text_feild' (did you mean 'source.text_field'?)",
            id="unknown-key-typo",
        ),
        pytest.param(
            ["run", "--source", "examples/quickstart/docs.jsonl", "--format", "parquet", "--output", "OUT"],
            "docs.jsonl looks like JSON Lines (starts with '{'), not Parquet: use --format jsonl",
            id="jsonl-as-parquet",
        ),
        pytest.param(
            ["run", "-s", "examples/quickstart/docs.jsonl", "--format", "wikipedia", "--output", "OUT"],
            "not a MediaWiki XML dump: use --format jsonl",
            id="jsonl-as-wikipedia",
        ),
        (["run", "configs/does-not-exist.yaml"], "does not exist"),
        pytest.param(
            ["run", "-s", "examples/quickstart/docs.jsonl", "--output", "OUT", "--device", "cpu",
             "--set", "model.truncate_dim=512"],
            "model.truncate_dim 512 is above the dimension of 'all-MiniLM-L6-v2' (384); use at most 384",
            id="truncate-dim-above-the-model",
        ),
        pytest.param(
            ["run", "-s", "examples/quickstart/docs.jsonl", "--output", "OUT", "--set", "output.vector_dtype=int4"],
            "invalid value 'int4' for 'output.vector_dtype'. Valid: 'float32', 'float16', 'int8' or 'binary'",
            id="unknown-vector-dtype",
        ),
        (["status", "/nonexistent/output"], "no embedder job"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle, tmp_path) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = _cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "output,sink,needle",
    [
        ("notes.txt", "lance", "output '{dir}/notes.txt' is a file, not a folder"),
        ("file://{dir}/notes.txt", "parquet", "output 'file://{dir}/notes.txt' is a file, not a folder"),
        ("notes.txt/db", "lance", "output '{dir}/notes.txt/db' lies under '{dir}/notes.txt', which"),
    ],
)
def test_output_that_is_a_file_exits_2_and_writes_nothing(output, sink, needle, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("keep me\n")
    output = output.format(dir=tmp_path) if "{dir}" in output else str(tmp_path / output)
    source = "examples/quickstart/docs.jsonl"
    proc = _cli("run", "--source", source, "--output", output, "--sink", sink, "--no-progress")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle.format(dir=tmp_path) in lines[0], proc.stderr
    assert "choose a new path" in lines[0] and "LanceDB database or a folder of Parquet files" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize(
    "hub_env,why",
    [
        pytest.param({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set", id="offline"),
        pytest.param(  # a closed local port: without the probe the hub client retries for over a minute
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "the hub (http://127.0.0.1:9) cannot be reached",
            id="hub-unreachable",
        ),
    ],
)
def test_unknown_model_fails_within_seconds_naming_the_ways_out(hub_env, why, tmp_path) -> None:
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(hub_env, PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    args = ["run", "--source", "examples/quickstart/docs.jsonl", "--output", str(tmp_path / "out")]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", *args, "--model", "nosuch-org/nosuch-model", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: model 'nosuch-org/nosuch-model' is not a local directory")
    assert why in lines[0]
    assert "the bundled 'all-MiniLM-L6-v2' or a local model directory (a path)" in lines[0]
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_a_mistyped_local_model_folder_is_named(tmp_path) -> None:
    (tmp_path / "models" / "bge-small").mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    source = str(REPO / "examples/quickstart/docs.jsonl")
    args = ["run", "--source", source, "--output", "out", "--model", "models/bge-smal"]
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "there is no directory 'models/bge-smal' (did you mean 'models/bge-small'?)" in lines[0]
    assert "'all-MiniLM-L6-v2'" in lines[0]



def test_version() -> None:
    from embedder import __version__

    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"embedder {__version__}"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, quickstart: Path) -> None:
    fresh = tmp_path / "fresh"
    proc = _cli("run", "configs/quickstart.yaml", "--output", str(fresh), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "new output: nothing stored yet" in proc.stdout and "1 to embed" in proc.stdout
    assert "nothing was written" in proc.stdout and not fresh.exists()

    before = _tree(quickstart)
    done = _cli("run", "configs/quickstart.yaml", "--output", str(quickstart), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "matches the stored rows" in done.stdout and "1 done, 0 to embed" in done.stdout
    refused = _cli("run", "configs/quickstart.yaml", "--output", str(quickstart), "--dry-run",
                   "--set", "chunking.overlap_tokens=8")
    assert refused.returncode == 2
    assert "chunking.overlap_tokens" in refused.stderr and "--mode reembed" in refused.stderr
    assert _tree(quickstart) == before  # no lease, no run record, no job file touched


def test_log_level_info_shows_which_forward_the_model_runs(tmp_path) -> None:
    """``--log-level info`` (or EMBEDDER_LOG_LEVEL) prints embedder's INFO lines, such as the one the
    encoder logs on load; by default they stay hidden; a level that is none is one line, exit 2."""
    args = ("run", "configs/quickstart.yaml", "--output", str(tmp_path / "db"), "--dry-run")
    shown = _cli("--log-level", "info", *args)
    assert shown.returncode == 0, shown.stderr
    loaded = [line for line in shown.stderr.splitlines() if line.startswith("INFO embedder.models.encoder: model ")]
    assert len(loaded) == 1 and "packed bert" in loaded[0], shown.stderr[-2000:]
    hidden = _cli(*args)
    assert hidden.returncode == 0 and "INFO " not in hidden.stderr, hidden.stderr[-2000:]
    bad = _cli("--log-level", "loud", *args)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --log-level 'loud' is not a level; use one of debug, info, warning, error"
    ), bad.stderr


def test_a_table_name_outside_the_output_is_refused_before_anything_is_deleted(tmp_path) -> None:
    """Issue #19 item 2: on an output written before (so ``_embedder/staging/`` exists), a reembed
    with output.table=../../../victim removed <output>/../victim recursively."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work\n")
    output = tmp_path / "out"
    first = _cli("run", "--source", "examples/quickstart/docs.jsonl", "--output", str(output), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert (output / "_embedder" / "staging").is_dir()
    proc = _cli(
        "run", "--source", "examples/quickstart/docs.jsonl", "--output", str(output), "--mode", "reembed",
        "--set", "output.table=../../../victim", "--no-progress",
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (
        "error: invalid job: output.table: Value error, invalid table name '../../../victim': use a plain name of "
        "letters, digits, '_', '-' and '.' (no '/', no '..', not starting with '.'), e.g. chunks"
    )
    assert (victim / "thesis.tex").read_text() == "years of work\n"
    assert (output / "chunks.lance").is_dir()  # the output is untouched too


def test_secrets_never_reach_the_saved_job_the_run_record_or_the_error_line(tmp_path) -> None:
    """Issue #19 item 10, on a real run: source.storage_options carry an Azure connection string and
    a signed URL (local fsspec ignores them); neither is in _embedder/ afterwards."""
    output = tmp_path / "out"
    connection = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5==;EndpointSuffix=core.windows.net"
    signed = "https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2030-01-01&sp=rl&sig=c2lnbmF0dXJl"
    proc = _cli(
        "run", "--source", "examples/quickstart/docs.jsonl", "--output", str(output), "--sink", "parquet",
        "--no-progress", "--set", f"source.storage_options.connection_string={connection}",
        "--set", f"source.storage_options.mirror={signed}",
    )
    assert proc.returncode == 0, proc.stderr
    state = "".join(p.read_text(errors="replace") for p in (output / "_embedder").rglob("*") if p.is_file())
    assert "c2VjcmV0a2V5" not in state and "c2lnbmF0dXJl" not in state
    import yaml

    saved = yaml.safe_load((output / "_embedder" / "job.yaml").read_text())["source"]["storage_options"]
    assert saved == {"connection_string": "***redacted***", "mirror": "https://acct.blob.core.windows.net/c?***redacted***"}

    missing = "/nonexistent/corpus.jsonl?sv=2022-11-02&sp=r&se=2030-01-01&sig=c2lnbmF0dXJl"
    proc = _cli("run", "--source", missing, "--format", "jsonl", "--output", str(tmp_path / "o2"), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: source '/nonexistent/corpus.jsonl?***redacted***' holds no jsonl files")
    assert "c2lnbmF0dXJl" not in proc.stderr
