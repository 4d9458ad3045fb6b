"""A long-context model through the whole product, its canary check's cost, and sentence-transformers.

An 8192-token XLM-R-large-shaped model (24 layers, 1024 hidden, random weights, the bundled MiniLM's
tokenizer) embeds a synthetic corpus of long documents (40% full 8k windows, the rest log-normal)
with ``embedder.run`` — JSONL in, Parquet out, default validation — and the table shows the embedding
rate next to what the run's end-of-run canary check cost (its tokens, device and seconds, from the
run record) as a share of the whole run. In the same process, sentence-transformers encodes the
same documents in bf16 (``SentenceTransformer.encode``, its length sorting, the best of
``--st-batch-sizes``) for the throughput comparison.

Usage (GPU machine, repository root)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_long_context.py --tokens 4000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models

SHAPE = {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096}
MAX_SEQ_LENGTH = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4_000_000)
    parser.add_argument("--st-tokens", type=int, default=1_000_000, help="tokens sentence-transformers encodes")
    parser.add_argument("--st-batch-sizes", default="4,16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--minilm", default="")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="fewer for a CPU smoke run")
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"], help="a multiple of 64")
    args = parser.parse_args()
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.hidden // 64, "intermediate": 4 * args.hidden}

    import tokenizers
    from tiny_models import save_tiny_model

    from benchmarks.bench_encoder import synthetic_corpus
    from benchmarks.bench_pipeline import minilm_dir
    from embedder import run
    from embedder.config import build_job

    minilm = minilm_dir(args.minilm)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = tokenizers.Tokenizer.from_file(f"{minilm}/tokenizer.json")
        tok.no_truncation()
        tok.no_padding()
        docs = synthetic_corpus(tok, args.tokens, MAX_SEQ_LENGTH - 2)
        corpus = root / "long.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
        print(f"corpus: {len(docs):,} documents, {corpus.stat().st_size / 1e6:.1f} MB", flush=True)
        model = save_tiny_model(root / "xlmr-large-8k", minilm, family="xlm-roberta", pooling="mean",
                                max_seq_length=MAX_SEQ_LENGTH, spread=None, **shape)
        job = build_job({
            "source": {"uri": str(corpus), "format": "jsonl"},
            "output": {"uri": str(root / "out"), "sink": "parquet"},
            "model": {"name": model, "device": args.device, "dtype": args.dtype},
            "runner": {"workers": args.workers, "show_progress": False},
        })
        t0 = time.perf_counter()
        result = run(job)
        wall = time.perf_counter() - t0
        canary = result.canary or {}
        row = {
            "shards": result.shards_total, "documents": result.documents, "chunks": result.chunks,
            "tokens": result.tokens, "load_s": round(result.load_seconds, 1),
            "embed_s": round(result.pipeline_seconds, 2), "tokens_per_s": round(result.tokens_per_second),
            "run_s": round(result.seconds, 1), "wall_s": round(wall, 1),
            "canaries": canary.get("count"), "canary_tokens": canary.get("tokens"),
            "canary_device": result.canary_device, "canary_s": round(result.canary_seconds, 2),
            "canary_share": round(result.canary_seconds / result.seconds, 4) if result.seconds else None,
            "canary_min_cos": canary.get("min_cosine"),
        }
        print(json.dumps(row), flush=True)
        st = sentence_transformers_rate(model, docs, args.st_tokens, args.st_batch_sizes, args.device, tok)
    print()
    print(f"{'model':<14} {'shards':>6} {'tokens':>11} {'embed s':>8} {'tokens/s':>10} {'run s':>6} "
          f"{'canaries':>8} {'canary tokens':>13} {'on':>6} {'canary s':>8} {'share':>6} {'min cos':>8}")
    print(f"{'xlmr-large-8k':<14} {row['shards']:>6} {row['tokens']:>11,} {row['embed_s']:>8} {row['tokens_per_s']:>10,} "
          f"{row['run_s']:>6} {row['canaries']:>8} {row['canary_tokens']:>13,} {row['canary_device']:>6} "
          f"{row['canary_s']:>8} {row['canary_share']:>6.1%} {row['canary_min_cos']:>8.5f}")
    for batch_size, rate in st:
        print(f"sentence-transformers {args.dtype} batch {batch_size}: {rate:,.0f} tokens/s")
    best = max(rate for _, rate in st)
    print(f"embedder whole product / sentence-transformers best batch: {row['tokens_per_s'] / best:.2f}x")


def sentence_transformers_rate(
    model_dir: str, docs: list, tokens: int, batch_sizes: str, device: str, tok: object
) -> list[tuple[int, float]]:
    """``SentenceTransformer.encode`` tokens/s over the first ``tokens`` tokens of the corpus."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts, counted = [], 0
    for d in docs:
        n = len(tok.encode(d.text, add_special_tokens=False).ids)
        texts.append(d.text)
        counted += min(n, MAX_SEQ_LENGTH - 2)
        if counted >= tokens:
            break
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = SentenceTransformer(model_dir, device=device, model_kwargs={"torch_dtype": dtype})
    model.encode(texts[:8], batch_size=4)  # warm-up
    out = []
    for batch_size in (int(b) for b in batch_sizes.split(",")):
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
        torch.cuda.synchronize() if device == "cuda" else None
        out.append((batch_size, counted / (time.perf_counter() - t0)))
        print(f"sentence-transformers batch {batch_size}: {out[-1][1]:,.0f} tokens/s over {counted:,} tokens", flush=True)
    return out


if __name__ == "__main__":
    main()
