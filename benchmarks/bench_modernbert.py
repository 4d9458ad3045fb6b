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
``eager`` (neither), ``flex`` (every layer in ``flex_attention``; opt-in), and the fused forward
with its two fusions set as named (``PackedModernBertEncoder.rope_in_window``: RoPE inside the local
layers' window kernel, on by default; ``glu_in_gemm``: the GeGLU in Wi's GEMM epilogue, off):
``rope-pass`` (neither), ``rope-window``, ``glu-gemm``, ``rope-window+glu-gemm``; and ``bf16-residual``
(the default with ``residual_fp32`` off: the residual stream in bf16 as transformers keeps it, the
adds in cuBLAS's epilogue, the norm passes reading it alone). Each row names the attention backend
and the forward (fused, compiled or eager).

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
    packed = encoder._packed_model
    if label in ("rope-pass", "rope-window", "glu-gemm", "rope-window+glu-gemm"):  # the fused forward's fusions
        packed.rope_in_window = "rope-window" in label
        packed.glu_in_gemm = "glu-gemm" in label
    if label == "bf16-residual":
        packed.residual_fp32 = False
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


LOCAL_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 3)]
GLU_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4),
               (256, 64, 64, 8, 3)]  # linear_glu: block_m, block_n, block_k, warps, stages
# whole-forward variants: (RoPE in place, RoPE inside the window kernel, GeGLU in Wi's GEMM, fp32 residual)
FORWARD_VARIANTS = {"rope copies": (False, False, False, True), "rope in place": (True, False, False, True),
                    "+ rope in window kernel": (True, True, False, True), "+ GeGLU in Wi's GEMM": (True, True, True, True),
                    "rope in window kernel, bf16 residual": (True, True, False, False)}


def base_config(layers: int = SHAPE["layers"], **extra: Any) -> Any:
    """transformers' ``ModernBertConfig`` of the ModernBERT-base shape (``SHAPE``), ``layers`` deep (``extra``: more fields)."""
    import transformers

    return transformers.ModernBertConfig(
        vocab_size=50368, hidden_size=SHAPE["hidden"], num_hidden_layers=layers, num_attention_heads=SHAPE["heads"],
        intermediate_size=SHAPE["intermediate"], local_attention=SHAPE["local_attention"],
        global_attn_every_n_layers=SHAPE["global_every"], max_position_embeddings=SHAPE["max_positions"], **extra,
    )


def profile_forward(budgets: list[int]) -> None:
    """Where the fused forward's time goes, on one GPU: whole forwards of a random ModernBERT-base
    (RoPE copying q/k/v out of Wqkv's output, then in place) at each token budget, each piece alone
    at the last budget (ms per batch: per-layer time times the layers that run it; GB/s for the
    memory-bound kernels), other attention kernels, and the top CUDA kernels of one forward."""
    import torch
    import torch.nn.functional as F
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_encoder import _cuda_seconds, _profile_batch
    from embedder.models import kernels
    from embedder.models.packed_bert import build_attention
    from embedder.models.packed_modernbert import PackedModernBertEncoder

    h, i, layers, heads = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"], SHAPE["heads"]
    model = transformers.ModernBertModel(base_config()).eval()
    cuda = torch.device("cuda")
    packed = PackedModernBertEncoder.from_hf(model, cuda, torch.bfloat16)
    print(f"  profile: attention {packed.attention_backend}, {packed.elementwise}", flush=True)
    rng = np.random.default_rng(0)
    batches = [_profile_batch(rng, budget) for budget in budgets]

    def forward(b: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return packed(b["ids"], b["pos"], build_attention(b["cu"], b["seg"], b["max_len"], b["total"], True))

    defaults = (packed.rope_in_place, packed.rope_in_window, packed.glu_in_gemm, packed.residual_fp32)
    for label, (packed.rope_in_place, packed.rope_in_window, packed.glu_in_gemm, packed.residual_fp32) in FORWARD_VARIANTS.items():
        for b in batches:
            seconds = _cuda_seconds(lambda b=b: forward(b))
            print(f"  forward T={b['total']} {label}: {seconds * 1e3:.1f} ms/batch, "
                  f"{b['total'] / seconds / 1e6:.3f}M tok/s, {flops_per_corpus(b['lengths']) / seconds / 1e12:.0f} TFLOP/s",
                  flush=True)
    packed.rope_in_place, packed.rope_in_window, packed.glu_in_gemm, packed.residual_fp32 = defaults
    b = batches[-1]
    total = b["total"]
    n_global = len(range(0, layers, SHAPE["global_every"]))
    bf = dict(device=cuda, dtype=torch.bfloat16)
    x = torch.randn(total, h, device=cuda)
    hidden = torch.randn(total, h, **bf)
    wide = torch.randn(total, i, **bf)
    w = {"Wqkv": torch.randn(3 * h, h, **bf) * 0.02, "Wo": torch.randn(h, h, **bf) * 0.02,
         "Wi": torch.randn(2 * i, h, **bf) * 0.02, "Wo (mlp)": torch.randn(h, i, **bf) * 0.02}
    ones = torch.ones(h, **bf)
    inv_freq = packed._inv_freq[packed.plan[0][1]]
    rows: list[tuple[str, float, float | None]] = []  # (piece, ms per batch, GB/s)
    with torch.inference_mode():
        for name, weight in w.items():
            inp = wide if name == "Wo (mlp)" else hidden
            sec = _cuda_seconds(lambda inp=inp, weight=weight: F.linear(inp, weight))
            rows.append((f"mm {name} ({2 * total * weight.numel() / sec / 1e12:.0f} TFLOP/s)", sec * layers * 1e3, None))
        for name, inp in (("Wo", hidden), ("Wo (mlp)", wide)):  # the residual add in the epilogue (bf16 residual)
            residual = hidden.clone()
            sec = _cuda_seconds(lambda inp=inp, name=name, residual=residual: residual.addmm_(inp, w[name].t()))
            rows.append((f"mm {name} + residual, addmm ({2 * total * w[name].numel() / sec / 1e12:.0f} TFLOP/s)",
                         sec * layers * 1e3, None))
        qkv = F.linear(hidden, w["Wqkv"])
        gu = F.linear(hidden, w["Wi"])
        rope_bytes = 2 * qkv.numel() * 2  # read and write of q, k and v (in place: of q and k only)
        elementwise: dict[str, tuple[Any, int, int]] = {
            f"rope, q/k/v copied ({tokens} tok/program)" if not in_place else f"rope in place ({tokens})": (
                lambda in_place=in_place, tokens=tokens: kernels.qk_norm_rope(
                    qkv, b["pos"], inv_freq, 1.0, heads, heads, None, None, 1e-5, in_place=in_place, tokens=tokens),
                layers, rope_bytes * 2 // 3 if in_place else rope_bytes,
            )
            for in_place, tokens in ((False, 16), (True, 16), (True, 32), (True, 64))
        }
        elementwise["add + LayerNorm, fp32 residual"] = (
            lambda: kernels.add_layer_norm_f32(x, hidden, ones, None, 1e-5), 2 * layers, total * h * (4 + 2 + 4 + 2))
        x16 = x.to(torch.bfloat16)
        elementwise["LayerNorm alone, bf16 residual"] = (
            lambda: kernels.add_layer_norm_f32(x16, None, ones, None, 1e-5), 2 * layers, total * h * (2 + 2))
        elementwise["GeGLU"] = (lambda: kernels.glu(gu, "gelu"), layers, gu.numel() * 2 * 3 // 2)
        for name, (fn, count, nbytes) in elementwise.items():
            sec = _cuda_seconds(fn)
            rows.append((name, sec * count * 1e3, nbytes / sec / 1e9))
        two_pass = kernels.glu(gu, "gelu")
        sec = _cuda_seconds(lambda: kernels.glu(F.linear(hidden, w["Wi"]), "gelu"))
        rows.append(("mm Wi + GeGLU, two passes", sec * layers * 1e3, None))
        for bm, bn, bk, warps, stages in GLU_CONFIGS:
            def fused_glu(bm: int = bm, bn: int = bn, bk: int = bk, warps: int = warps, stages: int = stages) -> Any:
                return kernels.linear_glu(hidden, w["Wi"], None, "gelu", block_m=bm, block_n=bn, block_k=bk,
                                          num_warps=warps, num_stages=stages)

            diff = (fused_glu().float() - two_pass.float()).abs().max().item()
            sec = _cuda_seconds(fused_glu)
            rows.append((f"mm Wi + GeGLU epilogue {bm}x{bn}x{bk} w{warps} s{stages} "
                         f"({2 * total * w['Wi'].numel() / sec / 1e12:.0f} TFLOP/s, diff {diff:.1e})", sec * layers * 1e3, None))
        from torch.nn.attention.varlen import varlen_attn

        cu, m = b["cu"], b["max_len"]
        split = qkv.view(total, 3, heads, h // heads)
        views = split.unbind(1)
        copies = [t.contiguous() for t in views]
        half = SHAPE["local_attention"] // 2
        for label, (q, k, v) in (("contiguous", copies), ("views of qkv", views)):
            sec = _cuda_seconds(lambda q=q, k=k, v=v: varlen_attn(q, k, v, cu, cu, m, m))
            rows.append((f"attention global, {label}", sec * n_global * 1e3, None))
            sec = _cuda_seconds(lambda q=q, k=k, v=v: varlen_attn(q, k, v, cu, cu, m, m, window_size=(half, half)))
            rows.append((f"attention local +-{half}, {label}", sec * (layers - n_global) * 1e3, None))
        windowed = varlen_attn(*views, cu, cu, m, m, window_size=(half, half))
        for bm, bn, warps, stages in LOCAL_CONFIGS:
            def local(bm: int = bm, bn: int = bn, warps: int = warps, stages: int = stages) -> Any:
                return kernels.local_attention(*views, cu, m, half, block_m=bm, block_n=bn, num_warps=warps,
                                               num_stages=stages)

            diff = (local().float() - windowed.float()).abs().max().item()
            sec = _cuda_seconds(local)
            rows.append((f"attention local, Triton {bm}x{bn} w{warps} s{stages} (diff {diff:.1e})",
                         sec * (layers - n_global) * 1e3, None))
        # RoPE inside the kernel: q and k unrotated, against the kernel on q and k rotated by qk_norm_rope
        tables = kernels.rope_tables(b["pos"], inv_freq, torch.bfloat16)
        rotated = kernels.local_attention(*kernels.qk_norm_rope(qkv.clone(), b["pos"], inv_freq, 1.0, heads, heads,
                                                                None, None, 1e-5), cu, m, half)
        for bm, bn, warps, stages in LOCAL_CONFIGS:
            def local_rope(bm: int = bm, bn: int = bn, warps: int = warps, stages: int = stages) -> Any:
                return kernels.local_attention(*views, cu, m, half, block_m=bm, block_n=bn, num_warps=warps,
                                               num_stages=stages, rope=tables)

            diff = (local_rope().float() - rotated.float()).abs().max().item()
            sec = _cuda_seconds(local_rope)
            rows.append((f"attention local + RoPE, Triton {bm}x{bn} w{warps} s{stages} (diff {diff:.1e})",
                         sec * (layers - n_global) * 1e3, None))
        reference = varlen_attn(*copies, cu, cu, m, m)
        try:
            def cudnn() -> Any:
                return torch.ops.aten._cudnn_attention_forward(*copies, None, cu, cu, m, m, False, 0.0, False, False)[0]

            diff = (cudnn().float() - reference.float()).abs().max().item()
            sec = _cuda_seconds(cudnn)
            rows.append((f"attention global, cuDNN varlen (max diff {diff:.1e})", sec * n_global * 1e3, None))
        except Exception as err:  # a private op: exploration only
            print(f"    cuDNN varlen attention: {type(err).__name__}: {str(err).splitlines()[0][:160]}", flush=True)
    for name, ms, gbs in rows:
        print(f"    {name:<58} {ms:7.1f} ms/batch" + (f"  {gbs:6.0f} GB/s" if gbs else ""), flush=True)
    default_local = packed._local
    for bm, bn, warps, stages in LOCAL_CONFIGS:
        packed._local = lambda q, k, v, meta, window, rope=None, cfg=(bm, bn, warps, stages): kernels.local_attention(
            q, k, v, meta.cu_seqlens, meta.max_seqlen, window, block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2],
            num_stages=cfg[3], rope=rope)
        for b in batches:
            seconds = _cuda_seconds(lambda b=b: forward(b))
            print(f"  forward T={b['total']} default, Triton local {bm}x{bn} w{warps} s{stages}: "
                  f"{seconds * 1e3:.1f} ms/batch, {b['total'] / seconds / 1e6:.3f}M tok/s", flush=True)
    packed._local = default_local  # the kernel table below is of the default forward
    forward(b)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(b)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of a tiny model")
    parser.add_argument("--minilm", default="", help="bundled MiniLM directory (default: the installed package)")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="corpus size, in tokens")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="longest chunk (specials included)")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--st-batch-sizes", default="32,64,128")
    parser.add_argument("--variants", default="default,compiled", help="of default, compiled, eager, flex, rope-pass, rope-window, glu-gemm, rope-window+glu-gemm, bf16-residual")
    parser.add_argument("--token-budget", type=int, default=0, help="0: the encoder's auto budget")
    parser.add_argument("--budget-sweep", default="", help="GPU-only token budgets for the first variant, e.g. 65536,131072")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--no-pipeline", action="store_true", help="skip the embedder.run row")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--check-texts", type=int, default=256, help="texts compared with sentence-transformers fp32")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    parser.add_argument("--profile", default="", help="token budgets, e.g. 65536,131072: only profile the fused forward")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    import torch

    if args.profile:
        profile_forward([int(b) for b in args.profile.split(",") if b])
        return
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
