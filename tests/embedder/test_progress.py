"""Progress where people look: a log line every few seconds when stderr is not a terminal, the
final state equal to the summary, and a reader that leaves early (``| head -c1``) is no failure."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedder.execution.result import RunResult
from embedder.progress import (
    RunProgress,
    eta_seconds,
    final_line,
    format_duration,
    format_tokens,
    progress_line,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart" / "docs.jsonl"
WORDS = (
    "river mountain city ocean forest history science music library garden bridge harbor winter summer "
    "engine theory market village castle planet language painting railway island desert festival"
).split()
LINE = re.compile(
    r"^embedder: shards (\d+)/(\d+) · ([\d,]+) docs · ([\d,]+) chunks · ([\d,.]+[MB]?) tokens · ([\d,]+) tok/s"
)
FINAL = re.compile(r"^embedder: done · shards (\d+)/(\d+) · ([\d,]+) docs · ([\d,]+) chunks · ([\d,]+) tokens · ")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def _cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedder.cli", *args]


def _result(**fields) -> RunResult:
    """A running result as a runner holds it: started 100 s ago, 10 s of which loading the model."""
    base = {"run_id": "r1", "output": "out", "started_at": 1000.0, "load_seconds": 10.0, "shards_total": 14}
    return RunResult(**{**base, **fields})


def _tokens(text: str) -> float:
    scale = {"M": 1e6, "B": 1e9}.get(text[-1], 1.0)
    return float(text.rstrip("MB").replace(",", "")) * scale


# --- the line, its numbers and the ETA ------------------------------------------------------------


def test_counts_and_durations_read_at_a_glance() -> None:
    assert [format_tokens(n) for n in (0, 999_999, 9_812_345, 2_345_678_901)] == ["0", "999,999", "9.8M", "2.35B"]
    assert [format_duration(s) for s in (0, 44.6, 130, 3599, 3900)] == ["0s", "45s", "2m10s", "59m59s", "1h05m"]


def test_eta_extrapolates_the_unread_share_of_the_input() -> None:
    assert eta_seconds(30.0, 250, 1000) == pytest.approx(90.0)  # a quarter in 30 s: three quarters in 90 s
    assert eta_seconds(30.0, 0, 1000) is None  # nothing read yet: nothing to extrapolate from
    assert eta_seconds(30.0, 1000, 1000) is None  # all read: only the last batches are left
    assert eta_seconds(30.0, 10, 0) is None  # the runner reports no input bytes


def test_line_uses_documents_read_input_share_and_eta() -> None:
    running = _result(shards_done=3, documents=9_000, documents_read=12_034, chunks=40_211, tokens=9_812_345,
                      bytes_total=1_000_000, bytes_read=410_000)
    # 100 s since the start, 10 s of it loading: 90 s of pipeline; 41% read in 90 s leaves 129.5 s
    assert progress_line(running, now=1100.0) == (
        "embedder: shards 3/14 · 12,034 docs · 40,211 chunks · 9.8M tokens · 109,026 tok/s"
        " · 41% of input read · ETA 2m10s"
    )


def test_line_without_read_counts_falls_back_to_committed_documents_and_no_eta() -> None:
    running = _result(shards_done=1, shards_skipped=4, documents=20, chunks=30, tokens=4_500, bad_records=2)
    assert progress_line(running, now=1040.0) == (
        "embedder: shards 1/10 (+4 done before) · 20 docs · 30 chunks · 4,500 tokens · 150 tok/s · 2 quarantined"
    )


def test_final_line_has_the_summary_counts_exactly() -> None:
    done = _result(state="done", shards_done=14, documents=12_034, documents_read=12_040, chunks=40_211,
                   tokens=9_812_345, tokens_per_second=812_000.4, seconds=130.2)
    assert final_line(done) == (
        "embedder: done · shards 14/14 · 12,034 docs · 40,211 chunks · 9,812,345 tokens · 812,000 tok/s · 2m10s in all"
    )


# --- RunProgress: log lines on a clock, one final line; the bar's last state -----------------------


def test_log_lines_come_on_their_clock_while_updates_arrive_from_threads() -> None:
    stream = io.StringIO()
    result = _result(started_at=time.time(), load_seconds=0.0)
    with RunProgress(interval_s=0.1, stream=stream) as progress:
        assert not progress.interactive  # a StringIO is no terminal
        stop = threading.Event()

        def runner_thread() -> None:
            while not stop.is_set():
                result.chunks += 1
                result.tokens += 100
                progress.update(result, 1)
                time.sleep(0.01)

        thread = threading.Thread(target=runner_thread)
        thread.start()
        time.sleep(0.75)
        stop.set()
        thread.join()
        result.state, result.documents, result.seconds = "done", 7, 0.8
        result.tokens_per_second = result.tokens / 0.8
        progress.finish(result)
        progress.finish(result)  # once only
    lines = stream.getvalue().splitlines()
    tokens = [_tokens(LINE.match(line).group(5)) for line in lines[:-1]]
    assert 3 <= len(tokens) <= 9, lines  # about one per 0.1 s over 0.75 s
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]
    assert lines[-1] == final_line(result) and lines[-1].startswith("embedder: done · shards 0/14 · 7 docs")


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    with RunProgress(enabled=False, interval_s=0.05, stream=stream) as progress:
        progress.update(_result(tokens=5), 1)
        time.sleep(0.2)
        progress.finish(_result(state="done"))
    assert stream.getvalue() == ""


def test_the_bar_ends_on_the_final_result_though_updates_are_throttled(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "220")
    stream = io.StringIO()
    result = _result(started_at=time.time(), load_seconds=0.0, shards_total=3)
    with RunProgress(stream=stream, interactive=True) as progress:
        result.shards_done, result.documents_read, result.chunks, result.tokens = 1, 40, 50, 6_000
        progress.update(result, 1)  # drawn
        result.shards_done, result.documents, result.chunks, result.tokens = 3, 120, 150, 18_000
        progress.update(result, 1)  # within 0.1 s of the last draw: throttled away
        result.state, result.tokens_per_second = "done", 9_000.0
        progress.finish(result)
    screen = stream.getvalue()
    assert "3/3" in screen and "120 docs · 150 chunks · 18,000 tokens · 9,000 tok/s" in screen, screen


# --- the real CLI, stderr to a file ----------------------------------------------------------------


def _corpus(path: Path, docs: int, words: int) -> None:
    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"id": f"doc-{i}", "title": f"Doc {i}", "text": text}) + "\n")


def _summary_count(stdout: str, key: str) -> int:
    match = re.search(rf"│ {key}\s+│ ([\d,]+)", stdout)
    assert match, stdout
    return int(match.group(1).replace(",", ""))


def test_cli_writes_progress_lines_to_a_log_while_it_runs(tmp_path) -> None:
    corpus, out, log = tmp_path / "docs.jsonl", tmp_path / "db", tmp_path / "stderr.log"
    _corpus(corpus, docs=150, words=200)
    args = _cli_args("run", "--source", str(corpus), "--output", str(out), "--device", "cpu",
                     "--set", "source.shard_size_mb=0.05", "--set", "model.token_budget=2048")
    seen_while_running: list[str] = []
    with open(log, "w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(args, cwd=REPO, env=_env(EMBEDDER_PROGRESS_INTERVAL_S="0.2"),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        reader = threading.Thread(target=lambda: setattr(proc, "captured", proc.stdout.read()))
        reader.start()
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            seen_while_running = [line for line in log.read_text(encoding="utf-8").splitlines() if LINE.match(line)]
            time.sleep(0.1)
        proc.wait(timeout=60)
        reader.join()
    assert proc.returncode == 0, log.read_text(encoding="utf-8")[-3000:]
    running_tokens = sorted({_tokens(LINE.match(line).group(5)) for line in seen_while_running})
    assert len(running_tokens) >= 2, seen_while_running  # the log grew while the run went on

    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("embedder: ")]
    periodic = [LINE.match(line) for line in lines[:-1]]
    assert all(periodic) and len(periodic) >= 5, lines
    tokens = [_tokens(m.group(5)) for m in periodic]
    assert tokens == sorted(tokens), "token counts never go back"
    final = FINAL.match(lines[-1])
    assert final, lines[-1]
    summary = proc.captured
    documents, chunks, total_tokens = (_summary_count(summary, k) for k in ("documents", "chunks", "tokens"))
    assert documents == 150 and chunks >= 150
    assert [int(final.group(i).replace(",", "")) for i in (3, 4, 5)] == [documents, chunks, total_tokens]
    shards = _summary_count(summary, "shards")  # "N embedded, 0 already done, N total"
    assert shards > 1 and final.group(1) == final.group(2) == str(shards)  # every shard of the run
    assert max(tokens) <= total_tokens


def test_cli_rejects_a_bad_progress_interval(tmp_path) -> None:
    proc = subprocess.run(_cli_args("run", "--source", str(QUICKSTART), "--output", str(tmp_path / "db")),
                          cwd=REPO, env=_env(EMBEDDER_PROGRESS_INTERVAL_S="soon"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "EMBEDDER_PROGRESS_INTERVAL_S" in proc.stderr, proc.stderr
    assert not (tmp_path / "db").exists()


# --- a reader that leaves early ---------------------------------------------------------------------


def _status(out: Path) -> dict:
    proc = subprocess.run(_cli_args("status", str(out), "--json"), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_run_piped_into_head_exits_0_with_the_output_complete(tmp_path) -> None:
    """``embedder run ... | head -c1``: the reader takes one byte and goes; the run still exits 0."""
    out = tmp_path / "db"
    proc = subprocess.Popen(_cli_args("run", "--source", str(QUICKSTART), "--output", str(out), "--device", "cpu"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(1)) == 1
    proc.stdout.close()
    stderr = proc.stderr.read().decode("utf-8", "replace")
    assert proc.wait(timeout=600) == 0, stderr
    assert "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr
    info = _status(out)
    assert info["complete"] and info["shards_done"] == info["shards_total"] >= 1 and info["documents"] == 22


@pytest.mark.parametrize("command", ["run", "status", "status --json", "history", "history --json"])
def test_a_reader_gone_before_the_output_is_printed_is_no_failure(command, tmp_path_factory) -> None:
    """The reader closed its end before anything was printed (``| true``, a pager quit at once):
    every write to stdout fails, and the exit code is still the work's."""
    out = tmp_path_factory.getbasetemp() / "gone-reader" / "db"
    first = not out.exists()
    if command != "run" and first:  # status and history need an output: the run's (or a fresh one)
        command_args = ["run", "--source", str(QUICKSTART), "--output", str(out), "--device", "cpu", "--no-progress"]
        assert subprocess.run(_cli_args(*command_args), cwd=REPO, env=_env(), capture_output=True,
                              timeout=600).returncode == 0
    if command == "run":
        command_args = ["run", "--source", str(QUICKSTART), "--output", str(out), "--device", "cpu", "--no-progress"]
    else:
        name, *flags = command.split()
        command_args = [name, str(out), *flags]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(_cli_args(*command_args), cwd=REPO, env=_env(), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "BrokenPipe" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    info = _status(out)
    assert info["complete"] and info["documents"] == 22
