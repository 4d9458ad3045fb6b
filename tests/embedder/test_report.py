"""After a run: ``embedder validate`` re-checks the stored vectors against the reference model, and
``embedder report`` draws a self-contained HTML page with the pictures a user looks at, checked in a
real headless browser."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import Result
from typer.testing import CliRunner

from embedder import run
from embedder.checkpoint import Checkpoint
from embedder.cli import app
from embedder.cli_ops import validate_output
from embedder.config import OutputConfig, build_job
from embedder.report import ACCENT, FIGURES, build_report, throughput_intervals
from indexes.lance import LanceSink
from indexes.search import open_index

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart" / "docs.jsonl"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """A real output with two runs: the embedding run, then a rerun that finds every shard done."""
    out = str(tmp_path_factory.mktemp("report") / "db")
    job = build_job({"source": {"uri": str(QUICKSTART)}, "output": {"uri": out, "sink": "lance"},
                     "model": {"device": "cpu"}, "chunking": {"max_tokens": 64},
                     "runner": {"show_progress": False, "gpu_hourly_usd": 2.5}, "validation": {"canary_samples": 8}})
    first = run(job)
    second = run(job)
    assert first.state == second.state == "done" and first.chunks > 0 and second.chunks == 0
    return out


def cli(*args: str) -> Result:
    """The ``embedder`` command line, run in this process."""
    return CliRunner().invoke(app, list(args))


def _png_pixels(data: bytes) -> np.ndarray:
    import io

    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_report_holds_every_picture_inline_and_as_files(output, tmp_path) -> None:
    report = build_report(output, str(tmp_path / "rep"))
    assert report.missing == {} and set(report.figures) == set(FIGURES)
    page = Path(report.html_path).read_text(encoding="utf-8")
    inline = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in inline] == [title for title, _ in FIGURES.values()]
    for (name, path), (_, data) in zip(report.figures.items(), inline):
        png = Path(path).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and base64.b64decode(data) == png, name
        pixels = _png_pixels(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 500 and pixels[..., :3].std() > 0.05, name
    runs = Checkpoint(output).runs()
    assert len(runs) == 2 and all(r["run_id"] in page for r in runs)
    assert "$" in page and "per 1M tokens" in page  # the cost of the priced runs
    assert "src=\"http" not in page and "<script" not in page  # nothing to fetch: one file is the report


def test_default_location_is_next_to_the_job_state(output) -> None:
    report = build_report(output)
    assert report.html_path == f"{output}/_embedder/report/report.html" and Path(report.html_path).exists()


def test_records_from_before_the_metrics_still_give_a_report(tmp_path) -> None:
    out = str(tmp_path / "old")
    checkpoint = Checkpoint(out)
    checkpoint.save_job("source: {uri: docs.jsonl}\noutput: {uri: old, sink: parquet}\nmodel: {name: m}\n")
    checkpoint.record_completion("docs.jsonl@0-10", {"rows": 3, "documents": 1, "chunks": 3, "tokens": 40})
    checkpoint.write_run({"run_id": "r1", "state": "done", "started_at": 1.0, "tokens": 40, "seconds": 2.0})
    report = build_report(out)
    assert report.figures == {} and set(report.missing) == set(FIGURES)
    page = Path(report.html_path).read_text(encoding="utf-8")
    assert "r1" in page and page.count('class="missing"') == len(FIGURES)


def test_cli_report_and_its_usage_error(output, tmp_path) -> None:
    done = cli("report", output, "--out", str(tmp_path / "r"))
    assert done.exit_code == 0 and done.stdout.strip() == str(tmp_path / "r" / "report.html"), done.stderr
    missing = cli("report", str(tmp_path / "nothing"))
    assert missing.exit_code == 2 and "holds no embedder job" in missing.stderr


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_with_its_plots(output, tmp_path) -> None:
    report = build_report(output, str(tmp_path / "rep"))
    url = Path(report.html_path).resolve().as_uri()
    common = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', dom.stdout)
    assert images == [title for title, _ in FIGURES.values()]
    assert '<table id="history">' in dom.stdout

    shot = tmp_path / "shot.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1400", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = _png_pixels(shot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (1400, 1200)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100  # text, axes and plots, not a blank or single-colour page
    # The plots' bars and lines (the report's accent colour) are on screen: the PNGs were drawn.
    accent = np.array([int(ACCENT[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    near_accent = np.all(np.abs(pixels - accent) < 0.06, axis=-1)
    assert near_accent.sum() > 2000, near_accent.sum()


def test_validate_passes_a_real_output(output) -> None:
    report = validate_output(output, samples=16)
    assert report["ok"] and report["samples"] == 16 and report["rows"] > 16
    assert report["min_cosine"] >= 0.9999 and report["bad_vectors"] == [] and report["threshold"] == 0.999


def test_validate_fails_an_output_whose_vectors_do_not_match_their_text(output, tmp_path) -> None:
    """The real rows copied with two vectors swapped and one zeroed: ``embedder validate`` exits 1
    and names exactly those chunks."""
    index = open_index(output)
    table = index.table.to_arrow().select(index.schema.names)
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = table.column("id").to_pylist()
    vectors[[0, 1]] = vectors[[1, 0]]
    vectors[2] = 0.0
    broken = table.set_column(table.schema.get_field_index("vector"), table.schema.field("vector"),
                              pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))
    bad = str(tmp_path / "bad")
    sink = LanceSink(OutputConfig(uri=bad), index.schema)
    sink.open()
    writer = sink.begin(table.column("shard_id")[0].as_py())
    writer.write(broken)
    writer.commit()

    report = validate_output(bad, samples=len(ids))
    assert not report["ok"] and report["bad_vectors"] == [[ids[2], "vector has zero norm"]]
    assert {i for i, c in report["worst"] if c < 0.999} == {ids[0], ids[1]}
    failed = cli("validate", bad, "--samples", str(len(ids)))
    assert failed.exit_code == 1 and all(i in failed.stderr for i in ids[:3]), failed.stderr
    passed = cli("validate", output, "--samples", "8", "--json")
    assert passed.exit_code == 0 and json.loads(passed.stdout)["ok"] is True, passed.stderr
    assert cli("validate", str(tmp_path / "nothing")).exit_code == 2


# --- short runs, timelines that end on a sliver, totals of what was committed ------------------------


WORDS = "river mountain city ocean forest history science music library garden bridge harbor winter".split()


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> tuple[str, dict]:
    """A real run of 20 documents: one shard, one batch, a timeline of one sample."""
    root = tmp_path_factory.mktemp("one-shard")
    rng = random.Random(3)
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(60 + 5 * i))}) + "\n")
    out = str(root / "db")
    result = run(build_job({"source": {"uri": str(root / "docs.jsonl")}, "output": {"uri": out, "sink": "lance"},
                            "model": {"device": "cpu"}, "runner": {"show_progress": False}}))
    assert result.state == "done" and result.shards_done == 1 and result.documents == 20
    return out, result.to_dict()


def _accent_columns(png: bytes) -> float:
    """The share of the picture's columns where the report's accent colour (bars, lines) is drawn."""
    pixels = _png_pixels(png)[..., :3]
    accent = np.array([int(ACCENT[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    near = np.all(np.abs(pixels - accent) < 0.06, axis=-1)
    return float(near.any(axis=0).mean())


def test_a_one_shard_run_draws_every_picture_readably(one_shard, tmp_path) -> None:
    out, record = one_shard
    assert len(record["timeline"]) <= 2  # the case at hand: one or two samples
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib warning (identical limits, empty axes...)
        report = build_report(out, str(tmp_path / "rep"))
    assert report.missing == {} and set(report.figures) == set(FIGURES)
    page = Path(report.html_path).read_text(encoding="utf-8")
    assert 'class="missing"' not in page
    pngs = {name: Path(path).read_bytes() for name, path in report.figures.items()}
    for name, png in pngs.items():
        assert len(png) > 10_000 and _png_pixels(png)[..., :3].std() > 0.05, name
    # One interval from 0 s to the sample: a line across the plot, not a dot on a degenerate axis.
    spans = throughput_intervals(record["timeline"])
    assert len(spans) == 1 and spans[0][0] == 0.0 and spans[0][1] == record["timeline"][-1][0]
    assert spans[0][2] == pytest.approx(record["tokens"] / spans[0][1])
    assert _accent_columns(pngs["throughput"]) > 0.6
    # One shard: one bar of sensible width, neither a sliver nor the whole plot.
    assert 0.1 < _accent_columns(pngs["shard_durations"]) < 0.45
    assert _accent_columns(pngs["chunk_lengths"]) > 0.02
    assert report.chunk_lengths == record["length_histogram"] and sum(report.chunk_lengths) == record["chunks"]


def test_throughput_has_no_spike_from_the_last_sample() -> None:
    # GPU-like: samples every 2 s at 10k tokens/s, then the end-of-run sample 4 ms later with 100 tokens
    # (100 / 0.004 s = 25k tokens/s over the sliver, were it an interval of its own).
    steady = [[2.0 * i, 20_000 * i] for i in range(1, 11)] + [[20.004, 200_100]]
    overall = 200_100 / 20.004
    spans = throughput_intervals(steady)
    assert max(rate for _, _, rate in spans) <= 1.5 * overall
    assert spans[-1][1] == 20.004 and all(b - a >= 2.0 for a, b, _ in spans)
    # CPU-like: a batch per ~3.9 s, counted a batch late, the last ones all at once at the end (a real
    # record's timeline: 22k tokens in the last 1.46 s of a 4,005 tokens/s run).
    batches = [[6.845, 7982], [10.724, 24074], [14.679, 40135], [18.601, 56103], [22.515, 72208],
               [26.386, 88431], [30.25, 104521], [34.047, 120586], [35.505, 142528]]
    spans = throughput_intervals(batches)
    assert max(rate for _, _, rate in spans) <= 1.5 * 4005.5
    assert spans[0][0] == 0.0 and spans[-1][1] == 35.505
    # Rates cover the run: tokens of all intervals add up to the run's tokens.
    assert sum((b - a) * rate for a, b, rate in spans) == pytest.approx(142528)


def test_a_record_only_timeline_is_drawn_without_the_spike(tmp_path) -> None:
    out = str(tmp_path / "old")
    checkpoint = Checkpoint(out)
    checkpoint.save_job("source: {uri: docs.jsonl}\noutput: {uri: old, sink: parquet}\nmodel: {name: m}\n")
    checkpoint.record_completion("docs.jsonl@0-10", {"rows": 3, "documents": 1, "chunks": 3, "tokens": 40})
    timeline = [[2.0 * i, 20_000 * i] for i in range(1, 6)] + [[10.003, 100_050]]
    checkpoint.write_run({"run_id": "r1", "state": "done", "started_at": 1.0, "tokens": 100_050, "seconds": 11.0,
                          "pipeline_seconds": 10.003, "tokens_per_second": 100_050 / 10.003, "timeline": timeline})
    report = build_report(out)
    assert "throughput" in report.figures and "sampling period" in report.notes["throughput"]
    assert report.totals["rows"] is None  # no part files: the table cannot be read, the summary says so
    page = Path(report.html_path).read_text(encoding="utf-8")
    assert "3 by the committed shards&#x27; records (the output table could not be read" in page


def test_totals_count_committed_shards_not_a_crashed_attempt(one_shard, tmp_path) -> None:
    """Next to a real output, the run records of two runs that counted chunks they never committed:
    one crashed before any commit; the real one, rewritten as a record of the old kind, also
    counted an attempt of 30 chunks that a crash threw away. The report counts what is in the output."""
    real, record = one_shard
    out = str(tmp_path / "db")
    shutil.copytree(real, out)
    checkpoint = Checkpoint(out)
    rows = len(open_index(out).table.to_arrow())
    completion = list(checkpoint.completed().values())
    assert rows == record["chunks"] == sum(r["chunks"] for r in completion)

    inflated = dict(record, length_histogram=[*record["length_histogram"]], chunks=record["chunks"] + 30)
    inflated["length_histogram"][2] += 30
    checkpoint.write_run(inflated)
    crashed = {"run_id": "20991231T000000-crash", "state": "failed", "mode": "full", "started_at": record["started_at"] + 1,
               "documents": 400, "chunks": 500, "tokens": 120_000, "rows_written": 0,
               "length_histogram": [0] * 10 + [500], "timeline": [[2.0, 60_000], [4.0, 120_000]],
               "error": "RuntimeError: killed mid-shard"}
    checkpoint.write_run(crashed)

    report = build_report(out, str(tmp_path / "rep"))
    assert report.totals == {"rows": rows, "documents": 20, "chunks": record["chunks"], "tokens": record["tokens"],
                             "quarantined": 0}
    assert sum(report.chunk_lengths) == record["chunks"]  # not + 500 + 30
    assert len(report.chunk_lengths) == len(record["length_histogram"])  # the crashed run's bin 10 is not drawn
    note = report.notes["chunk_lengths"]
    assert "Left out, no committed shard left: 20991231T000000-crash (500)" in note
    assert f"{record['run_id']} ({record['chunks'] + 30:,} → {record['chunks']:,})" in note
    page = Path(report.html_path).read_text(encoding="utf-8")
    for key, value in (("rows", rows), ("documents", 20), ("chunks", record["chunks"]), ("tokens", record["tokens"])):
        assert f"<tr><th>{key}</th><td>{value:,}</td></tr>" in page, key
    assert "completion records of committed shards" in page  # the caption says where totals come from
    assert "<td>500</td>" in page and "20991231T000000-crash" in page  # the history still shows what it did
