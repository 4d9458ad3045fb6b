"""``embedder estimate``: a sample of the source predicts what a run embeds, and what it costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from embedder.cli import app
from embedder.config import ChunkingConfig, ModelConfig, SourceConfig, build_job
from embedder.estimate import (
    EstimateError,
    ModelShape,
    calibrate,
    estimate,
    load_throughput_table,
    model_profile,
    spread_order,
    table_throughput,
)

PROBES = ["Albedo is the measure of the diffuse reflection of solar radiation.", "ÉCOLE naïve café 42 — x²", "a\nb\tc"]


def cli(*args: str) -> Result:
    """The ``embedder`` command line, run in this process."""
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def encoder():
    from embedder.models.encoder import Encoder

    return Encoder.load(ModelConfig(name="all-MiniLM-L6-v2", device="cpu"))


@pytest.fixture(scope="module")
def wiki_documents(wiki_sample) -> list:
    from connectors.wikipedia import WikipediaConnector
    from embedder.records import Document

    connector = WikipediaConnector(SourceConfig(uri=str(wiki_sample)))
    return [d for shard in connector.list_shards() for d in connector.documents(shard) if isinstance(d, Document)]


def _chunk_all(encoder, documents: list, chunking: ChunkingConfig) -> tuple[int, int]:
    """(chunks, tokens) of the run's own chunker (``Chunker.for_encoder``) over every document."""
    from embedder.chunking import Chunker

    chunks = Chunker.for_encoder(encoder, chunking).chunk(documents, shard_id="all")
    return len(chunks), sum(len(c.token_ids) for c in chunks)


def test_estimate_on_the_wikipedia_sample_predicts_the_run_token_count(wiki_sample, encoder, wiki_documents) -> None:
    """``embedder estimate --json`` against what a run of the same job embeds.

    To keep CI fast the reference is not an ``embedder run`` (CPU encoding of ~600k tokens) but
    exactly what such a run embeds: the run's chunker (``Chunker.for_encoder`` of the loaded
    encoder, as ``run_local`` builds it) over every document of the source; a run's ``tokens``
    is the sum of those chunks' token counts.
    """
    done = cli("estimate", "--source", str(wiki_sample), "--gpu", "h200", "--gpu-hourly-usd", "3.5", "--json")
    assert done.exit_code == 0, done.stderr
    got = json.loads(done.stdout)
    assert {"documents", "chunks", "tokens", "gpu_hours", "usd"} <= set(got)
    chunks, tokens = _chunk_all(encoder, wiki_documents, ChunkingConfig())
    assert abs(got["tokens"] - tokens) <= 0.10 * tokens, (got["tokens"], tokens)
    assert abs(got["chunks"] - chunks) <= 0.10 * chunks, (got["chunks"], chunks)
    assert got["documents"] == len(wiki_documents) == 106
    assert got["sequence_tokens"] == got["tokens"] + got["chunks"] * encoder.layout.overhead
    assert got["gpu_hours"] == pytest.approx(got["sequence_tokens"] / got["tokens_per_second"] / 3600, rel=1e-6)
    assert got["usd"] == pytest.approx(got["gpu_hours"] * 3.5, rel=1e-6)
    assert "h200" in got["throughput_source"]


def test_a_fifth_of_a_larger_corpus_extrapolates_within_a_few_percent(tmp_path, encoder, wiki_documents) -> None:
    """The sample's paragraphs as a 5k-document JSONL: reading 20% of it, spread over the file,
    predicts documents, chunks and tokens of the whole."""
    from embedder.records import Document

    paragraphs = [
        Document(id=f"{d.id}-{i}", text=p, title=d.title)
        for d in wiki_documents
        for i, p in enumerate(x for x in d.text.split("\n\n") if len(x.strip()) > 40)
    ]
    path = tmp_path / "paragraphs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in paragraphs:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n")
    chunking = ChunkingConfig(max_tokens=128)
    chunks, tokens = _chunk_all(encoder, paragraphs, chunking)
    job = build_job({"source": {"uri": str(path)}, "output": {"uri": str(tmp_path / "out")},
                     "chunking": {"max_tokens": 128}})
    got = estimate(job, sample_mb=0.2 * path.stat().st_size / 2**20, tokens_per_second=1e6)
    assert not got.exact and 10 <= got.sample["shards"] < got.sample["total_shards"] / 3
    assert got.sample["bytes"] <= 0.25 * path.stat().st_size
    for predicted, real in ((got.documents, len(paragraphs)), (got.chunks, chunks), (got.tokens, tokens)):
        assert abs(predicted - real) <= 0.05 * real, (predicted, real)
    assert not (tmp_path / "out").exists()  # an estimate never touches the output


def test_model_profile_reads_what_the_encoder_uses_without_loading_weights(encoder) -> None:
    profile = model_profile(ModelConfig(name="all-MiniLM-L6-v2"))
    assert (profile.max_seq_length, profile.overhead) == (encoder.max_seq_length, encoder.layout.overhead)
    for text in PROBES:
        assert profile.tokenizer.encode(text, add_special_tokens=False).ids == \
            encoder.tokenizer.encode(text, add_special_tokens=False).ids
    assert profile.shape == ModelShape(hidden=384, layers=6, intermediate=1536)
    prompted = model_profile(ModelConfig(name="all-MiniLM-L6-v2", document_prompt="passage: ", max_seq_length=128))
    assert prompted.overhead == encoder.layout_for("passage: ").overhead > encoder.layout.overhead
    assert prompted.max_seq_length == 128


def _table(tmp_path: Path) -> Path:
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"gpus": {"h200": {"models": {
        "bge-base": {"hidden": 768, "layers": 12, "intermediate": 3072, "tokens_per_second": 1_000_000, "source": "test line"},
        "bge-large": {"hidden": 1024, "layers": 24, "intermediate": 4096, "tokens_per_second": 300_000, "source": "test line 2"},
        "minilm-l6": {"hidden": 384, "layers": 6, "intermediate": 1536, "tokens_per_second": 4_000_000, "source": "line 3"},
    }, "attention_length": 300}}}))
    return path


def test_throughput_is_measured_for_known_shapes_and_scaled_by_flops_for_others(tmp_path) -> None:
    table = load_throughput_table(_table(tmp_path))
    base = ModelShape(768, 12, 3072)
    measured = table_throughput(table, "H200", base, attention_length=300)
    assert measured.tokens_per_second == 1_000_000 and not measured.extrapolated and "test line" in measured.source
    e5_base_like = ModelShape(768, 12, 3072)  # same shape, other weights: the same figure
    assert table_throughput(table, "h200", e5_base_like, 300).tokens_per_second == 1_000_000
    small = ModelShape(384, 12, 1536)  # bge-small: nearest in FLOPs is MiniLM-L6 (half of them), not bge-base
    scaled = table_throughput(table, "h200", small, attention_length=300)
    ratio = ModelShape(384, 6, 1536).flops_per_token(300) / small.flops_per_token(300)
    assert scaled.extrapolated and "extrapolated" in scaled.source and "minilm-l6" in scaled.source
    assert scaled.tokens_per_second == pytest.approx(4_000_000 * ratio)
    xl = ModelShape(1280, 32, 5120)
    assert "bge-large" in table_throughput(table, "h200", xl).source  # the table's attention length
    tiny = ModelShape(128, 2, 512)  # small models are pipeline-bound: never faster than the fastest measured
    assert table_throughput(table, "h200", tiny).tokens_per_second == 4_000_000
    with pytest.raises(EstimateError, match="no measured throughput for GPU 'a100' \\(measured: h200\\)"):
        table_throughput(table, "a100", base, 300)


def test_the_bundled_table_holds_measured_figures_with_their_source() -> None:
    table = load_throughput_table()
    rows = [row for gpu in table["gpus"].values() for row in gpu["models"].values()]
    assert rows, "the bundled throughput table is empty"
    for row in rows:
        assert row["tokens_per_second"] > 0 and "RESULTS.md" in row["source"]


def test_gpu_hours_and_cost_follow_rate_and_price(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"document number {i} " * 20}) + "\n" for i in range(50)))
    job = build_job({"source": {"uri": str(path)}, "output": {"uri": str(tmp_path / "o")},
                     "runner": {"gpu_hourly_usd": 2.0}})
    got = estimate(job, tokens_per_second=1000)
    assert got.exact and got.documents == 50 and got.chunks == 50
    assert got.gpu_hours == pytest.approx(got.sequence_tokens / 1000 / 3600)
    assert got.usd == pytest.approx(got.gpu_hours * 2.0) and got.gpu_hourly_usd == 2.0  # the job's price
    assert estimate(job, tokens_per_second=1000, gpu_hourly_usd=4.0).usd == pytest.approx(2 * got.usd)
    unpriced = build_job({"source": {"uri": str(path)}, "output": {"uri": str(tmp_path / "o")}})
    assert estimate(unpriced, tokens_per_second=1000).usd is None


def test_cli_usage_errors_exit_2(tmp_path) -> None:
    missing = cli("estimate", "--source", str(tmp_path / "missing.jsonl"), "--tokens-per-second", "1000")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "1", "text": "hello world"}) + "\n")
    unknown = cli("estimate", "--source", str(path), "--gpu", "tpu-v9")
    assert unknown.exit_code == 2 and "no measured throughput for GPU 'tpu-v9'" in unknown.stderr
    table = cli("estimate", "--source", str(path), "--tokens-per-second", "5000", "--gpu-hourly-usd", "2")
    assert table.exit_code == 0 and "GPU time" in table.stdout and "$" in table.stdout, table.stderr


def test_spread_order_is_a_permutation_whose_prefixes_cover_the_range() -> None:
    for n in (1, 2, 7, 100, 1000):
        order = list(spread_order(n))
        assert sorted(order) == list(range(n))
    first = list(spread_order(1000))[:8]
    assert first[:4] == [0, 500, 250, 750]
    assert max(np.diff(sorted(first))) <= 250  # 8 picks, none more than a quarter apart


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="checks the error without a GPU")
def test_calibrate_without_a_gpu_says_so() -> None:
    job = build_job({"source": {"uri": "x.jsonl"}, "output": {"uri": "o"}})
    with pytest.raises(EstimateError, match="--calibrate needs a CUDA GPU"):
        calibrate(job, [])


@pytest.mark.gpu
def test_calibration_measures_the_encoder_on_this_gpu(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"sentence {i} about albedo and light " * 30}) + "\n"
                            for i in range(400)))
    job = build_job({"source": {"uri": str(path)}, "output": {"uri": str(tmp_path / "o")}})
    got = estimate(job, calibrate_on_gpu=True)
    assert got.tokens_per_second > 10_000 and got.throughput_source.startswith("calibrated on ")
    assert got.gpu_hours == pytest.approx(got.sequence_tokens / got.tokens_per_second / 3600)


def test_float8_reads_the_fp8_rows_marked_projected_until_measured(tmp_path) -> None:
    bundled = load_throughput_table()
    large = ModelShape(1024, 24, 4096)
    bf16 = table_throughput(bundled, "h200", large)
    fp8 = table_throughput(bundled, "h200", large, dtype="float8")
    assert fp8.tokens_per_second > bf16.tokens_per_second and not bf16.projected
    assert fp8.projected and "PROJECTED" in fp8.source  # a target until bench_fp8.py measures it
    for row in bundled["gpus"]["h200"]["models_float8"].values():
        assert row["tokens_per_second"] > 0 and (row.get("projected") or "RESULTS.md" in row["source"])
    scaled = table_throughput(bundled, "h200", ModelShape(1280, 32, 5120), dtype="fp8")
    assert scaled.extrapolated and scaled.projected and "projected for" in scaled.source
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"document number {i} " * 20}) + "\n" for i in range(50)))
    job = build_job({"source": {"uri": str(path)}, "output": {"uri": str(tmp_path / "o")},
                     "model": {"dtype": "fp8"}, "runner": {"gpu_hourly_usd": 3.6}})
    got = estimate(job, tokens_per_second=1_000_000)
    assert got.dtype == "float8" and got.usd_per_million_tokens == pytest.approx(3.6 / 3600)  # $1/h per 1M tok/s
