"""A self-contained HTML report of a job's output: what was embedded, how fast, and whether it is right.

``build_report(output)`` reads the job's state (``Checkpoint``: run records, shard completion
records, the resolved job) and draws, with matplotlib (Agg, no display needed):

* the chunk-length histogram (tokens per chunk, the run records' ``length_histogram``, of
  committed chunks only) — how full the windows are, and how much of the model's limit the
  corpus uses;
* tokens/s over time (each run's ``timeline``, over intervals of at least the sampling period) —
  stalls, warm-up, a slow tail;
* shard durations (completion records' ``seconds``) — stragglers that hold a run's end;
* canary cosines (each run's ``canary``) against the threshold — are the vectors right;

then a run-history table (state, counts, tokens/s, padding waste, GPU use, cost, canaries, error).
The totals count what is in the output: rows from the output table itself (Lance or Parquet),
documents, chunks and tokens from the completion records of committed shards — never the run
records, whose counts include attempts that a crash threw away.
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedder.errors import UsageError
from embedder.pipeline.commit import LENGTH_BIN
from embedder.storage import filesystem, join, write_bytes_atomic

REPORT_DIR = "_embedder/report"
FIGURE_SIZE = (7.5, 3.4)
FIGURE_DPI = 110
ACCENT, SECOND, MUTED, BAD = "#2f6db5", "#e07b39", "#8a8f98", "#c0392b"


class ReportError(UsageError, ValueError):
    """The URI holds no embedder job, or the report cannot be written."""


@dataclass(slots=True)
class Report:
    """Where the report went and what it holds.

    Attributes:
        html_path: The HTML file (local path or URL).
        figures: Figure name → PNG path, for the pictures drawn.
        missing: Figure name → why it was not drawn (e.g. not recorded by older runs).
        notes: Figure name → its caption's note on what it counts (e.g. runs left out).
        totals: The summary's counts: ``rows`` (in the output table; None where it cannot be
            read), ``documents``, ``chunks``, ``tokens``, ``quarantined`` (committed shards).
        chunk_lengths: The length histogram drawn: committed chunks per ``LENGTH_BIN`` tokens.
    """

    html_path: str
    figures: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    totals: dict[str, int | None] = field(default_factory=dict)
    chunk_lengths: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _JobState:
    output: str
    job: dict[str, Any]
    runs: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    rows: int | None = None  # rows in the output table; None when it cannot be read
    rows_unreadable: str = ""  # why not

    def committed(self, key: str) -> int:
        """A count summed over the completion records: what the committed shards hold."""
        return sum(int(r.get(key) or 0) for r in self.shards)


@dataclass(slots=True)
class _Drawn:
    """A drawn figure: its PNG and a note for its caption."""

    png: bytes
    note: str = ""


def _load_state(output: str, storage_options: dict[str, Any] | None) -> _JobState:
    import yaml

    from embedder.checkpoint import Checkpoint

    checkpoint = Checkpoint(output, storage_options)
    job_yaml = checkpoint.load_job_yaml()
    if job_yaml is None:
        raise ReportError(f"{output!r} holds no embedder job (no _embedder/job.yaml); check the path")
    job = yaml.safe_load(job_yaml) or {}
    shards = sorted(checkpoint.completed().values(), key=lambda r: r.get("completed_at", 0))
    state = _JobState(output, job, checkpoint.runs(), shards)
    state.rows, state.rows_unreadable = _output_rows(output, job, storage_options)
    return state


def _output_rows(output: str, job: dict[str, Any], storage_options: dict[str, Any] | None) -> tuple[int | None, str]:
    """Rows in the output table as a reader sees them (LanceDB or Parquet), or None and why not."""
    try:
        from indexes.search import open_index

        table = (job.get("output") or {}).get("table") or "chunks"
        return open_index(output, storage_options, table=table).count_rows(), ""
    except Exception as err:  # noqa: BLE001 - the report still renders; the summary says why
        return None, f"{type(err).__name__}: {err}"


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


def committed_length_histogram(state: _JobState) -> tuple[list[int], str]:
    """Chunks per ``LENGTH_BIN``-token bin, of committed chunks only, and a note on how it was counted.

    Each run's ``length_histogram`` is matched against the chunks of the shards that run
    committed (their completion records carry its ``run_id``): a run whose histogram holds more
    (it counted an attempt that a crash threw away, in records written before runs counted
    committed chunks only) is scaled down to its committed chunks; a run with no committed shard
    left (it crashed before any commit, or a reembed replaced its rows) is left out.
    """
    committed_by_run: Counter[str] = Counter()
    for record in state.shards:
        committed_by_run[str(record.get("run_id"))] += int(record.get("chunks") or 0)
    attributed = all(record.get("run_id") for record in state.shards)
    counts: list[int] = []
    scaled, dropped = [], []
    for run in state.runs:
        bins = [int(n) for n in run.get("length_histogram") or []]
        recorded = sum(bins)
        if not recorded:
            continue
        if attributed:
            committed = committed_by_run.get(str(run.get("run_id")), 0)
            if committed == 0:
                dropped.append(f"{run.get('run_id', '?')} ({recorded:,})")
                continue
            if recorded > committed:
                scaled.append(f"{run.get('run_id', '?')} ({recorded:,} → {committed:,})")
                bins = _scale(bins, committed)
        if len(bins) > len(counts):
            counts.extend([0] * (len(bins) - len(counts)))
        for i, n in enumerate(bins):
            counts[i] += n
    notes = ["Committed chunks: each run's recorded lengths, matched against its shards' completion records."]
    if dropped:
        notes.append("Left out, no committed shard left: " + ", ".join(dropped) + ".")
    if scaled:
        notes.append("Scaled down to what they committed (they counted attempts a crash threw away): "
                     + ", ".join(scaled) + ".")
    if not attributed:
        notes = ["Chunk lengths as the runs recorded them: completion records without run ids cannot be matched."]
    return counts, " ".join(notes)


def _scale(bins: list[int], total: int) -> list[int]:
    """``bins`` scaled to sum to ``total`` (largest remainders get the rounding)."""
    recorded = sum(bins)
    exact = [n * total / recorded for n in bins]
    out = [int(x) for x in exact]
    for i in sorted(range(len(bins)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def _length_histogram(plt: Any, state: _JobState) -> _Drawn | str:
    counts, note = committed_length_histogram(state)
    if not any(counts):
        return "no run recorded chunk lengths of committed shards (runs older than the length histogram)"
    total = sum(counts)
    mean = sum((i + 0.5) * LENGTH_BIN * n for i, n in enumerate(counts)) / total
    fig, ax = _figure(
        plt, f"Chunk length: {total:,} committed chunks, mean ≈ {mean:.0f} tokens",
        "tokens per chunk (without specials/prompt)", "chunks",
    )
    edges = [i * LENGTH_BIN for i in range(len(counts))]
    ax.bar(edges, counts, width=LENGTH_BIN, align="edge", color=ACCENT, edgecolor="white", linewidth=0.5)
    limit = (state.job.get("chunking") or {}).get("max_tokens")
    right = max(len(counts) * LENGTH_BIN, limit or 0)
    ax.set_xlim(0, right + LENGTH_BIN)
    ax.set_ylim(0, max(counts) * 1.12)
    if limit:
        ax.axvline(limit, color=SECOND, linestyle="--", linewidth=1, label=f"chunking.max_tokens = {limit}")
        ax.legend(frameon=False, fontsize=8, loc="upper left")
    committed = state.committed("chunks")
    if committed and committed != total:
        note += f" The completion records hold {committed:,} chunks; the runs recorded lengths of {total:,}."
    return _Drawn(_png(plt, fig), note)


def throughput_intervals(timeline: list[list[float]], min_seconds: float | None = None) -> list[tuple[float, float, float]]:
    """A run's tokens/s as ``(start s, end s, tokens/s)`` over intervals long enough to mean something.

    The timeline is ``[seconds, tokens so far]``, sampled when encoded batches arrive but at most
    every ``min_seconds`` (the runners' ``TimelineSampler.PERIOD_S``), plus a final sample at the
    end of the pipeline, which may come milliseconds after the one before: a rate over that sliver
    is noise (a few tokens over a few ms), so samples closer than the interval are merged and a
    short tail joins the interval before it. Where batches take longer than the period (a CPU
    run), each sample is one batch, and tokens arrive a few batches late (they are counted when
    the runner takes a batch's vectors, and a few are in flight), with the last ones all at once at
    the end: intervals then span three batches, so that lag cannot fake a spike. A timeline shorter
    than one interval gives one interval over all of it.
    """
    if min_seconds is None:
        from embedder.execution.telemetry import TimelineSampler

        min_seconds = TimelineSampler.PERIOD_S
    points = _from_start(timeline)
    if len(points) < 2:
        return []
    gaps = [b[0] - a[0] for a, b in zip(points[1:-1], points[2:-1])]  # between regular samples
    if gaps and statistics.median(gaps) > 1.5 * min_seconds:
        min_seconds = 3 * statistics.median(gaps)
    spans: list[tuple[float, float, float, float]] = []  # (t0, tokens0, t1, tokens1)
    t0, k0 = points[0]
    for t, k in points[1:]:
        if t - t0 >= min_seconds:
            spans.append((t0, k0, t, k))
            t0, k0 = t, k
    t_end, k_end = points[-1]
    if t_end > t0:  # a tail shorter than the interval: merged into the one before it
        if spans:
            t0, k0, _, _ = spans.pop()
        spans.append((t0, k0, t_end, k_end))
    return [(a, b, (kb - ka) / (b - a)) for a, ka, b, kb in spans if b > a]


def _from_start(points: list[list[float]]) -> list[list[float]]:
    """The timeline with its origin: samples count tokens since the embedding started at 0 s."""
    if points and points[0][0] > 0 and points[0][1] > 0:
        return [[0.0, 0], *points]
    return points


def _throughput(plt: Any, state: _JobState) -> _Drawn | str:
    series = [(run, throughput_intervals(run.get("timeline") or [])) for run in state.runs if run.get("tokens")]
    series = [(run, spans) for run, spans in series if spans]
    if not series:
        return "no run recorded a timeline of tokens (runs older than the timeline, or no tokens embedded)"
    fig, ax = _figure(plt, "Throughput over time", "seconds since the embedding started", "tokens/s")
    colors = [ACCENT, SECOND, "#3a9d5d", "#8e44ad", "#c0392b", "#16a085"]
    top, right = 0.0, 0.0
    for n, (run, spans) in enumerate(series[-6:]):
        edges = [spans[0][0], *(end for _, end, _ in spans)]
        rates = [rate for _, _, rate in spans]
        color = colors[n % len(colors)]
        label = f"{run.get('run_id', '?')} ({run.get('state', '?')}): {run.get('tokens_per_second') or 0:,.0f} tok/s overall"
        ax.stairs(rates, edges, color=color, linewidth=1.6, baseline=None, label=label)
        if len(spans) < 40:  # few intervals: mark each one's rate at its middle
            ax.plot([(a + b) / 2 for a, b, _ in spans], rates, ".", color=color)
        top, right = max(top, *rates), max(right, edges[-1])
    ax.set_xlim(0, right * 1.02)
    ax.set_ylim(0, top * 1.25)  # headroom for the legend
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    note = ("Rates over intervals of at least the sampling period (three batches where batches are slower); "
            "a short last sample joins the interval before it.")
    return _Drawn(_png(plt, fig), note)


def _shard_durations(plt: Any, state: _JobState) -> _Drawn | str:
    timed = [(r["shard_id"], float(r["seconds"])) for r in state.shards if r.get("seconds") is not None]
    if not timed:
        return "no completion record has a duration (shards done by runs older than shard timing)"
    seconds = [s for _, s in timed]
    fig, ax = _figure(plt, "Shard durations", "shard, in completion order", "seconds")
    from matplotlib.ticker import MaxNLocator

    count = len(seconds)
    ax.bar(range(1, count + 1), seconds, width=1.0 if count > 60 else min(0.8, 0.15 * (count + 3)), color=ACCENT)
    if count <= 12:
        ax.set_xticks(range(1, count + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    pad = 0.6 if count > 3 else 1.0
    ax.set_xlim(1 - pad, count + pad)
    ax.set_ylim(0, max(max(seconds), 1e-3) * 1.3)  # headroom for the legend
    median = statistics.median(seconds)
    ax.axhline(median, color=SECOND, linestyle="--", linewidth=1, label=f"median {median:.2f} s")
    slowest = max(timed, key=lambda pair: pair[1])
    ax.legend(frameon=False, fontsize=8, loc="upper right",
              title=f"slowest: {_short(slowest[0])} ({slowest[1]:.2f} s)", title_fontsize=8)
    return _Drawn(_png(plt, fig))


def _canaries(plt: Any, state: _JobState) -> _Drawn | str:
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
    ax.plot(xs, [m if m is not None else float("nan") for m in means], "s--", color=SECOND, label="mean", zorder=3,
            markersize=8)
    ax.plot(xs, mins, "o-", color=ACCENT, label="min", zorder=4, markersize=5)  # on top: equal values stay visible
    ax.axhline(threshold, color=BAD, linewidth=1, label=f"threshold {threshold}")
    ax.set_xticks(xs, [_short(r.get("run_id", "?"), 16) for r in checked], fontsize=7, rotation=15)
    low = min(min(mins), threshold)
    ax.set_ylim(low - max(1e-4, (1 - low) * 0.5), 1.0 + max(2e-5, (1 - low) * 0.1))
    ax.ticklabel_format(axis="y", useOffset=False)
    if len(xs) == 1:
        ax.set_xlim(0.5, 1.5)
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    return _Drawn(_png(plt, fig))


FIGURES: dict[str, tuple[str, Callable[[Any, _JobState], _Drawn | str]]] = {
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
            _pass_cell(run.get("pass_totals")),
            _number(run.get("tokens_per_second"), "{:,.0f}"),
            _number(run.get("padding_waste"), "{:.1%}"),
            "—" if util is None else f"{util:.0f}% ({run.get('gpu_seconds', 0):.0f} s)",
            "—" if cost is None else f"${run.get('usd', 0):.4f} (${cost:.4f}/1M)",
            _number(canary.get("min_cosine"), "{:.5f}") if not canary.get("error") else "failed",
            html.escape(_short(str(run.get("error") or ""), 120)),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _pass_cell(totals: dict[str, Any] | None) -> str:
    """The pass totals a run record carries: ``1,234 rows, 11 shards`` (every run of the pass)."""
    if not totals:
        return "—"
    return f"{totals.get('rows', 0):,} rows, {totals.get('shards', 0):,} shards"


_HISTORY_HEADER = (
    "run", "state", "mode", "started", "time", "documents", "chunks", "tokens", "pass totals", "tokens/s",
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
.kv td{text-align:left} .note{font-size:.85rem;color:#555} .state.done{color:#2e7d32} .state.failed{color:#c0392b} .state.interrupted{color:#e07b39} .state.killed{color:#c0392b}
"""


TOTALS_NOTE = (
    "Totals count what the output holds: rows in the output table itself, documents, chunks and tokens "
    "from the completion records of committed shards — not the run records, whose counts include "
    "attempts that a crash threw away."
)


def _totals(state: _JobState) -> dict[str, int | None]:
    return {
        "rows": state.rows,
        "documents": state.committed("documents"),
        "chunks": state.committed("chunks"),
        "tokens": state.committed("tokens"),
        "quarantined": state.committed("bad_records"),
    }


def _rows_text(state: _JobState) -> str:
    written = state.committed("rows")
    if state.rows is None:
        return f"{written:,} by the committed shards' records (the output table could not be read: {state.rows_unreadable})"
    if state.rows != written:
        return f"{state.rows:,} in the output table (its committed shards' records say {written:,} written)"
    return f"{state.rows:,}"


def _summary(state: _JobState) -> list[tuple[str, str]]:
    job = state.job
    last = state.runs[-1] if state.runs else {}
    total = last.get("shards_total")
    totals = _totals(state)
    return [
        ("output", f"{state.output} ({(job.get('output') or {}).get('sink', '?')})"),
        ("source", str((job.get("source") or {}).get("uri", "?"))),
        ("model", str((job.get("model") or {}).get("name", "?"))),
        ("shards done", f"{len(state.shards):,}" + (f" of {total:,}" if total else "")),
        ("rows", _rows_text(state)),
        ("documents", f"{totals['documents']:,}"),
        ("chunks", f"{totals['chunks']:,}"),
        ("tokens", f"{totals['tokens']:,}"),
        ("quarantined records", f"{totals['quarantined']:,}"),
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


def render_html(
    state: _JobState, images: dict[str, bytes], missing: dict[str, str], notes: dict[str, str] | None = None
) -> str:
    """The report page: summary, the figures (inline PNGs, captions with their notes), the run history."""
    notes = notes or {}
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
        f'<p class="note">{html.escape(TOTALS_NOTE)}</p>',
        "<h2>Pictures</h2>",
        '<div class="grid">',
    ]
    for name, (title, _) in FIGURES.items():
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(
                f'<figure id="fig-{name}"><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(title)}"
                + (f'<br><span class="note">{html.escape(notes[name])}</span>' if notes.get(name) else "")
                + "</figcaption></figure>"
            )
        else:
            parts.append(
                f'<figure id="fig-{name}"><div class="missing">{html.escape(title)}: '
                f"{html.escape(missing.get(name, 'not recorded'))}</div></figure>"
            )
    parts += [
        "</div>",
        "<h2>Run history</h2>",
        '<p class="note">What each run did, from its run record: a run that stopped mid-shard counts chunks '
        "it never committed (the totals above count committed shards only).</p>",
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
    notes: dict[str, str] = {}
    for name, (_, draw) in FIGURES.items():
        drawn = draw(plt, state)
        if isinstance(drawn, _Drawn):
            images[name] = drawn.png
            if drawn.note:
                notes[name] = drawn.note
        else:
            missing[name] = drawn
    target = out_dir or join(output, REPORT_DIR)
    fs, root = filesystem(target, storage_options)
    report = Report(
        html_path=join(target, "report.html"), missing=missing, notes=notes, totals=_totals(state),
        chunk_lengths=committed_length_histogram(state)[0],
    )
    for name, png in images.items():
        write_bytes_atomic(fs, join(root, f"{name}.png"), png)
        report.figures[name] = join(target, f"{name}.png")
    page = render_html(state, images, missing, notes)
    write_bytes_atomic(fs, join(root, "report.html"), page.encode("utf-8"))
    return report
