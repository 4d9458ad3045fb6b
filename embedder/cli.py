"""The ``embedder`` command line.

Exit codes: 0 done · 1 failed · 2 usage, config or environment error (a full disk, a read-only output, a
missing bucket: one line naming the fix) · 75 interrupted (rerun to resume).
Heavy libraries (torch, lancedb, transformers) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 75

app = typer.Typer(
    help="Embed whole corpora (Wikipedia dumps, Parquet, JSONL, text) into LanceDB or Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from embedder import __version__

        typer.echo(f"embedder {__version__}")
        raise typer.Exit(EXIT_OK)


_LOG_LEVELS = ("debug", "info", "warning", "error")


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    log_level: str | None = typer.Option(
        None,
        "--log-level",
        envvar="EMBEDDER_LOG_LEVEL",
        help="Show embedder's log lines from this level on: debug, info (which forward the model runs, "
        "what the runner connects to...), warning, error. Default: warnings and errors only.",
    ),
) -> None:
    """Embed whole corpora (Wikipedia dumps, Parquet, JSONL, text) into LanceDB or Parquet."""
    if log_level is not None:
        _show_logs(log_level)


def _show_logs(level: str) -> None:
    """Prints the ``embedder`` loggers' lines from ``level`` on to stderr, one ``LEVEL logger: message``
    line each (without it, Python's last-resort handler shows warnings and errors, bare)."""
    import logging

    if level.lower() not in _LOG_LEVELS:
        _fail(f"--log-level {level!r} is not a level; use one of {', '.join(_LOG_LEVELS)}", EXIT_USAGE)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("embedder")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def _fail(message: str, code: int) -> NoReturn:
    from embedder.config import redact_text

    typer.echo(f"error: {redact_text(message)}", err=True)  # a message may echo a signed URL
    raise typer.Exit(code)


def _handle(err: BaseException, uri: str | None = None) -> NoReturn:
    """Ends a command that raised ``err`` with one line on stderr and its exit code.

    ``uri`` is the output the command works on, named in an environment failure's message (a full
    disk, a read-only output, a missing bucket: ``embedder.errors.environment_failure``) when the
    error itself names no path.
    """
    if isinstance(err, typer.Exit):
        raise err
    if isinstance(err, KeyboardInterrupt):
        _fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
    if os.environ.get("EMBEDDER_DEBUG"):
        import traceback

        traceback.print_exception(err)
    from embedder.lease import LeaseHeld

    if isinstance(err, LeaseHeld):
        _fail(str(err), EXIT_INTERRUPTED)  # EX_TEMPFAIL: another run is on it; try again later
    from embedder.errors import EmbedderError, UsageError, environment_failure

    if isinstance(err, UsageError):
        _fail(str(err), EXIT_USAGE)
    failure = environment_failure(err, uri)  # the library's words for ENOSPC, EROFS, NoSuchBucket...
    if failure is not None:
        _fail(str(failure), EXIT_USAGE)
    if isinstance(err, EmbedderError):
        _fail(str(err), EXIT_FAILED)  # a failed run whose message says what happened and what to do
    _fail(f"{type(err).__name__}: {err} (set EMBEDDER_DEBUG=1 for the traceback)", EXIT_FAILED)


@contextlib.contextmanager
def _stdout_may_close() -> Iterator[None]:
    """Printing to a reader that went away (``embedder run ... | head -c1``) is not a failure.

    The work is done by the time its output is printed, so the exit code stays what the work
    earned. As Python's ``signal`` docs recommend, stdout is pointed at devnull so the interpreter's
    final flush does not raise again.
    """
    try:
        yield
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # stdout without a file descriptor (a test's capture)
            pass


def _stdout_console() -> Any:
    """A rich console on stdout whose broken pipe reaches ``_stdout_may_close``.

    Rich's own handling of a broken pipe exits with status 1 (``SystemExit``) from inside
    ``print``, which would turn a finished run into a failed one.
    """
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # drop whatever else is printed
            raise BrokenPipeError(32, "stdout's reader went away")

    return StdoutConsole()


def _progress_interval_s() -> float:
    """Seconds between progress lines on a non-terminal: ``EMBEDDER_PROGRESS_INTERVAL_S`` or 10."""
    from embedder.config import ConfigError
    from embedder.progress import INTERVAL_ENV, INTERVAL_S

    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{INTERVAL_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _build_job(config: str | None, overrides: list[str], flags: dict[str, Any]):  # noqa: ANN202
    from embedder.config import ConfigError, build_job, load_job_dict

    data: dict[str, Any] = load_job_dict(config) if config else {}
    sets = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if not config and (flags.get("source.uri") is None or flags.get("output.uri") is None):
        raise ConfigError("give a CONFIG file, or both --source and --output")
    return build_job(data, sets + list(overrides))


@app.command()
def run(
    config: str = typer.Argument(None, help="YAML job file (configs/quickstart.yaml...)."),
    source: str = typer.Option(None, "--source", "-s", help="Corpus file, folder, glob or s3:// URL."),
    format: str = typer.Option(None, "--format", "-f", help="jsonl | parquet | text | wikipedia | lance (default: detected)."),
    output: str = typer.Option(None, "--output", "-o", help="Output URI: a LanceDB database or a Parquet folder."),
    sink: str = typer.Option(None, "--sink", help="lance | parquet (default: detected from the output URI)."),
    model: str = typer.Option(None, "--model", "-m", help="Bundled alias, local directory or hub id."),
    runner: str = typer.Option(None, "--runner", help="local | ray."),
    mode: str = typer.Option(None, "--mode", help="full | incremental | reembed (see README: incremental runs)."),
    workers: int = typer.Option(None, "--workers", help="Reader/tokenizer processes."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda."),
    dtype: str = typer.Option(None, "--dtype", help="auto | float32 | float16 | bfloat16 | float8 (alias fp8: FP8 GEMMs, GPUs of compute capability >= 8.9)."),
    set_: list[str] = typer.Option([], "--set", help="Override any key: --set chunking.max_tokens=256 (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    gpu_hourly_usd: float = typer.Option(None, "--gpu-hourly-usd", help="GPU price per hour: prints $ per 1M tokens."),
    force_unlock: bool = typer.Option(
        False, "--force-unlock", help="Take the output's lease from a job that died without releasing it."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (shards, what is done, the fingerprint check); write nothing."
    ),
) -> None:
    """Embed a corpus. Rerunning the same command resumes where a stopped run left off."""
    uri = output
    try:
        flags = {
            "source.uri": source, "source.format": format, "output.uri": output, "output.sink": sink,
            "model.name": model, "runner.kind": runner, "runner.workers": workers, "output.mode": mode,
            "model.device": device, "model.dtype": dtype, "runner.gpu_hourly_usd": gpu_hourly_usd,
        }
        if no_progress:
            flags["runner.show_progress"] = False
        job = _build_job(config, set_, flags)
        uri = job.output.uri
        if dry_run:
            _print_plan(job)
            return
        from embedder.api import run as run_job
        from embedder.progress import RunProgress

        # a bar on a terminal, else a log line every EMBEDDER_PROGRESS_INTERVAL_S (10 s) on stderr
        with RunProgress(enabled=job.runner.show_progress, interval_s=_progress_interval_s()) as progress:
            result = run_job(job, on_progress=progress.update, force_unlock=force_unlock)
            progress.finish(result)
        with _stdout_may_close():
            _print_summary(result)
        if result.state == "interrupted":
            _fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
    except BaseException as err:  # noqa: BLE001 - mapped to exit codes
        _handle(err, uri)


def _print_plan(job: Any) -> None:
    """``run --dry-run``: the plan as a table; exit 2 when the run would be refused."""
    from rich.console import Console
    from rich.table import Table

    from embedder.api import plan

    info = plan(job)
    table = Table(title=f"embedder run --dry-run: {info['output']} ({info['sink']})", show_header=False)
    rows = [
        ("source", f"{info['source']} ({info['format']})"),
        ("model", info["model"]),
        ("mode", f"{info['mode']}: {info['pass']}"),
        ("shards", f"{info['shards_total']:,} of about {info['shard_bytes'] / 2**20:.2f} MB: "
                   f"{info['shards_done']:,} done, {info['shards_to_embed']:,} to embed "
                   f"({info['bytes_to_read'] / 2**20:,.1f} MB to read, {info['readers']} reader(s))"),
        ("next shards", ", ".join(info["first_shards"]) or "none"),
        ("fingerprint", info["fingerprint"]),
    ]
    if info["incremental"]:
        rows.append(("incremental", info["incremental"]))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    typer.echo("nothing was written (dry run)")
    if info["refused"]:
        _fail(info["refused"], EXIT_USAGE)


def _quiet_libraries() -> None:
    """Our progress bars are the only ones: hush the libraries' own download/loading bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quarantine_line(result: Any) -> str:
    """``"2: empty or whitespace-only text (2); records and reasons in out/_embedder/quarantine/"``."""
    if not result.bad_records:
        return "0"
    from embedder.pipeline.commit import top_reasons

    reasons = top_reasons(result.quarantine_reasons) if result.quarantine_reasons else ""
    return f"{result.bad_records:,}" + (f": {reasons}" if reasons else "") + f"; records and reasons in {result.quarantine_uri}"


def _print_summary(result: Any) -> None:
    from rich.table import Table

    console = _stdout_console()
    table = Table(title=f"embedder run {result.run_id}: {result.state}", show_header=False)
    rows = [
        ("output", f"{result.output} ({result.sink})"),
        ("model", result.model),
        ("mode", result.mode),
        ("shards", f"{result.shards_done} embedded, {result.shards_skipped} already done, {result.shards_total} total"),
        ("documents", f"{result.documents:,}"),
        ("chunks", f"{result.chunks:,} embedded: {result.added:,} added, {result.updated:,} updated; "
                   f"{result.unchanged:,} unchanged, {result.deleted:,} deleted"),
        ("tokens", f"{result.tokens:,}"),
        ("quarantined", _quarantine_line(result)),
        ("time", f"{result.seconds:.1f} s, of which {result.load_seconds:.1f} s loading the model"),
        ("throughput", f"{result.tokens_per_second:,.0f} tokens/s"),
    ]
    if result.memory_timeline:
        runner = [m[1] for m in result.memory_timeline]
        readers = max(m[2] for m in result.memory_timeline)
        rows.append(("host memory", f"runner {runner[-1] / 1e3:.1f} GB at the end (peak {max(runner) / 1e3:.1f})"
                     + (f", readers {readers / 1e3:.1f} GB at most" if readers else "")))
    if result.encoders > 1 and result.encoder_tokens_per_second:
        rows.append(("encoders", f"{result.encoders}: " + ", ".join(f"{r:,.0f}" for r in result.encoder_tokens_per_second)
                     + " tokens/s"))
    if result.padding_waste is not None:
        rows.append(("padding waste", f"{result.padding_waste:.1%} of computed tokens"))
    if result.gpu_utilization is not None:
        rows.append(("GPU", f"{result.gpu_seconds:.1f} s busy, {result.gpu_utilization:.0f}% mean utilization"))
    if result.usd_per_million_tokens is not None:
        rows.append(("cost", f"${result.usd:.4f} at ${result.gpu_hourly_usd}/h = ${result.usd_per_million_tokens:.4f} per 1M tokens"))
    if result.canary and result.canary.get("count"):
        rows.append(("canaries", f"{result.canary['count']} re-embedded ({result.canary.get('tokens', 0):,} tokens) on "
                     f"{result.canary_device} in {result.canary_seconds:.1f} s, min cos {result.canary['min_cosine']:.5f}"))
    if result.trimmed_documents:
        rows.append(("trimmed documents", f"{result.trimmed_documents:,} (longer than chunking.max_document_chars)"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.print(f'Search it: embedder search {result.output} "your question"')


@app.command()
def status(
    output: str = typer.Argument(..., help="The job's output URI."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a job's progress: shards done/pending, rows, documents, chunks and tokens written by the
    current pass (every run of it together), quarantined records, model, mode and the last run's end state."""
    try:
        import yaml

        from embedder.checkpoint import Checkpoint

        checkpoint = Checkpoint(output)
        job_yaml = checkpoint.load_job_yaml()
        if job_yaml is None:
            _fail(f"{output!r} holds no embedder job (no _embedder/job.yaml); check the path", EXIT_USAGE)
        job = yaml.safe_load(job_yaml)
        runs = checkpoint.runs()
        last = runs[-1] if runs else {}
        generation = checkpoint.generation() or {}
        done = checkpoint.completed(generation.get("id"))  # the current pass (all records before any)
        total = next((r.get("shards_total") for r in reversed(runs) if r.get("shards_total")), None)
        info = {
            "output": output,
            "model": job.get("model", {}).get("name"),
            "sink": job.get("output", {}).get("sink"),
            "mode": generation.get("mode"),
            "complete": bool(generation.get("complete")),
            "shards_done": len(done),
            "shards_total": total,
            "shards_pending": None if total is None else max(0, total - len(done)),
            "shards_interrupted": len(last.get("interrupted_shards") or []) if last.get("state") != "done" else 0,
            "rows": sum(int(r.get("rows", 0)) for r in done.values()),
            "documents": sum(int(r.get("documents", 0)) for r in done.values()),
            "chunks": sum(int(r.get("chunks") or 0) for r in done.values()),
            "tokens": sum(int(r.get("tokens") or 0) for r in done.values()),
            "quarantined": sum(int(r.get("bad_records", 0)) for r in done.values()),
            "pass_runs": len({r["run_id"] for r in done.values() if r.get("run_id")}),
            "last_run": {k: last.get(k) for k in ("run_id", "state", "tokens_per_second", "error")} if last else None,
            "runs": len(runs),
        }
        if as_json:
            with _stdout_may_close():
                typer.echo(json.dumps(info, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"embedder status {output}", show_header=False)
        total = info["shards_total"] if info["shards_total"] is not None else "?"
        table.add_row("shards", f"{info['shards_done']}/{total} done, {info['shards_pending'] if info['shards_pending'] is not None else '?'} pending"
                      + (f" ({info['shards_interrupted']} were in flight when the last run stopped)" if info["shards_interrupted"] else ""))
        for key in ("rows", "documents", "chunks", "tokens", "quarantined"):
            table.add_row(key, f"{info[key]:,}")
        for key in ("model", "sink", "mode"):
            table.add_row(key, str(info[key]))
        killed = sum(1 for r in runs if r.get("state") == "killed")
        table.add_row("runs", f"{info['runs']}" + (f", {killed} killed" if killed else "")
                      + f"; the counts above are the current pass's, committed by {info['pass_runs']} run(s)")
        if last:
            table.add_row("last run", f"{last.get('run_id')}: {last.get('state')}" + (f" ({last.get('error')})" if last.get("error") else ""))
        with _stdout_may_close():
            _stdout_console().print(table)
    except BaseException as err:  # noqa: BLE001
        _handle(err, output)


HISTORY_KEYS = ("run_id", "mode", "state", "added", "updated", "deleted", "unchanged", "tokens_embedded",
                "tokens_per_second", "started_at", "ended_at", "error", "pass_totals")


@app.command()
def history(
    output: str = typer.Argument(..., help="The job's output URI."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of run records."),
) -> None:
    """List every run on an output with its counts: added, updated, deleted, unchanged, tokens (the
    run's own part), and the totals of the whole pass when the run ended (rows, shards)."""
    try:
        from embedder.checkpoint import Checkpoint

        checkpoint = Checkpoint(output)
        if checkpoint.load_job_yaml() is None:
            _fail(f"{output!r} holds no embedder job (no _embedder/job.yaml); check the path", EXIT_USAGE)
        records = []
        for run_record in checkpoint.runs():
            record = {key: run_record.get(key) for key in HISTORY_KEYS}
            record["tokens_embedded"] = run_record.get("tokens", 0)
            for key in ("added", "updated", "deleted", "unchanged"):
                record[key] = record[key] or 0
            records.append(record)
        if as_json:
            with _stdout_may_close():
                typer.echo(json.dumps(records, indent=2))
            return
        import datetime

        from rich.table import Table

        table = Table(title=f"embedder history {output}")
        numeric = ("added", "updated", "deleted", "unchanged", "tokens", "tok/s", "pass rows", "pass shards")
        for column in ("run", "started", "mode", "state", "added", "updated", "deleted", "unchanged", "tokens", "tok/s",
                       "pass rows", "pass shards"):
            table.add_column(column, justify="right" if column in numeric else "left")
        for r in records:
            started = datetime.datetime.fromtimestamp(r["started_at"]).strftime("%Y-%m-%d %H:%M") if r["started_at"] else ""
            totals = r["pass_totals"] or {}
            table.add_row(
                r["run_id"], started, r["mode"] or "", r["state"] or "", f"{r['added']:,}", f"{r['updated']:,}",
                f"{r['deleted']:,}", f"{r['unchanged']:,}", f"{r['tokens_embedded']:,}", f"{r['tokens_per_second'] or 0:,.0f}",
                f"{totals['rows']:,}" if totals else "", f"{totals['shards']:,}" if totals else "",
            )
        with _stdout_may_close():
            _stdout_console().print(table)
    except BaseException as err:  # noqa: BLE001
        _handle(err, output)


@app.command()
def search(
    output: str = typer.Argument(..., help="The job's output URI."),
    query: str = typer.Argument(..., help="What to search for (embedded with the model's query prompt)."),
    k: int = typer.Option(5, "-k", help="Number of hits."),
    filter: str = typer.Option(None, "--filter", help="SQL-like filter, e.g. \"title = 'Albedo'\"."),
    mode: str = typer.Option("vector", "--mode", help="vector (cosine) | fts (BM25 over text) | hybrid (both, fused by rank)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search an output with the model that built it."""
    try:
        from embedder.api import open_index

        hits = open_index(output).search(query, k=k, filter=filter, mode=mode)
        if as_json:
            from dataclasses import asdict

            with _stdout_may_close():
                typer.echo(json.dumps([asdict(h) for h in hits], indent=2, ensure_ascii=False, default=str))
            return
        from rich.table import Table

        table = Table(title=f"{query!r}")
        for col in ("score", "id", "title", "text"):
            table.add_column(col, overflow="fold")
        for hit in hits:
            text = hit.text if len(hit.text) <= 200 else hit.text[:200] + "…"
            table.add_row(f"{hit.score:.3f}", hit.id, hit.title or "", text)
        with _stdout_may_close():
            _stdout_console().print(table)
    except BaseException as err:  # noqa: BLE001
        _handle(err, output)


def _register_command_modules() -> None:
    """Commands that live in their own modules add themselves to ``app`` when imported."""
    import importlib

    for module in ("embedder.cli_ops",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


_register_command_modules()


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    app()


if __name__ == "__main__":
    from embedder.cli import main as _main  # commands register on embedder.cli.app, not on __main__'s

    _main()
