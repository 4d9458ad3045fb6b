"""What a bf16 residual stream costs ModernBERT's fidelity, on CPU: the floor of ``residual_fp32 = False``.

The fused GPU forward keeps ModernBERT's residual stream in float32 and measured min cos 1.00000 to
fp32 (RESULTS.md). ``bench_modernbert.py``'s ``bf16-residual`` variant keeps it in bf16 instead, as
transformers does, to save memory traffic. Before a GPU measures it, this script estimates the cost:
``bench_modernbert``'s ModernBERT-base shape (random weights from transformers' own initialisation,
as the benchmark builds it) on random token ids of mixed lengths, mean and CLS pooling, against the
same model in fp32:

* ``transformers bf16`` — the Hugging Face model cast to bf16 (residual in bf16, every op rounded):
  sentence-transformers' bf16 path;
* ``embedder eager bf16`` — ``PackedModernBertEncoder`` in bf16 with padded attention, eager: its
  residual stream is in the run's dtype too, so this is the bf16-residual math on CPU's bf16 kernels
  (the GPU's addmm rounds the add once in fp32, a little better).

Random weights are not a trained checkpoint: trained models grow outlier features that bf16 rounds
worse, so read a figure here as an upper bound. The sequences' lengths include ones over the
local window (128), so local and global layers both run windowed.

Usage (repository root; ~2 minutes on 2 cores)::

    PYTHONPATH=. python benchmarks/modernbert_bf16_sensitivity.py
    PYTHONPATH=. python benchmarks/modernbert_bf16_sensitivity.py --layers 2 --lengths 16,200   # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_modernbert import SHAPE, base_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--lengths", default="1,16,64,129,300,512,1024,2048")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import transformers

    from embedder.models.packed_bert import build_attention
    from embedder.models.packed_modernbert import PackedModernBertEncoder
    from embedder.models.pooling import pool, token_segments

    torch.manual_seed(args.seed)
    model = transformers.ModernBertModel(base_config(args.layers, attn_implementation="sdpa")).eval()
    lengths = [int(n) for n in args.lengths.split(",")]
    generator = torch.Generator().manual_seed(args.seed + 1)
    texts = [torch.randint(5, 50000, (n,), generator=generator) for n in lengths]
    ids = torch.cat(texts)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    segments = token_segments(cu, int(cu[-1]))
    meta = build_attention(cu, segments, max(lengths), int(cu[-1]), False)

    def pooled(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {mode: pool(hidden, cu, segments, mode) for mode in ("mean", "cls")}
    print(f"ModernBERT-base shape, {args.layers} layers, {len(lengths)} sequences of {lengths} tokens", flush=True)

    def hf(m: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([m(input_ids=t[None]).last_hidden_state[0].float() for t in texts])

    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    reference = pooled(hf(model))
    rows = {}
    packed = PackedModernBertEncoder.from_hf(model, cpu, torch.float32, attention="padded", fused=False, compile=False)
    with torch.inference_mode():
        rows["embedder eager fp32"] = pooled(packed(ids, positions, meta))
    packed = PackedModernBertEncoder.from_hf(model, cpu, torch.bfloat16, attention="padded", fused=False, compile=False)
    with torch.inference_mode():
        rows["embedder eager bf16"] = pooled(packed(ids, positions, meta))
    rows["transformers bf16"] = pooled(hf(model.to(torch.bfloat16)))
    print(f"{'variant':<22} {'pooling':<7} {'min cos':>9} {'mean cos':>9}  per sequence", flush=True)
    for name, pooled in rows.items():
        for pooling, vectors in pooled.items():
            cos = F.cosine_similarity(vectors, reference[pooling], dim=1)
            per = " ".join(f"{c:.5f}" for c in cos.tolist())
            print(f"{name:<22} {pooling:<7} {cos.min().item():9.5f} {cos.mean().item():9.5f}  {per}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s; the issue's bound: min cos >= 0.999", flush=True)


if __name__ == "__main__":
    main()
