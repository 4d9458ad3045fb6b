"""No mixed vectors: a rerun whose settings would change stored vectors is refused (exit 2), naming
the key and both fixes, on finished and on half-finished outputs; rows and the saved job stay."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from embedder.checkpoint import Checkpoint
from embedder.schema import FINGERPRINT_KEYS, fingerprint_differences, vector_fingerprint
from tests.embedder.outputs import read_output

REPO = Path(__file__).resolve().parents[3]
WORDS = "river mountain valley glacier forest desert ocean island harbor bridge castle village".split()


def _corpus(path: Path, docs: int = 60) -> None:
    rng = random.Random(3)
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(120))}) + "\n")


def _cli(source: Path, output: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "embedder.cli", "run", "--source", str(source), "--output", str(output),
           "--sink", "parquet", "--device", "cpu", "--no-progress", "--workers", "1", "--force-unlock",
           "--set", "source.shard_size_mb=0.02", "--set", "chunking.max_tokens=128", *extra]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _state(output: Path) -> tuple[str, str, str]:
    """A digest of the stored rows (ids and vectors), the saved job, and the completion records."""
    table = read_output(str(output), "parquet").sort_by("id")
    rows = hashlib.sha256(json.dumps(table.select(["id", "vector"]).to_pylist()).encode()).hexdigest()
    checkpoint = Checkpoint(str(output))
    return rows, checkpoint.load_job_yaml() or "", json.dumps(sorted(checkpoint.completed()))


CHANGES = [
    ("chunking.max_tokens", ["--set", "chunking.max_tokens=64"]),
    ("chunking.overlap_tokens", ["--set", "chunking.overlap_tokens=16"]),
    ("document_prompt", ["--set", "model.document_prompt='passage: '"]),
    ("max_seq_length", ["--set", "model.max_seq_length=96"]),
    ("vector_dtype", ["--set", "output.vector_dtype=float16"]),
    ("truncate_dim", ["--set", "model.truncate_dim=128"]),
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("fingerprint")
    source = root / "corpus.jsonl"
    _corpus(source)
    finished = root / "finished"
    assert _cli(source, finished).returncode == 0
    half = root / "half"
    killed = _cli(source, half, env={"EMBEDDER_FAILPOINT": "after_commit@3"})  # SIGKILL mid-run
    assert killed.returncode != 0
    assert Checkpoint(str(half)).completed() and not Checkpoint(str(half)).generation().get("complete")
    return {"finished": (source, finished), "half-finished": (source, half)}


@pytest.mark.parametrize("which", ["finished", "half-finished"])
@pytest.mark.parametrize("key,flags", CHANGES, ids=[c[0] for c in CHANGES])
def test_changed_setting_is_refused_and_nothing_changes(outputs, which, key, flags) -> None:
    source, output = outputs[which]
    before = _state(output)
    for mode in (["--mode", "full"], ["--mode", "incremental"]):
        proc = _cli(source, output, *flags, *mode)
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr.strip().splitlines()[-1]
        assert key in message and "--mode reembed" in message and "new output" in message, message
    assert _state(output) == before  # stored rows, saved job and completion records untouched


def test_reembed_replaces_rows_with_the_new_settings(outputs, tmp_path) -> None:
    source, finished = outputs["finished"]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished), str(copy)], check=True)
    proc = _cli(source, copy, "--set", "chunking.max_tokens=64", "--mode", "reembed")
    assert proc.returncode == 0, proc.stderr
    again = _cli(source, copy, "--set", "chunking.max_tokens=64")
    assert again.returncode == 0, again.stderr  # the output now holds the new settings' rows
    assert _cli(source, copy).returncode == 2  # and the old settings are the ones refused


def test_dtype_is_recorded_but_not_refused(outputs) -> None:
    """Compute precisions stay within the fidelity bound of each other (cos >= 0.999 to fp32): rows of
    an output resumed in another dtype are accepted, and each run record says which dtype it used."""
    from embedder.schema import output_schema
    from indexes.base import check_compatible

    _source, finished = outputs["finished"]
    stored = read_output(str(finished), "parquet").schema
    from embedder.schema import provenance_of

    provenance = provenance_of(stored)
    assert provenance["dtype"] == "float32"
    bf16 = output_schema(provenance["dim"], [], {**provenance, "dtype": "bfloat16"})
    check_compatible(stored, bf16, str(finished))  # no error
    assert {r["dtype"] for r in Checkpoint(str(finished)).runs()} == {"float32"}


def test_fingerprint_keys_and_old_outputs() -> None:
    provenance = {"model": "m", "weights_sha256": "w", "pooling": "mean", "normalize": True, "document_prompt": "",
                  "query_prompt": "", "max_seq_length": 256, "dim": 384,
                  "chunking": {"max_tokens": 254, "overlap_tokens": 0, "context": "none", "max_document_chars": 10}}
    flat = vector_fingerprint(provenance)
    assert set(flat) == set(FINGERPRINT_KEYS) and flat["vector_dtype"] == "float32" and flat["truncate_dim"] is None
    assert fingerprint_differences(provenance, provenance) == []
    changed = {**provenance, "chunking": {**provenance["chunking"], "context": "title"}}
    assert fingerprint_differences(provenance, changed) == [("chunking.context", "none", "title")]
    # an output written before a key existed is not refused for it, unless the job sets it
    old = {k: v for k, v in provenance.items() if k != "query_prompt"}
    assert fingerprint_differences(old, provenance) == []
    assert fingerprint_differences(provenance, {**provenance, "vector_dtype": "int8"}) == [
        ("vector_dtype", "float32", "int8")]


PREDICTED = [
    {"chunking": {"max_tokens": 64}},
    {"chunking": {"overlap_tokens": 16}},
    {"chunking": {"max_tokens": 1000}},  # clamped to the model's limit
    {"model": {"max_seq_length": 96}},
    {"model": {"max_seq_length": 64}, "chunking": {"max_tokens": 1000}},
    {"model": {"truncate_dim": 128}},
    {"model": {"truncate_dim": 384}},  # the model's width: no truncation
    {"output": {"vector_dtype": "float16"}},
]


@pytest.mark.parametrize("changes", PREDICTED, ids=[json.dumps(c) for c in PREDICTED])
def test_the_fingerprint_told_before_the_model_load_is_the_loaded_one(outputs, changes) -> None:
    """A refusal before the model loads (embedder.execution.fingerprint) tells what the loaded model
    would: the same schema and provenance, and the same refusal message (or none) as after the load."""
    import yaml

    from embedder.config import Job
    from embedder.execution.generation import resolve_generation
    from embedder.execution.skeleton import Run
    from embedder.models.encoder import Encoder
    from embedder.runners.local import LocalScheduler
    from embedder.schema import provenance_of
    from indexes.base import SinkError, check_compatible

    _source, finished = outputs["finished"]
    checkpoint = Checkpoint(str(finished))
    data = yaml.safe_load(checkpoint.load_job_yaml())
    for section, values in changes.items():
        data[section].update(values)
    run = Run(Job.model_validate(data), LocalScheduler)
    generation = resolve_generation(checkpoint.generation(), run.job.output.mode, "test")
    predicted = run._predicted_sink(checkpoint, generation)
    assert predicted is not None
    sink, existing = predicted
    loaded = run.sink_for(Encoder.load(run.job.model))
    assert vector_fingerprint(provenance_of(sink.schema)) == vector_fingerprint(provenance_of(loaded.schema))
    assert sink.schema.equals(loaded.schema, check_metadata=False)
    outcomes = []
    for schema in (sink.schema, loaded.schema):
        try:
            check_compatible(existing, schema, sink.location)
            outcomes.append(None)
        except SinkError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] is None) == (changes == {"model": {"truncate_dim": 384}})


def test_what_only_the_model_tells_is_not_predicted(outputs) -> None:
    """Another prompt, model or device: the run loads the model to know the fingerprint."""
    import yaml

    from embedder.config import Job
    from embedder.execution.generation import resolve_generation
    from embedder.execution.skeleton import Run
    from embedder.runners.local import LocalScheduler

    _source, finished = outputs["finished"]
    checkpoint = Checkpoint(str(finished))
    for changes in ({"document_prompt": "passage: "}, {"device": "auto"}, {"max_seq_length": 512}, {"name": "other"}):
        data = yaml.safe_load(checkpoint.load_job_yaml())
        data["model"].update(changes)
        run = Run(Job.model_validate(data), LocalScheduler)
        generation = resolve_generation(checkpoint.generation(), run.job.output.mode, "test")
        assert run._predicted_sink(checkpoint, generation) is None, changes
