"""ModernBERT-base throughput on one GPU: embedder's packed forward vs sentence-transformers bf16.

The model is a random-weight ModernBERT of ModernBERT-base's shape (22 layers, hidden 768, 12 heads,
GeGLU intermediate 1152, global attention every 3rd layer, local window 128, RoPE 160k/10k, 8192
positions, no biases) with the MiniLM tokenizer (throughput depends on the shape, not the weights).
The corpus is ``bench_encoder``'s synthetic Wikipedia-like mix of chunks up to ``--chunk-tokens``
(40% full windows, the rest a log-normal tail). Rows:

* ``sentence-transformers bf16 bs=N``: ``SentenceTransformer.encode`` (transformers' own ModernBERT,
  SDPA) in bfloat16, at each of ``--st-batch-sizes``; the best is the ratio's reference.
* ``embedder e2e``: texts → ``Chunker`` (process pool) → ``TokenBudgetPacker`` →
  ``Encoder.encode_async`` → vectors on the host, timed as a whole; min cos vs ST fp32.
* ``embedder gpu-only``: the same packed batches, pre-built, through ``encode_async`` alone.
* ``embedder.run``: the whole product (local runner, JSONL reader processes, Parquet sink with
  per-shard commits, checkpoints); tokens/s of the embedding phase, the run's canary min cos.

Variants: ``default`` (what ``Encoder.load`` gives: on CUDA the elementwise passes as Triton
kernels, ``fused``), ``compiled`` (``fused=False``: the same passes fused by ``torch.compile``),
``eager`` (neither), ``flex`` (every layer in ``flex_attention``; opt-in). Each row names the
attention backend and the forward (fused, compiled or eager).

Usage (GPU machine, repository root; ~4 minutes on an H200)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_modernbert.py --minilm .carry/minilm --out bench_modernbert.json

CPU smoke run of the script itself (a 2-layer model of hidden 64, fp32, a small corpus)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_modernbert.py --device cpu --tokens 20000 --st-batch-sizes 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models

SHAPE = dict(hidden=768, layers=22, heads=12, intermediate=1152, local_attention=128, global_every=3, max_positions=8192)
SMOKE_SHAPE = dict(hidden=64, layers=2, heads=4, intermediate=96, local_attention=32, global_every=2, max_positions=1024)


def build_model(root: Path, minilm: str, pooling: str) -> str:
    from tiny_models import save_tiny_model

    return save_tiny_model(
        root / "modernbert",
        minilm,
        family="modernbert",
        pooling=pooling,
        normalize=True,
        max_seq_length=SHAPE["max_positions"],
        hidden=SHAPE["hidden"],
        layers=SHAPE["layers"],
        heads=SHAPE["heads"],
        intermediate=SHAPE["intermediate"],
        spread=None,  # transformers' own initialisation: realistic activation scales
        config_overrides={
            "local_attention": SHAPE["local_attention"],
            "global_attn_every_n_layers": SHAPE["global_every"],
        },
    )


def flops_per_corpus(seq_lengths: np.ndarray) -> float:
    """Matmul FLOPs (Wqkv, Wo, Wi, Wo) plus attention, local layers counting their window only."""
    h, i, layers = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"]
    n_global = len(range(0, layers, SHAPE["global_every"]))
    lengths = seq_lengths.astype(np.float64)
    linear = 2 * (4 * h * h + 3 * h * i) * layers * lengths.sum()
    window = np.minimum(lengths, SHAPE["local_attention"] + 1)
    attention = 4 * h * (n_global * (lengths**2).sum() + (layers - n_global) * (lengths * window).sum())
    return float(linear + attention)


def load_variant(path: str, label: str, device: str) -> Any:
    import transformers

    from embedder.config import ModelConfig
    from embedder.models.encoder import Encoder
    from embedder.models.packed_modernbert import PackedModernBertEncoder

    dtype = "bfloat16" if device == "cuda" else "float32"
    if label == "flex":
        return Encoder.load(ModelConfig(name=path, device=device, dtype=dtype, attention="flex"))
    encoder = Encoder.load(ModelConfig(name=path, device=device, dtype=dtype))
    if label in ("compiled", "eager"):  # the job config's compile: false means "auto"; force the forward here
        hf = transformers.AutoModel.from_pretrained(path)
        encoder._packed_model = PackedModernBertEncoder.from_hf(
            hf, encoder.device, encoder.dtype, fused=False, compile=label == "compiled"
        )
        del hf
    return encoder


def run_pipeline(path: str, docs: list[Any], root: Path, chunk_tokens: int, workers: str, device: str) -> dict[str, Any]:
    """``embedder.run`` on the corpus as JSONL into a Parquet output (local runner)."""
    from embedder import run
    from embedder.config import build_job

    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
    job = build_job({
        "source": {"uri": str(corpus), "format": "jsonl", "shard_size_mb": 8},
        "output": {"uri": str(root / "out-parquet"), "sink": "parquet"},
        "model": {"name": path, "device": device, "dtype": "bfloat16" if device == "cuda" else "float32"},
        "chunking": {"max_tokens": chunk_tokens},
        "runner": {"workers": workers, "show_progress": False},
    })
    t0 = time.perf_counter()
    result = run(job)
    return {
        "tokens": result.tokens, "chunks": result.chunks, "wall_s": time.perf_counter() - t0,
        "load_s": result.load_seconds, "embed_s": result.pipeline_seconds, "tokens_per_s": result.tokens_per_second,
        "canary_min_cos": (result.canary or {}).get("min_cosine"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of a tiny model")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="corpus size, in tokens")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="longest chunk (specials included)")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--st-batch-sizes", default="32,64,128")
    parser.add_argument("--variants", default="default,compiled", help="of default, compiled, eager, flex")
    parser.add_argument("--token-budget", type=int, default=0, help="0: the encoder's auto budget")
    parser.add_argument("--budget-sweep", default="", help="GPU-only token budgets for the first variant, e.g. 65536,131072")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--no-pipeline", action="store_true", help="skip the embedder.run row")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--check-texts", type=int, default=256, help="texts compared with sentence-transformers fp32")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    import torch

    from benchmarks.bench_encoder import (
        _chunk_task,
        _init_worker,
        _row,
        cosines,
        matmul_peak_tflops,
        prebuilt_batches,
        print_table,
        reference_fp32,
        run_end_to_end,
        run_gpu_only,
        run_sentence_transformers,
        synthetic_corpus,
    )
    from benchmarks.bench_pipeline import minilm_dir
    from embedder.models.packed_modernbert import varlen_window_supported

    t_start = time.perf_counter()
    device = args.device
    if device == "cpu":
        SHAPE.update(SMOKE_SHAPE)
    minilm = minilm_dir(args.minilm)
    peak = matmul_peak_tflops(device)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, peak {peak:.0f} TFLOP/s, workers {args.workers}, "
          f"varlen_attn window_size: {varlen_window_supported()}", flush=True)
    rows: list[dict[str, Any]] = []
    name = "modernbert"
    root = Path(tempfile.mkdtemp(prefix="bench-modernbert-"))
    try:
        path = build_model(root, minilm, args.pooling)
        first = load_variant(path, args.variants.split(",")[0], device)
        docs = synthetic_corpus(first.tokenizer, args.tokens, args.chunk_tokens - first.layout.overhead)
        texts = [d.text for d in docs]
        seq_lengths = np.asarray([len(t.split(" ")) for t in texts]) + first.layout.overhead
        total_tokens = int(seq_lengths.sum())
        flops = flops_per_corpus(seq_lengths)
        print(f"  {len(docs)} texts, {total_tokens} tokens, mean {seq_lengths.mean():.0f}, max {seq_lengths.max()}; "
              f"ready after {time.perf_counter() - t_start:.0f}s", flush=True)
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(len(texts), size=min(args.check_texts, len(texts)), replace=False))
        reference = reference_fp32(path, [texts[i] for i in sample], device)

        st = run_sentence_transformers(
            path, texts, [int(b) for b in args.st_batch_sizes.split(",") if b], device, dtype="bfloat16"
        )
        st_dtype = "bf16" if device == "cuda" else "fp32"
        dtype = "bf16" if device == "cuda" else "fp32"
        st_rate = total_tokens / st["seconds"]
        for r in st["runs"]:
            rate = total_tokens / r["seconds"]
            rows.append(_row(name, f"sentence-transformers {st_dtype} bs={r['batch_size']}", rate, flops / r["seconds"], peak,
                             rate / st_rate, None))

        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=args.workers, mp_context=ctx, initializer=_init_worker,
            initargs=(first.tokenizer_json, args.chunk_tokens - first.layout.overhead),
        ) as pool:
            list(pool.map(_chunk_task, [docs[:4]] * args.workers))  # start the workers
            for index, label in enumerate(v for v in args.variants.split(",") if v):
                enc = first if index == 0 else load_variant(path, label, device)
                if args.token_budget:
                    enc.token_budget = args.token_budget
                packed = enc._packed_model
                forward = "fused" if packed.fused else "compiled" if packed.compiled else "eager"
                backend = f"{packed.attention_backend} {forward}"
                t_warm = time.perf_counter()
                run_end_to_end(enc, docs[: max(64, len(docs) // 8)], pool, 2, workers=args.workers)
                print(f"    {label} ({backend}): warm-up {time.perf_counter() - t_warm:.1f}s, budget {enc.token_budget}",
                      flush=True)
                for run in range(1, args.e2e_repeats + 1):
                    e2e = run_end_to_end(enc, docs, pool, 2, workers=args.workers)
                    assert e2e["tokens"] == total_tokens, (e2e["tokens"], total_tokens)
                    min_cos = float(cosines(e2e["vectors"][sample], reference).min())
                    rate = total_tokens / e2e["seconds"]
                    rows.append(_row(name, f"embedder e2e {dtype} {label} {backend} run {run}", rate, flops / e2e["seconds"],
                                     peak, rate / st_rate, min_cos))
                    print(f"    {label} e2e run {run}: {e2e['seconds']:.2f}s ({rate / 1e6:.2f}M tok/s, min cos {min_cos:.5f})",
                          flush=True)
                sweep = [int(b) for b in args.budget_sweep.split(",") if b] if index == 0 else []
                for budget in sweep or [enc.token_budget]:
                    batches = prebuilt_batches(enc, docs, pool, budget)
                    enc.token_budget = budget
                    for batch in batches[:3]:  # shapes of the warm-up, then steady state
                        enc.encode(batch)
                    gpu = run_gpu_only(enc, batches, device)
                    rate = gpu["tokens"] / gpu["seconds"]
                    rows.append(_row(name, f"embedder gpu-only {dtype} {label} {backend} budget={budget}", rate,
                                     flops / gpu["seconds"], peak, rate / st_rate, None))
                    print(f"    {label} gpu-only budget {budget}: {gpu['seconds']:.2f}s ({rate / 1e6:.2f}M tok/s)", flush=True)
                if enc is not first:
                    del enc
                    if device == "cuda":
                        torch.cuda.empty_cache()
        del first
        if device == "cuda":
            torch.cuda.empty_cache()
        if not args.no_pipeline:
            pipe = run_pipeline(path, docs, root, args.chunk_tokens, "auto", device)
            print(f"    embedder.run: {json.dumps(pipe)}", flush=True)
            rows.append(_row(name, "embedder.run local runner -> Parquet (embedding phase)", pipe["tokens_per_s"],
                             flops / max(pipe["embed_s"], 1e-9), peak, pipe["tokens_per_s"] / st_rate, pipe["canary_min_cos"]))
        print_table(rows, peak)
        print(f"\ntotal {time.perf_counter() - t_start:.0f}s; target: >= 2.0M tok/s, min cos >= 0.999", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "peak_tflops": peak,
                                                  "varlen_window": varlen_window_supported(), "rows": rows}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
