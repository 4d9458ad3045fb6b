"""The Python API where users call it: a script without a ``__main__`` guard, a script on stdin, a
notebook-like ``python -c``, a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from embedder import open_index, run
from embedder.config import build_job

REPO = Path(__file__).resolve().parents[2]

# The README's Python example, as a user would save it (no `if __name__ == "__main__":`).
README_EXAMPLE = '''
from embedder import Job, run, open_index

job = Job.model_validate({
    "source": {"uri": "docs/", "format": "text"},
    "output": {"uri": "out/docs-db"},                 # a LanceDB database (table "chunks")
    "model": {"name": "all-MiniLM-L6-v2"},            # bundled alias, local directory or hub id
    "chunking": {"max_tokens": 256, "overlap_tokens": 32},
    "runner": {"workers": 2},
})
result = run(job)                                     # counts and timings; rerun resumes
print("CHUNKS", result.chunks, result.state)
for hit in open_index("out/docs-db").search("how do I reset my password?", k=5):
    print("HIT", f"{hit.score:.3f}", hit.doc_id, hit.title, hit.text[:80])
'''


def _docs(root: Path) -> None:
    docs = root / "docs"
    docs.mkdir()
    (docs / "password.txt").write_text("To reset your password, open Settings, choose Security and click Reset password.")
    (docs / "refund.txt").write_text("Refunds are paid back to the original card within five business days.")
    (docs / "shipping.txt").write_text("Parcels ship from our warehouse every weekday before noon.")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LeaseHeld" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert "CHUNKS 3 done" in proc.stdout, proc.stdout
    hits = [line.split() for line in proc.stdout.splitlines() if line.startswith("HIT")]
    assert hits and hits[0][2] == "password.txt", proc.stdout  # it embeds and searches


def test_readme_example_as_a_script_without_main_guard(tmp_path) -> None:
    _docs(tmp_path)
    (tmp_path / "example.py").write_text(README_EXAMPLE)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    _check(proc)


def test_readme_example_from_stdin_and_from_python_c(tmp_path) -> None:
    _docs(tmp_path)
    proc = subprocess.run([sys.executable, "-"], input=README_EXAMPLE, cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    _check(proc)
    (tmp_path / "out").rename(tmp_path / "out-stdin")
    proc = subprocess.run([sys.executable, "-c", README_EXAMPLE], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)  # a notebook has no main file either
    _check(proc)


def test_run_from_a_thread(tmp_path) -> None:
    _docs(tmp_path)
    job = build_job({"source": {"uri": str(tmp_path / "docs"), "format": "text"},
                     "output": {"uri": str(tmp_path / "out")}, "model": {"device": "cpu"},
                     "runner": {"workers": 2, "show_progress": False}})
    results: list = []
    thread = threading.Thread(target=lambda: results.append(run(job)))
    thread.start()
    thread.join(timeout=600)
    assert results and results[0].state == "done" and results[0].chunks == 3
    assert open_index(str(tmp_path / "out")).search("reset my password", k=1)[0].doc_id == "password.txt"
