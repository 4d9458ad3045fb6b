"""bf16 sensitivity of the 7B decoder shape, on CPU (emulated bf16): which rounding costs the fidelity.

``bench_decoder``'s ``mistral-7b`` shape (hidden 4096, 32 heads and 8 key/value heads of 128,
SwiGLU 14336, RoPE theta 1e6, weights drawn N(0, 0.02) in bf16 as the benchmark draws them on the
GPU, norms 1, last-token pooling) reached min cos 0.99780 to its fp32 reference on an H200 against
the issue's 0.999. This script runs that shape's forward on CPU in fp32 with bf16 rounding applied
exactly where each variant rounds — the weights are bf16 values already, so the fp32 forward on them
is the reference, and a GEMM on bf16 operands with fp32 accumulation is emulated by an fp32 matmul of
the rounded operands. 7B parameters do not fit beside their copies in this machine's memory, so
each layer's weights are drawn, used by every variant and dropped (the draw is the same for all).

Rounding points (names used in the table):

* ``gemm_in`` — every GEMM's input in bf16 (the normalised states, attention output, GLU output),
  and attention's q/k/v (with RoPE's cos/sin, which the kernels round to the run's dtype): what any
  bf16 tensor-core path must round;
* ``p`` — FlashAttention's probabilities rounded to bf16 before the P·V product (its second MMA);
* ``qkv_out``, ``gu_out`` — the QKV and gate/up GEMM outputs rounded (their consumers, RoPE and the
  GLU, read them in bf16);
* ``resid_in`` — the attention output and down projections' outputs rounded before they are added
  to the float32 residual;
* ``resid`` — the residual stream itself rounded after each add (transformers' bf16 forward,
  as sentence-transformers runs it);
* ``inv_freq`` — RoPE's inverse frequencies rounded to bf16 (what ``Module.to(bf16)`` does to the
  rotary buffer; ``from_pretrained(dtype=...)`` keeps it float32).

Variants: ``embedder fused (today)`` is everything but ``resid`` — ``packed_decoder``'s fused
forward; ``o/down out fp32`` drops ``resid_in`` (cuBLAS can write those two GEMMs' outputs in fp32
from bf16 operands: ``torch.mm(..., out_dtype=torch.float32)``); ``GEMM inputs only`` is the floor
of a bf16 GEMM path; ``transformers bf16`` adds ``resid`` (the sentence-transformers row of the
benchmark), and ``transformers bf16 + bf16 inv_freq`` that baseline as the benchmark built it before
2026-12-04 (``.to(bf16)``). ``--variants`` picks some by name. Each line prints the cosine to fp32 of every token's final state — in a causal model a
token's state is the last-token embedding of the text up to it, so each position is one pooled
embedding of a prefix — as min / 1st percentile / mean, and at each sequence's last token.

Usage (repository root; ~8 minutes on 2 cores for the whole 32-layer shape)::

    PYTHONPATH=. python benchmarks/decoder_bf16_sensitivity.py
    PYTHONPATH=. python benchmarks/decoder_bf16_sensitivity.py --layers 4 --seqs 1 --length 64   # smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

SHAPE = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=32768, theta=1_000_000.0)
EPS = 1e-6
ALL = frozenset({"gemm_in", "p", "qkv_out", "gu_out", "resid_in"})
VARIANTS = {
    "fp32 reference": frozenset(),
    "embedder fused (today)": ALL,
    "o/down out fp32": ALL - {"resid_in"},
    "all GEMM outputs fp32": frozenset({"gemm_in", "p"}),
    "GEMM inputs only (no p)": frozenset({"gemm_in"}),
    "transformers bf16": ALL | {"resid"},
    "transformers bf16 + bf16 inv_freq": ALL | {"resid", "inv_freq"},
}


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


class Variant:
    """One variant's state through the layers: the residual ``x`` ([T, hidden] float32)."""

    def __init__(self, rounds: frozenset[str], x: torch.Tensor) -> None:
        self.rounds = rounds
        self.x = x.clone()

    def r(self, point: str, t: torch.Tensor) -> torch.Tensor:
        return bf16(t) if point in self.rounds else t

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Hugging Face's RMSNorm: normalised in fp32, rounded to the weight's dtype, times the weight."""
        n = self.x * torch.rsqrt(self.x.pow(2).mean(-1, keepdim=True) + EPS)
        return self.r("gemm_in", self.r("gemm_in", n) * weight)

    def add(self, out: torch.Tensor) -> None:
        self.x = self.r("resid", self.x + self.r("resid_in", out))


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, path: Variant) -> torch.Tensor:
    """``rotate_half`` RoPE in fp32 on ``t`` [T, h, d] with cos/sin [T, 1, d/2] (bf16 values when rounding)."""
    c, s = path.r("gemm_in", cos), path.r("gemm_in", sin)
    a, b = t.chunk(2, dim=-1)
    return path.r("gemm_in", torch.cat((a * c - b * s, b * c + a * s), dim=-1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], path: Variant) -> torch.Tensor:
    """Causal GQA attention per sequence, FlashAttention's arithmetic: fp32 scores and softmax
    statistics, P rounded to bf16 (``p``) for the P·V product, divided by the fp32 row sum."""
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    out, start = [], 0
    for n in lengths:
        qs = q[start : start + n].transpose(0, 1)  # [h, n, d]
        ks = k[start : start + n].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vs = v[start : start + n].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        scores = qs @ ks.transpose(1, 2) / d**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        o = (path.r("p", p) @ vs) / p.sum(-1, keepdim=True)
        out.append(o.transpose(0, 1))
        start += n
    return path.r("gemm_in", torch.cat(out).reshape(q.shape[0], heads * d))


def draw(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) drawn in bf16, as ``bench_decoder.build_decoder`` draws on the GPU, held in fp32."""
    return bf16(torch.empty(shape).normal_(0.0, 0.02, generator=gen))


def layer(paths: list[Variant], gen: torch.Generator, lengths: list[int], tables: dict[bool, tuple[torch.Tensor, torch.Tensor]]) -> None:
    h, heads, kv, d, inter = (SHAPE[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate"))
    ones = torch.ones(h)
    wqkv = draw(((heads + 2 * kv) * d, h), gen)
    wo = draw((h, heads * d), gen)
    wgu = draw((2 * inter, h), gen)
    wdown = draw((h, inter), gen)
    for path in paths:
        cos, sin = tables["inv_freq" in path.rounds]
        qkv = path.r("qkv_out", F.linear(path.norm(ones), wqkv))
        q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
        q = rope(q.reshape(-1, heads, d), cos, sin, path)
        k = rope(k.reshape(-1, kv, d), cos, sin, path)
        v = path.r("gemm_in", v.reshape(-1, kv, d))
        path.add(F.linear(attention(q, k, v, lengths, path), wo))
        gate, up = path.r("gu_out", F.linear(path.norm(ones), wgu)).chunk(2, dim=-1)
        path.add(F.linear(path.r("gemm_in", F.silu(gate) * up), wdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=2)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all); the reference always runs")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(",")}
        unknown = wanted - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        variants = {k: v for k, v in VARIANTS.items() if k in wanted or not v}
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    lengths = [args.length] * args.seqs
    ids = torch.randint(1000, 30000, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    table = draw((SHAPE["vocab"], SHAPE["hidden"]), gen)
    paths = [Variant(rounds, table[ids]) for rounds in variants.values()]
    del table
    positions = torch.cat([torch.arange(n) for n in lengths]).float()
    d = SHAPE["head_dim"]
    inv_freq = 1.0 / (SHAPE["theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    tables = {}
    for rounded in (False, True):
        freqs = positions[:, None] * (bf16(inv_freq) if rounded else inv_freq)[None, :]
        tables[rounded] = (freqs.cos()[:, None, :], freqs.sin()[:, None, :])
    for i in range(args.layers):
        layer(paths, gen, lengths, tables)
        print(f"  layer {i + 1}/{args.layers} ({time.perf_counter() - t0:.0f}s)", flush=True)
    finals = [F.normalize(path.norm(torch.ones(SHAPE["hidden"])), dim=-1) for path in paths]
    ends = np.cumsum(lengths) - 1
    print(
        f"\nmistral-7b shape, {args.layers} layers, {args.seqs} x {args.length} random tokens, "
        f"cos of every token's final state to fp32 ({time.perf_counter() - t0:.0f}s)"
    )
    print(f"| {'variant':<36} | rounds at                                                |    min   |    p1    |   mean   | last tokens min |")
    print(f"|{'-' * 38}|{'-' * 58}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 17}|")
    for (name, rounds), final in zip(variants.items(), finals, strict=True):
        if not rounds:
            continue
        cos_all = (final * finals[0]).sum(-1).numpy()
        points = ", ".join(sorted(rounds)) or "-"
        print(
            f"| {name:<36} | {points:<56} | {cos_all.min():.5f} | {np.percentile(cos_all, 1):.5f} | "
            f"{cos_all.mean():.5f} | {cos_all[ends].min():.5f}         |"
        )


if __name__ == "__main__":
    main()
