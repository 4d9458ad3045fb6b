"""Fused GPU kernels of the packed forward (Triton, CUDA only; the kernels are in ``_triton_kernels``).

``add_layer_norm(h, x, weight, bias, eps)`` computes ``LayerNorm(h + x)`` — the residual add and the
LayerNorm that close both halves of every BERT layer — in one pass: each row of ``h`` and ``x`` is
read once and the result written once, where PyTorch's ``F.layer_norm(h + x)`` writes the sum,
reads it back, then reads and writes again. The sum and the statistics are computed in fp32, as
PyTorch's LayerNorm does internally, so the result matches ``F.layer_norm(h + x)`` to the dtype's
rounding (the sum is not rounded to bf16 before normalising, which only removes one rounding step).

For ``model.dtype: float8`` (``embedder.models.fp8``) two kernels quantize where the values are
produced, so FP8 adds no memory pass of its own: ``add_layer_norm_quantize`` is ``add_layer_norm``
that also writes the result's e4m3 copy and per-row scales (the next GEMM's input), and
``activation_quantize`` applies GELU (or nothing, for the attention output) and quantizes in one
read of its input.

The decoder forward (``packed_decoder``: Qwen, Mistral, Llama) has three more: ``add_rms_norm``
(the float32 residual add and the next RMSNorm, in place), ``qk_norm_rope`` (the fused QKV output
split into heads, Qwen3's q/k norms and RoPE, in one pass) and ``glu`` (SwiGLU/GeGLU). ModernBERT's
(``packed_modernbert``) uses the last two and ``add_layer_norm_f32``, the LayerNorm form of
``add_rms_norm``.

Triton is optional: ``fused_add_layer_norm_available()`` says whether the kernel can run (Triton
importable, CUDA tensors); the packed forward falls back to PyTorch otherwise. With
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through Triton's interpreter, which is how
the CPU tests check it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F

# Elements one program normalises: rows × the row's power-of-two width. 8192 bf16 values per input
# keep a 1024-wide model at 8 rows a program (16 KB per input), enough bytes in flight per SM.
_ELEMENTS_PER_PROGRAM = 8192


def _kernels() -> Any:
    from embedder.models import _triton_kernels

    return _triton_kernels


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot find its compiler
        return False
    return True


def fused_add_layer_norm_available(device: torch.device) -> bool:
    """Whether ``add_layer_norm`` runs on ``device`` (CUDA with Triton, or Triton's interpreter)."""
    if not _triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _row_launch(n_rows: int, n_cols: int) -> tuple[tuple[int], dict[str, int]]:
    """Grid and meta-parameters of the row kernels: whole rows per program, ``ROWS`` of them, about
    ``_ELEMENTS_PER_PROGRAM`` elements each."""
    import triton

    block = triton.next_power_of_2(n_cols)
    rows = max(1, _ELEMENTS_PER_PROGRAM // block)
    return (triton.cdiv(n_rows, rows),), {"ROWS": rows, "BLOCK": block, "num_warps": 8 if block >= 1024 else 4}


def add_layer_norm(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(h + x, (hidden,), weight, bias, eps)`` in one fused pass.

    Args:
        h: ``[T, hidden]``, contiguous (the sublayer's output).
        x: ``[T, hidden]``, contiguous, same dtype (the residual).
        weight: ``[hidden]`` LayerNorm scale.
        bias: ``[hidden]`` LayerNorm shift.
        eps: LayerNorm epsilon.
    """
    n_rows, n_cols = h.shape
    out = torch.empty_like(h)
    grid, meta = _row_launch(n_rows, n_cols)
    _kernels().add_layer_norm_kernel[grid](
        h, x, weight, bias, out, out, out, n_rows, n_cols, eps,
        QUANT=False, **meta,
    )
    return out


def add_layer_norm_quantize(
    h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``add_layer_norm`` that also emits the result's FP8 copy, in the same single pass.

    Returns:
        ``(y, y_q, y_scale)``: ``y = LayerNorm(h + x)`` in ``h``'s dtype (the residual stream),
        ``y_q`` its float8_e4m3fn quantization per row and ``y_scale`` the float32 ``[T, 1]``
        scales — exactly ``embedder.models.fp8.quantize_rows(y)`` — ready for ``fp8_linear``.
    """
    n_rows, n_cols = h.shape
    out = torch.empty_like(h)
    q = torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=h.device)
    grid, meta = _row_launch(n_rows, n_cols)
    _kernels().add_layer_norm_kernel[grid](
        h, x, weight, bias, out, q, scale, n_rows, n_cols, eps,
        QUANT=True, **meta,
    )
    return out, q, scale


ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
"""What ``activation_quantize`` can apply before quantizing (``gelu``: erf form; ``gelu_tanh``: tanh form)."""


def activation_quantize(x: torch.Tensor, activation: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(act(x))`` in one pass: ``(q [T, N] float8_e4m3fn, scale [T, 1] float32)``.

    The activation (one of ``ACTIVATIONS``) is computed in fp32 and quantized from fp32: the
    activated tensor is never rounded to ``x``'s dtype, nor written.

    Args:
        x: ``[T, N]`` contiguous (bf16 on the FP8 path: an attention output, an FFN input projection).
        activation: ``none`` (plain quantization), ``gelu``, ``gelu_tanh`` or ``relu``.
    """
    n_rows, n_cols = x.shape
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    grid, meta = _row_launch(n_rows, n_cols)
    _kernels().activation_quantize_kernel[grid](
        x, q, scale, n_rows, n_cols,
        ACT=ACTIVATIONS[activation], **meta,
    )
    return q, scale


# --- the decoder's and ModernBERT's kernels (``packed_decoder``, ``packed_modernbert``): every ----
# elementwise pass between their GEMMs, around a float32 residual stream


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += h`` (in place, when ``h`` is given) and Hugging Face's RMSNorm of ``x``, in one pass.

    Args:
        x: ``[T, hidden]`` float32 contiguous, the residual stream (updated in place).
        h: ``[T, hidden]`` contiguous (the sublayer's output, the run's dtype), or None.
        weight: ``[hidden]`` in the run's dtype (the output's dtype).
        eps: RMSNorm epsilon.

    Returns:
        ``weight * (x * rsqrt(mean(x²) + eps)).to(weight.dtype)``, ``[T, hidden]`` in the weight's dtype.
    """
    return _add_norm(x, h, weight, None, eps, layer=False)


def add_layer_norm_f32(
    x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``x += h`` (in place, when ``h`` is given) and ``LayerNorm(x)`` (``bias`` None: none), in one pass.

    ``add_layer_norm`` with a float32 residual stream: the sum is kept in ``x`` in float32 and only
    the normalised output is rounded, once, to the weight's dtype (ModernBERT's pre-norm layers).
    Without ``h`` the pass only reads ``x``, which may then be in any float dtype (ModernBERT's
    ``residual_fp32`` off: the adds happened in the GEMMs).
    """
    return _add_norm(x, h, weight, bias, eps, layer=True)


def _add_norm(
    x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, layer: bool
) -> torch.Tensor:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=weight.dtype, device=x.device)
    grid, meta = _row_launch(n_rows, n_cols)
    _kernels().add_norm_kernel[grid](
        x, x if h is None else h, weight, weight if bias is None else bias, y, n_rows, n_cols, eps,
        ADD=h is not None, LAYER=layer, BIAS=bias is not None, **meta,
    )
    return y


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_scale: float,
    heads: int,
    kv_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    dtype: torch.dtype | None = None,
    in_place: bool = False,
    tokens: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV projection's output split into heads, q and k normalised (Qwen3's q/k norms,
    when given) and rotated (RoPE at ``positions``), in one pass.

    Args:
        qkv: ``[T, (heads + 2 kv_heads) * head_dim]`` contiguous.
        positions: ``[T]`` each token's position in its sequence.
        inv_freq: ``[head_dim / 2]`` float32, the model's rotary inverse frequencies.
        rope_scale: the rotary module's attention scaling (cos and sin are multiplied by it).
        dtype: the outputs' dtype (None: ``qkv``'s); a float32 ``qkv`` is then rounded once, here.
        in_place: rotate q and k where they lie in ``qkv`` and return views of it (v is not copied:
            a third less memory traffic); needs ``dtype`` to be ``qkv``'s.
        tokens: tokens per program (a power of two).

    Returns:
        ``(q [T, heads, d], k [T, kv_heads, d], v [T, kv_heads, d])`` in ``dtype``: contiguous
        tensors, or with ``in_place`` strided views of ``qkv`` (the last dimension contiguous, as
        varlen attention takes them).
    """
    import triton

    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (heads + 2 * kv_heads)
    dtype = qkv.dtype if dtype is None else dtype
    if in_place:
        if dtype != qkv.dtype:
            raise ValueError(f"in_place needs the output dtype to be qkv's ({qkv.dtype}), not {dtype}")
        split = qkv.view(num_tokens, heads + 2 * kv_heads, head_dim)
        q, k, v = split[:, :heads], split[:, heads:heads + kv_heads], split[:, heads + kv_heads:]
        out_q = out_k = out_v = qkv
    else:
        q = torch.empty((num_tokens, heads, head_dim), dtype=dtype, device=qkv.device)
        k = torch.empty((num_tokens, kv_heads, head_dim), dtype=dtype, device=qkv.device)
        v = torch.empty_like(k)
        out_q, out_k, out_v = q, k, v
    grid = (triton.cdiv(num_tokens, tokens), heads + (1 if in_place else 2) * kv_heads)
    norm = q_norm is not None
    _kernels().qk_norm_rope_kernel[grid](
        qkv, positions, inv_freq, q_norm if norm else qkv, k_norm if norm else qkv, out_q, out_k, out_v,
        num_tokens, eps, rope_scale,
        HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2, NORM=norm, TOKENS=tokens, IN_PLACE=in_place,
        num_warps=4,
    )
    return q, k, v


GLU_ACTIVATIONS = {"silu": 4, "swish": 4, "gelu": 1, "gelu_pytorch_tanh": 2}
"""Hugging Face ``hidden_act`` names ``glu`` applies to the gate (others: PyTorch ops)."""


def glu(gate_up: torch.Tensor, activation: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``act(gate) * up`` of a fused gate/up projection ``[T, 2I]`` (gate first): ``[T, I]`` in
    ``dtype`` (None: ``gate_up``'s), one pass."""
    n_rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((n_rows, inter), dtype=gate_up.dtype if dtype is None else dtype, device=gate_up.device)
    import triton

    block = 2048
    n = n_rows * inter
    grid = (triton.cdiv(n, block),)
    _kernels().glu_kernel[grid](gate_up, out, n, inter, BLOCK=block, ACT=GLU_ACTIVATIONS[activation], num_warps=8)
    return out


def linear_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    group_m: int = 8,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``glu(F.linear(x, weight, bias), activation)`` in one Triton GEMM, the GLU in its epilogue:
    the ``[T, 2I]`` projection is never written or read back, and the GLU takes the fp32
    accumulators (rounded once, where the two-pass form rounds the projection first).

    Args:
        x: ``[T, K]``, the last dimension contiguous.
        weight: ``[2I, K]`` contiguous, gate (activated) rows first; ``bias`` ``[2I]`` or None.
        block_m, block_n, block_k, group_m, num_warps, num_stages: the launch (``block_k`` must
            divide ``K``; otherwise the two-pass form runs).
    """
    import triton

    n_rows, k = x.shape
    inter = weight.shape[0] // 2
    if k % block_k or x.stride(1) != 1 or not weight.is_contiguous():
        return glu(F.linear(x, weight, bias), activation)
    out = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_rows, block_m) * triton.cdiv(inter, block_n),)
    _kernels().linear_glu_kernel[grid](
        x, weight, weight if bias is None else bias, out, n_rows, inter, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, ACT=GLU_ACTIVATIONS[activation],
        BIAS=bias is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact sliding-window attention over packed sequences: token ``i`` of a sequence attends the
    tokens ``j`` of the same sequence with ``|i - j| <= window`` (ModernBERT's local layers, where
    ``window`` is ``local_attention // 2``).

    Each program visits only the keys its queries can see (``block_m + 2 window`` of them), so a
    local layer costs O(T · window) and no key block is wasted on masking whole tiles.

    Args:
        q, k, v: ``[T, heads, head_dim]`` (strided views allowed; the last dimension contiguous),
            ``head_dim`` a power of two.
        cu_seqlens: ``[n + 1]`` int32 sequence offsets into the packed tokens.
        max_seqlen: the longest sequence.
        scale: softmax scale (None: ``head_dim ** -0.5``).
        block_m, block_n, num_warps, num_stages: the launch; the defaults are the fastest of
            ``bench_modernbert.py --profile``'s configurations on an H100 (ModernBERT-base, window 64).
        rope: ``rope_tables(...)`` of the batch: ``q`` and ``k`` are unrotated and the kernel
            applies RoPE (rotate-half, as ``qk_norm_rope``) as it loads them. None: already rotated.

    Returns:
        ``[T, heads, head_dim]`` contiguous, ``q``'s dtype.
    """
    import triton

    num_tokens, heads, head_dim = q.shape
    out = torch.empty((num_tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    scale = head_dim**-0.5 if scale is None else scale
    m_blocks = triton.cdiv(max_seqlen, block_m)
    grid = (m_blocks * (cu_seqlens.numel() - 1), heads)
    cos, sin = (q, q) if rope is None else rope
    _kernels().local_attention_kernel[grid](
        q, k, v, out, cu_seqlens, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * 1.4426950408889634, m_blocks,  # log2(e): the kernel's exponentials are exp2
        WINDOW=window, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, ROPE=rope is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's ``cos`` and ``sin`` at each packed token, ``[T, head_dim / 2]`` contiguous in ``dtype``
    (angles in float32, rounded once), for ``local_attention(rope=...)``."""
    freqs = positions.float().unsqueeze(1) * inv_freq.float()
    return freqs.cos().to(dtype), freqs.sin().to(dtype)
