"""A self-contained HTML report of a job's output: what was embedded, how fast, and whether it is right.

``build_report(output)`` reads the job's state (``Checkpoint``: run records, shard completion
records, the resolved job) and draws, with matplotlib (Agg, no display needed):

* the chunk-length histogram (tokens per chunk, the run records' ``length_histogram``) — how
  full the windows are, and how much of the model's limit the corpus uses;
* tokens/s over time (each run's ``timeline``) — stalls, warm-up, a slow tail;
* shard durations (completion records' ``seconds``) — stragglers that hold a run's end;
* canary cosines (each run's ``canary``) against the threshold — are the vectors right;

then a run-history table (state, counts, tokens/s, padding waste, GPU use, cost, canaries, error).
The HTML embeds every picture as a base64 PNG, so the one file can be mailed or opened anywhere;
the PNGs are written next to it too. Records written before a field existed are tolerated: a
missing series gets a "not recorded" note instead of a plot.

Example:
    >>> report = build_report("out/db")          # writes out/db/_embedder/report/report.html
    >>> print(report.html_path, report.figures)
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedder.runners.stages import LENGTH_BIN
from embedder.storage import filesystem, join, write_bytes_atomic

REPORT_DIR = "_embedder/report"
FIGURE_SIZE = (7.5, 3.4)
FIGURE_DPI = 110
ACCENT, SECOND, MUTED, BAD = "#2f6db5", "#e07b39", "#8a8f98", "#c0392b"


class ReportError(ValueError):
    """The URI holds no embedder job, or the report cannot be written."""


@dataclass(slots=True)
class Report:
    """Where the report went and what it holds.

    Attributes:
        html_path: The HTML file (local path or URL).
        figures: Figure name → PNG path, for the pictures drawn.
        missing: Figure name → why it was not drawn (e.g. not recorded by older runs).
    """

    html_path: str
    figures: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _JobState:
    output: str
    job: dict[str, Any]
    runs: list[dict[str, Any]]
    shards: list[dict[str, Any]]


def _load_state(output: str, storage_options: dict[str, Any] | None) -> _JobState:
    import yaml

    from embedder.checkpoint import Checkpoint

    checkpoint = Checkpoint(output, storage_options)
    job_yaml = checkpoint.load_job_yaml()
    if job_yaml is None:
        raise ReportError(f"{output!r} holds no embedder job (no _embedder/job.yaml); check the path")
    shards = sorted(checkpoint.completed().values(), key=lambda r: r.get("completed_at", 0))
    return _JobState(output, yaml.safe_load(job_yaml) or {}, checkpoint.runs(), shards)


# --- figures ------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ReportError("embedder report draws with matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(plt: Any, title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _png(plt: Any, fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _length_histogram(plt: Any, state: _JobState) -> bytes | str:
    counts: list[int] = []
    for run in state.runs:
        for i, n in enumerate(run.get("length_histogram") or []):
            if i >= len(counts):
                counts.append(0)
            counts[i] += int(n)
    if not any(counts):
        return "no run recorded chunk lengths (runs older than the length histogram)"
    total = sum(counts)
    mean = sum((i + 0.5) * LENGTH_BIN * n for i, n in enumerate(counts)) / total
    fig, ax = _figure(
        plt, f"Chunk length: {total:,} chunks, mean ≈ {mean:.0f} tokens", "tokens per chunk (without specials/prompt)", "chunks"
    )
    edges = [i * LENGTH_BIN for i in range(len(counts))]
    ax.bar(edges, counts, width=LENGTH_BIN, align="edge", color=ACCENT, edgecolor="white", linewidth=0.5)
    limit = (state.job.get("chunking") or {}).get("max_tokens")
    if limit:
        ax.axvline(limit, color=SECOND, linestyle="--", linewidth=1, label=f"chunking.max_tokens = {limit}")
        ax.legend(frameon=False, fontsize=8)
    return _png(plt, fig)


def _throughput(plt: Any, state: _JobState) -> bytes | str:
    series = [(run, _from_start(run.get("timeline") or [])) for run in state.runs]
    series = [(run, points) for run, points in series if len(points) >= 2]
    if not series:
        return "no run recorded a timeline of tokens (runs older than the timeline, or too short)"
    fig, ax = _figure(plt, "Throughput over time", "seconds since the run started", "tokens/s")
    colors = [ACCENT, SECOND, "#3a9d5d", "#8e44ad", "#c0392b", "#16a085"]
    for n, (run, points) in enumerate(series[-6:]):
        xs, ys = [], []
        for (t0, k0), (t1, k1) in zip(points, points[1:]):
            if t1 > t0:
                xs.append((t0 + t1) / 2)
                ys.append((k1 - k0) / (t1 - t0))
        ax.plot(xs, ys, color=colors[n % len(colors)], linewidth=1.4, marker="." if len(xs) < 40 else None,
                label=f"{run.get('run_id', '?')} ({run.get('state', '?')})")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize=8)
    return _png(plt, fig)


def _from_start(points: list[list[float]]) -> list[list[float]]:
    """The timeline with its origin: samples count tokens since the embedding started at 0 s."""
    if points and points[0][0] > 0 and points[0][1] > 0:
        return [[0.0, 0], *points]
    return points


def _shard_durations(plt: Any, state: _JobState) -> bytes | str:
    timed = [(r["shard_id"], float(r["seconds"])) for r in state.shards if r.get("seconds") is not None]
    if not timed:
        return "no completion record has a duration (shards done by runs older than shard timing)"
    seconds = [s for _, s in timed]
    fig, ax = _figure(plt, "Shard durations", "shard, in completion order", "seconds")
    from matplotlib.ticker import MaxNLocator

    ax.bar(range(1, len(seconds) + 1), seconds, width=1.0 if len(seconds) > 60 else 0.8, color=ACCENT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.4, len(seconds) + 0.6)
    median = statistics.median(seconds)
    ax.axhline(median, color=SECOND, linestyle="--", linewidth=1, label=f"median {median:.2f} s")
    slowest = max(timed, key=lambda pair: pair[1])
    ax.legend(frameon=False, fontsize=8, title=f"slowest: {_short(slowest[0])} ({slowest[1]:.2f} s)", title_fontsize=8)
    return _png(plt, fig)


def _canaries(plt: Any, state: _JobState) -> bytes | str:
    checked = [r for r in state.runs if (r.get("canary") or {}).get("min_cosine") is not None]
    if not checked:
        return "no run recorded canary cosines (validation.canary_samples: 0, or runs older than canaries)"
    threshold = float((state.job.get("validation") or {}).get("min_cosine", 0.999))
    fig, ax = _figure(plt, "Canary cosine to SentenceTransformer.encode (fp32)", "run", "cosine")
    xs = list(range(1, len(checked) + 1))
    worst = [[c for _, c in (r["canary"].get("worst") or [])] for r in checked]
    for x, values in zip(xs, worst):
        ax.scatter([x] * len(values), values, s=12, color=MUTED, alpha=0.7, zorder=2)
    mins = [r["canary"]["min_cosine"] for r in checked]
    means = [r["canary"].get("mean_cosine") for r in checked]
    ax.plot(xs, mins, "o-", color=ACCENT, label="min", zorder=3)
    ax.plot(xs, [m if m is not None else float("nan") for m in means], "s--", color=SECOND, label="mean", zorder=3)
    ax.axhline(threshold, color=BAD, linewidth=1, label=f"threshold {threshold}")
    ax.set_xticks(xs, [_short(r.get("run_id", "?"), 16) for r in checked], fontsize=7, rotation=15)
    low = min(min(mins), threshold)
    ax.set_ylim(low - max(1e-4, (1 - low) * 0.5), 1.0 + max(2e-5, (1 - low) * 0.1))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    return _png(plt, fig)


FIGURES: dict[str, tuple[str, Callable[[Any, _JobState], bytes | str]]] = {
    "chunk_lengths": ("Chunk-length histogram", _length_histogram),
    "throughput": ("Tokens/s over time", _throughput),
    "shard_durations": ("Shard durations", _shard_durations),
    "canaries": ("Canary cosines", _canaries),
}


# --- HTML ---------------------------------------------------------------------------------------------


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _number(value: Any, fmt: str = "{:,}") -> str:
    return "—" if value is None else fmt.format(value)


def _when(stamp: Any) -> str:
    if not stamp:
        return "—"
    return dt.datetime.fromtimestamp(float(stamp), tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _history_rows(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in reversed(runs):
        canary = run.get("canary") or {}
        cost = run.get("usd_per_million_tokens")
        util = run.get("gpu_utilization")
        state = str(run.get("state", "?"))
        cells = [
            html.escape(str(run.get("run_id", "?"))),
            f'<span class="state {html.escape(state)}">{html.escape(state)}</span>',
            html.escape(str(run.get("mode", "full"))),
            _when(run.get("started_at")),
            _number(run.get("seconds"), "{:,.1f} s"),
            _number(run.get("documents")),
            _number(run.get("chunks")),
            _number(run.get("tokens")),
            _number(run.get("tokens_per_second"), "{:,.0f}"),
            _number(run.get("padding_waste"), "{:.1%}"),
            "—" if util is None else f"{util:.0f}% ({run.get('gpu_seconds', 0):.0f} s)",
            "—" if cost is None else f"${run.get('usd', 0):.4f} (${cost:.4f}/1M)",
            _number(canary.get("min_cosine"), "{:.5f}") if not canary.get("error") else "failed",
            html.escape(_short(str(run.get("error") or ""), 120)),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


_HISTORY_HEADER = (
    "run", "state", "mode", "started", "time", "documents", "chunks", "tokens", "tokens/s",
    "padding waste", "GPU", "cost", "canary min cos", "error",
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0} .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
figure{margin:0;border:1px solid #eee;border-radius:6px;padding:.5rem;background:#fff}
figure img{width:100%;height:auto} figcaption{font-size:.85rem;color:#555}
.missing{color:#888;font-style:italic;padding:2rem 1rem}
table{border-collapse:collapse;font-size:.85rem;width:100%} th,td{border-bottom:1px solid #eee;padding:.3rem .5rem;text-align:right}
th{background:#f6f7f9} td:first-child,th:first-child,td:nth-child(2),td:nth-child(3),td:last-child{text-align:left}
.kv td{text-align:left} .state.done{color:#2e7d32} .state.failed{color:#c0392b} .state.interrupted{color:#e07b39}
"""


def _summary(state: _JobState) -> list[tuple[str, str]]:
    job = state.job
    shards = state.shards
    last = state.runs[-1] if state.runs else {}
    total = last.get("shards_total")
    return [
        ("output", f"{state.output} ({(job.get('output') or {}).get('sink', '?')})"),
        ("source", str((job.get("source") or {}).get("uri", "?"))),
        ("model", str((job.get("model") or {}).get("name", "?"))),
        ("shards done", f"{len(shards):,}" + (f" of {total:,}" if total else "")),
        ("rows", f"{sum(int(r.get('rows', 0)) for r in shards):,}"),
        ("documents", f"{sum(int(r.get('documents', 0)) for r in shards):,}"),
        ("tokens", f"{sum(int(r.get('tokens', 0)) for r in shards):,}"),
        ("quarantined records", f"{sum(int(r.get('bad_records', 0)) for r in shards):,}"),
        ("runs", f"{len(state.runs)} (last: {last.get('state', '—')})"),
        ("total cost", _total_cost(state.runs)),
    ]


def _total_cost(runs: list[dict[str, Any]]) -> str:
    priced = [r for r in runs if r.get("usd") is not None]
    if not priced:
        return "— (give --gpu-hourly-usd to embedder run)"
    usd = sum(float(r["usd"]) for r in priced)
    tokens = sum(int(r.get("tokens") or 0) for r in priced)
    per_million = f", ${usd / tokens * 1e6:.4f} per 1M tokens" if tokens else ""
    return f"${usd:,.4f} over {len(priced)} priced run(s){per_million}"


def render_html(state: _JobState, images: dict[str, bytes], missing: dict[str, str]) -> str:
    """The report page: summary, the figures (inline PNGs), the run history."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>embedder report: {html.escape(state.output)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>embedder report</h1>",
        f'<p class="sub">{html.escape(state.output)} · generated {_when(dt.datetime.now(tz=dt.timezone.utc).timestamp())}</p>',
        '<table class="kv">',
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary(state)),
        "</table>",
        "<h2>Pictures</h2>",
        '<div class="grid">',
    ]
    for name, (title, _) in FIGURES.items():
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(
                f'<figure id="fig-{name}"><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        else:
            parts.append(
                f'<figure id="fig-{name}"><div class="missing">{html.escape(title)}: '
                f"{html.escape(missing.get(name, 'not recorded'))}</div></figure>"
            )
    parts += [
        "</div>",
        "<h2>Run history</h2>",
        '<table id="history"><thead><tr>' + "".join(f"<th>{h}</th>" for h in _HISTORY_HEADER) + "</tr></thead>",
        f"<tbody>{_history_rows(state.runs)}</tbody></table>",
        "</body></html>",
    ]
    return "\n".join(parts)


def build_report(
    output: str, out_dir: str | None = None, storage_options: dict[str, Any] | None = None
) -> Report:
    """Writes ``report.html`` (self-contained) and one PNG per figure into ``out_dir``.

    Args:
        output: The job's output URI.
        out_dir: Where to write (local path or fsspec URL); default ``<output>/_embedder/report``.
        storage_options: fsspec options for ``output`` (and ``out_dir`` when it is on the same store).

    Raises:
        ReportError: no embedder job at ``output``, or matplotlib is missing.
    """
    state = _load_state(output, storage_options)
    plt = _pyplot()
    images: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    for name, (_, draw) in FIGURES.items():
        drawn = draw(plt, state)
        if isinstance(drawn, bytes):
            images[name] = drawn
        else:
            missing[name] = drawn
    target = out_dir or join(output, REPORT_DIR)
    fs, root = filesystem(target, storage_options)
    report = Report(html_path=join(target, "report.html"), missing=missing)
    for name, png in images.items():
        write_bytes_atomic(fs, join(root, f"{name}.png"), png)
        report.figures[name] = join(target, f"{name}.png")
    write_bytes_atomic(fs, join(root, "report.html"), render_html(state, images, missing).encode("utf-8"))
    return report
