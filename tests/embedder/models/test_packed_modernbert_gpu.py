"""GPU fidelity of the packed ModernBERT forward: the sliding-window kernels against an explicitly
masked SDPA, and bf16/fp16 vectors against sentence-transformers fp32. Run on a CUDA machine with
``python -m pytest -m gpu tests/embedder/models/test_packed_modernbert_gpu.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import cosines, save_tiny_model, texts_of_lengths  # noqa: E402

from embedder.config import ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder  # noqa: E402
from embedder.models.packed_modernbert import PackedModernBertEncoder, varlen_window_supported  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HALF_MIN_COS = 0.999
MAX_LEN = 1024
WINDOW = 128  # ModernBERT-base's local_attention: ±64


@pytest.fixture(scope="module")
def gpu_modernbert_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-modernbert-gpu")
    # Moderate weights (spread 0.05), as in test_encoder_gpu: random models with huge activations
    # are chaotic in half precision, unlike trained ones.
    shape = dict(hidden=128, layers=6, heads=2, intermediate=192, max_seq_length=MAX_LEN, spread=0.05)
    return {
        "cls": save_tiny_model(root / "cls", minilm_path, family="modernbert", pooling="cls", seed=1,
                               config_overrides={"local_attention": WINDOW}, **shape),
        "mean": save_tiny_model(root / "mean", minilm_path, family="modernbert", pooling="mean", seed=2,
                                prompts={"query": "search_query: ", "document": "search_document: "},
                                config_overrides={"local_attention": WINDOW}, **shape),
    }


def _packed_qkv(lengths: list[int], heads: int = 4, head_dim: int = 64, dtype=None):
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", generator=gen, dtype=torch.float32) for _ in range(3))
    q = q * 2.0  # peaked attention: a key wrongly in or out of the window moves the output
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


def _windowed_reference(q, k, v, lengths: list[int], half: int) -> torch.Tensor:
    """Each sequence alone through SDPA in float32 with the explicit ``|i - j| <= half`` mask."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        grid = torch.arange(n, device="cuda")
        mask = (grid[:, None] - grid[None, :]).abs() <= half
        o = torch.nn.functional.scaled_dot_product_attention(
            *(t[sl].float().transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask
        )
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["varlen", "flex", "triton-window"])
def test_sliding_window_attention_kernels_are_exact(backend: str) -> None:
    from embedder.models.packed_modernbert import (
        _attend_flex,
        _attend_varlen,
        _BatchAttention,
        _flex_block_mask,
    )

    if backend == "varlen" and not varlen_window_supported():
        pytest.skip("this torch's varlen_attn has no window_size (local layers then run in flex)")
    lengths, half = [1, 64, 65, 66, 300, 1000, 129, 2], WINDOW // 2
    q, k, v, cu = _packed_qkv(lengths, dtype=torch.bfloat16)
    meta = _BatchAttention(cu_seqlens=cu, max_seqlen=max(lengths), rope={})
    if backend == "triton-window":
        from embedder.models.packed_modernbert import _attend_window_kernel

        got = _attend_window_kernel(q, k, v, meta, half)
    elif backend == "flex":
        segments = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
        meta.local_block_mask = _flex_block_mask(segments, half)
        got = _attend_flex(q, k, v, meta, half)
    else:
        got = _attend_varlen(q, k, v, meta, half)
    torch.testing.assert_close(got.float(), _windowed_reference(q, k, v, lengths, half), atol=2e-2, rtol=2e-2)


def test_the_window_kernel_takes_more_sequences_than_a_grid_axis_allows() -> None:
    """70,000 short sequences (a batch of titles): more than the 65,535 programs of a CUDA grid's
    second axis; each sequence fits its window, so the result is plain attention per sequence.
    (The reference is SDPA on the sequences grouped by length: varlen_attn itself puts the
    sequences on that axis and cannot take this batch.)"""
    from embedder.models import kernels

    lengths = [2, 3] * 35_000
    q, k, v, cu = _packed_qkv(lengths, dtype=torch.bfloat16)
    got = kernels.local_attention(q, k, v, cu, max(lengths), WINDOW // 2)
    want = torch.empty_like(q, dtype=torch.float32)
    sizes, starts = torch.tensor(lengths, device="cuda"), cu[:-1].long()
    for n in (2, 3):
        rows = starts[sizes == n][:, None] + torch.arange(n, device="cuda")  # [sequences, n]
        grouped = [t[rows].float().transpose(1, 2) for t in (q, k, v)]  # [sequences, heads, n, d]
        want[rows] = torch.nn.functional.scaled_dot_product_attention(*grouped).transpose(1, 2)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("forward", ["fused", "fused+rope-window+glu-gemm", "fused+bf16-residual", "compiled"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["cls", "mean"])
def test_modernbert_half_precision_matches_fp32_sentence_transformers(
    gpu_modernbert_dirs: dict[str, str], name: str, dtype: str, forward: str
) -> None:
    """The default forward (Triton kernels between the GEMMs, RoPE inside the window kernel), the
    same with the GeGLU in Wi's GEMM epilogue too (opt-in: slower than cuBLAS on an H100), the same
    with the residual stream in the run's dtype (``residual_fp32`` off, a benchmark variant) and the
    ``torch.compile`` one."""
    import transformers
    from sentence_transformers import SentenceTransformer

    path = gpu_modernbert_dirs[name]
    encoder = Encoder.load(ModelConfig(name=path, device="cuda", dtype=dtype))
    packed = encoder._packed_model
    assert encoder.packed and isinstance(packed, PackedModernBertEncoder)
    assert packed.attention_backend == "varlen+triton-window" and packed.fused and not packed.compiled
    # the default rotates q and k inside the window kernel (else the RoPE pass would hide a broken path)
    assert packed.rope_in_window and packed.local_takes_rope and not packed.glu_in_gemm and packed.residual_fp32
    if forward == "compiled":
        hf = transformers.AutoModel.from_pretrained(path)
        packed = PackedModernBertEncoder.from_hf(hf, encoder.device, encoder.dtype, fused=False)
        assert packed.compiled and not packed.fused
        encoder._packed_model = packed
    elif forward == "fused+bf16-residual":
        packed.residual_fp32 = False
    elif forward != "fused":
        packed.rope_in_window = packed.glu_in_gemm = True
    room = encoder.max_seq_length - encoder.layout.overhead
    rng = np.random.default_rng(0)
    lengths = sorted({1, 2, 3, WINDOW // 2, WINDOW, room - 1, room, *rng.integers(1, room, size=40).tolist()})
    texts = texts_of_lengths(encoder.tokenizer, lengths, seed=1)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    reference = SentenceTransformer(path, device="cuda").encode(
        texts, prompt=encoder.document_prompt or None, batch_size=16, convert_to_numpy=True
    )
    assert cosines(ours, reference).min() >= HALF_MIN_COS
