"""Operations commands: ``embedder estimate``, ``embedder validate`` and ``embedder report``.

They answer the three questions around a batch job: what will it cost (before), are the vectors
right (after), and how did it go (pictures). Registered on ``embedder.cli.app`` when ``embedder.cli``
imports this module; heavy libraries are imported inside the commands so ``embedder --help`` stays
fast. Exit codes as everywhere: 0 done · 1 failed (e.g. vectors that do not validate) · 2 usage.
"""

from __future__ import annotations

import json
import os
from typing import Any

import typer

from embedder.cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    _build_job,
    _fail,
    _handle,
    _quiet_libraries,
    _stdout_console,
    _stdout_may_close,
    app,
)

VALIDATE_SAMPLES = 64
NORM_TOLERANCE = 1e-2
INT8_NORM_TOLERANCE = 2e-2
"""int8 rows: rounding each of up to 1024 components by 1/254 moves a unit vector's norm by < 1%."""
"""A normalizing model's vectors must have unit length within this (fp16/bf16 rounding included)."""


# --- estimate ---------------------------------------------------------------------------------------


@app.command()
def estimate(
    config: str = typer.Argument(None, help="YAML job file (its source, model and chunking are estimated)."),
    source: str = typer.Option(None, "--source", "-s", help="Corpus file, folder, glob or s3:// URL."),
    format: str = typer.Option(None, "--format", "-f", help="jsonl | parquet | text | wikipedia | lance (default: detected)."),
    model: str = typer.Option(None, "--model", "-m", help="Bundled alias, local directory or hub id."),
    gpu: str = typer.Option("h200", "--gpu", help="GPU of the measured throughput table (h200, ...)."),
    gpu_hourly_usd: float = typer.Option(None, "--gpu-hourly-usd", help="GPU price per hour: gives the cost in $."),
    tokens_per_second: float = typer.Option(
        None, "--tokens-per-second", help="Use this encoder rate (tokens/s, specials included) instead of the table."
    ),
    calibrate: bool = typer.Option(False, "--calibrate", help="Measure the rate on this machine's GPU (needs CUDA)."),
    sample_mb: float = typer.Option(64.0, "--sample-mb", help="Input megabytes to sample."),
    max_seconds: float = typer.Option(60.0, "--max-seconds", help="Sampling time budget."),
    set_: list[str] = typer.Option([], "--set", help="Override any key: --set chunking.max_tokens=256 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (keys documents, chunks, tokens, gpu_hours, usd...)."),
) -> None:
    """Predict documents, chunks, tokens, GPU-hours and cost of a job from a sample of its source."""
    try:
        flags = {
            "source.uri": source, "source.format": format, "model.name": model,
            "runner.gpu_hourly_usd": gpu_hourly_usd,
            # The output is not touched by an estimate; a job needs one to be valid.
            "output.uri": None if config else "embedder-estimate-output",
        }
        job = _build_job(config, set_, flags)
        _quiet_libraries()
        from embedder.estimate import estimate as run_estimate

        result = run_estimate(
            job, gpu=gpu, gpu_hourly_usd=gpu_hourly_usd, sample_mb=sample_mb, max_seconds=max_seconds,
            calibrate_on_gpu=calibrate, tokens_per_second=tokens_per_second,
        )
        with _stdout_may_close():
            if as_json:
                typer.echo(json.dumps(result.to_dict(), indent=2))
            else:
                _print_estimate(result)
    except BaseException as err:  # noqa: BLE001 - mapped to exit codes
        _handle(err)


def _print_estimate(result: Any) -> None:
    from rich.table import Table

    sample = result.sample
    basis = "exact (whole source read)" if result.exact else (
        f"extrapolated from {sample['shards']:,} of {sample['total_shards']:,} shards "
        f"({sample['bytes'] / 2**20:,.1f} of {sample['total_bytes'] / 2**20:,.1f} MB)"
    )
    table = Table(title=f"embedder estimate: {result.model} on {result.gpu}", show_header=False)
    rows = [
        ("documents", f"{result.documents:,}"),
        ("chunks", f"{result.chunks:,} (mean {result.mean_chunk_tokens:.0f} tokens, limit {result.max_seq_length})"),
        ("tokens", f"{result.tokens:,} ({result.sequence_tokens:,} with specials and prompt)"),
        ("counts", basis),
        ("throughput", f"{result.tokens_per_second:,.0f} tokens/s" + (" (EXTRAPOLATED)" if result.extrapolated else "")
         + (" (PROJECTED, not measured)" if result.projected else "")
         + (" in float8" if result.dtype in ("float8", "fp8") else "")),
        ("  from", result.throughput_source),
        ("GPU time", f"{result.gpu_hours:,.2f} GPU-hours" if result.gpu_hours >= 0.1
         else f"{result.gpu_hours * 3600:,.1f} GPU-seconds"),
        ("cost", "— (give --gpu-hourly-usd)" if result.usd is None
         else f"${result.usd:,.{2 if result.usd >= 1 else 4}f} at ${result.gpu_hourly_usd:g}/h"
         f" = ${result.usd_per_million_tokens:.4f} per 1M tokens"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    _stdout_console().print(table)


# --- validate ---------------------------------------------------------------------------------------


def _reference_source(provenance: dict[str, Any]) -> str:
    """What sentence-transformers loads to re-embed: the recorded model directory when it exists
    here, else the model name resolved as a run would."""
    from embedder.models.loader import resolve_model_source

    recorded = provenance.get("source")
    if recorded and os.path.isdir(str(recorded)):
        return str(recorded)
    model = provenance.get("model")
    if not model:
        from embedder.config import ConfigError

        raise ConfigError("the output records no model in its provenance; it cannot be validated")
    return resolve_model_source(str(model))[0]


def _sample_rows(index: Any, samples: int, seed: int) -> Any:
    """A uniform sample of rows (id, text, vector), the same for the same output and seed."""
    import numpy as np

    if index.kind == "lance":
        dataset = index.table.to_lance()
    else:
        from indexes.parquet import open_dataset

        dataset = open_dataset(index.fs, index.root)
    rows = dataset.count_rows() if dataset is not None else 0
    if rows == 0:
        return None, 0
    picks = np.sort(np.random.default_rng(seed).choice(rows, size=min(samples, rows), replace=False))
    return dataset.take(picks, columns=["id", "text", "vector"]), rows


def row_count_problem(checkpoint: Any, rows: int) -> str | None:
    """Why the output's ``rows`` disagree with its completion records, or None when they agree.

    Checked for a complete full or reembed pass, where every row belongs to a shard of the pass and
    each shard's record counts its rows (an incremental pass records only the rows it replaced).
    A difference means rows went missing or came in behind the checkpoint's back: a deleted part
    file, a table rolled back or written by something else.
    """
    generation = checkpoint.generation() or {}
    if not generation.get("complete") or generation.get("mode") not in ("full", "reembed"):
        return None
    records = checkpoint.completed(generation["id"])
    expected = sum(int(r.get("rows", 0)) for r in records.values())
    if expected == rows:
        return None
    difference = (
        f"{expected - rows:,} rows missing" if rows < expected else f"{rows - expected:,} rows more than recorded"
    )
    return (
        f"the output holds {rows:,} rows but the completion records of its {len(records):,} shards count "
        f"{expected:,}: {difference} (a deleted part file, a rolled-back or outside-written table?); "
        "run again with --mode reembed to rebuild it"
    )


def validate_output(
    output: str, samples: int = VALIDATE_SAMPLES, min_cosine: float | None = None, seed: int = 0
) -> dict[str, Any]:
    """Re-checks a uniform sample of a finished output against ``SentenceTransformer.encode`` (fp32).

    Each sampled row's text is re-embedded with the model and document prompt recorded in the
    output's provenance and compared with the stored vector; every sampled vector is also checked
    for NaN/Inf, zero norm, and unit length when the model normalizes.

    Returns:
        A report: ``ok``, ``rows``, ``samples``, ``min_cosine``, ``mean_cosine``, ``threshold``,
        ``worst`` (lowest cosines), ``bad_vectors`` (``[id, reason]``) and ``row_count`` (why the
        row count disagrees with the completion records, or None: ``row_count_problem``).
    """
    import numpy as np
    import yaml

    from embedder.checkpoint import Checkpoint
    from embedder.quantize import agreement, dequantize, fidelity_bound
    from embedder.validate import reference_vectors, truncated, vector_problems
    from indexes.search import open_index

    def no_queries(_: str) -> Any:
        raise AssertionError("validate embeds documents, not queries")

    index = open_index(output, embed_query=no_queries)
    provenance = dict(index.provenance)
    checkpoint = Checkpoint(output)
    if min_cosine is None:
        job_yaml = checkpoint.load_job_yaml()
        job = yaml.safe_load(job_yaml) if job_yaml else {}
        min_cosine = float(((job or {}).get("validation") or {}).get("min_cosine", 0.999))
    table, rows = _sample_rows(index, samples, seed)
    report: dict[str, Any] = {
        "output": output, "model": provenance.get("model"), "rows": rows, "samples": 0,
        "threshold": min_cosine, "min_cosine": None, "mean_cosine": None, "worst": [], "bad_vectors": [],
        "row_count": row_count_problem(checkpoint, rows), "ok": True,
    }
    report["ok"] = report["row_count"] is None
    if table is None:
        return report
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    dtype, dim = index.vector_dtype, index.dim
    params = provenance.get("quantization")
    column = table.column("vector").combine_chunks()
    stored = column.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), column.type.list_size)
    vectors = dequantize(stored, dtype, dim, params)
    problems = vector_problems(vectors)
    tolerance = INT8_NORM_TOLERANCE if dtype == "int8" else NORM_TOLERANCE
    if provenance.get("normalize") in (True, "true", "True") and dtype != "binary":
        norms = np.linalg.norm(np.nan_to_num(vectors), axis=1)
        off = (problems == "") & (np.abs(norms - 1.0) > tolerance)
        problems[off] = [f"vector norm {n:.4f}, but the model normalizes" for n in norms[off]]
    report["bad_vectors"] = [[ids[i], str(problems[i])] for i in range(len(ids)) if problems[i]]
    reference = reference_vectors(_reference_source(provenance), texts, str(provenance.get("document_prompt") or ""))
    if reference.shape[1] > dim:  # Matryoshka: the job kept the first truncate_dim dimensions
        reference = truncated(reference, dim)
    fine = [i for i in range(len(ids)) if not problems[i]]
    scores = agreement(stored[fine], reference[fine], dtype, params) if fine else np.zeros(0)
    threshold = fidelity_bound(dtype, min_cosine)
    order = np.argsort(scores)
    report.update(
        samples=len(ids), threshold=threshold, vector_dtype=dtype,
        measure="equal sign bits" if dtype == "binary" else "cosine",
        min_cosine=float(scores.min()) if len(scores) else None,
        mean_cosine=float(scores.mean()) if len(scores) else None,
        worst=[[ids[fine[i]], float(scores[i])] for i in order[:5]],
    )
    report["ok"] = (
        report["row_count"] is None
        and not report["bad_vectors"]
        and (report["min_cosine"] is None or report["min_cosine"] >= threshold)
    )
    return report


@app.command()
def validate(
    output: str = typer.Argument(..., help="The job's output URI."),
    samples: int = typer.Option(VALIDATE_SAMPLES, "--samples", "-n", help="Rows to re-embed and check."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Fail below this cosine (default: the job's validation.min_cosine)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-embed a sample of a finished output with SentenceTransformer.encode (fp32) and compare.

    Exit 1 when a sampled vector is NaN/Inf/zero/not unit length, its cosine to the reference is
    below the threshold, or the output's row count differs from what its completion records count.
    """
    try:
        if samples < 1:
            _fail(f"--samples must be at least 1, got {samples}", EXIT_USAGE)
        _quiet_libraries()
        from indexes.search import SearchError

        try:
            report = validate_output(output, samples, min_cosine, seed)
        except SearchError as err:
            _fail(str(err), EXIT_USAGE)
        with _stdout_may_close():
            if as_json:
                typer.echo(json.dumps(report, indent=2))
            else:
                _print_validation(report)
        if not report["ok"]:
            vectors = [f"{i}: {why}" for i, why in report["bad_vectors"][:5]]
            vectors += [f"{i} (cos {c:.4f})" for i, c in report["worst"] if c < report["threshold"]]
            reasons = ([report["row_count"]] if report["row_count"] else []) + (
                ["; ".join(vectors) + ". These vectors do not match the model that the output says wrote them"]
                if vectors else []
            )
            _fail(f"validation failed for {output}: " + "; ".join(reasons), EXIT_FAILED)
    except BaseException as err:  # noqa: BLE001
        _handle(err, output)


def _print_validation(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"embedder validate {report['output']}: {'ok' if report['ok'] else 'FAILED'}", show_header=False)
    table.add_row("model", str(report["model"]))
    table.add_row("checked", f"{report['samples']:,} of {report['rows']:,} rows")
    if report["min_cosine"] is not None:
        table.add_row(report.get("measure", "cosine"), f"min {report['min_cosine']:.5f}, mean {report['mean_cosine']:.5f} "
                      f"(threshold {report['threshold']}, vectors stored as {report.get('vector_dtype', 'float32')})")
    table.add_row("bad vectors", str(len(report["bad_vectors"])))
    table.add_row("row count", report["row_count"] or "matches the completion records")
    _stdout_console().print(table)


# --- report -----------------------------------------------------------------------------------------


@app.command()
def report(
    output: str = typer.Argument(..., help="The job's output URI."),
    out: str = typer.Option(None, "--out", help="Folder for report.html and the PNGs (default: <output>/_embedder/report)."),
) -> None:
    """Write an HTML report (with PNGs): chunk lengths, tokens/s over time, shard durations, canaries, runs."""
    try:
        from embedder.report import ReportError, build_report

        try:
            built = build_report(output, out)
        except ReportError as err:
            _fail(str(err), EXIT_USAGE)
        with _stdout_may_close():
            typer.echo(built.html_path)
        for name, why in built.missing.items():
            typer.echo(f"note: no {name.replace('_', ' ')} picture: {why}", err=True)
    except BaseException as err:  # noqa: BLE001
        _handle(err, output)
