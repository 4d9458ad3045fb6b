"""FP8 (e4m3) linear layers: the building block of ``model.dtype: float8``, for every packed family.

A linear layer ``y = x @ Wᵀ + b`` runs as one FP8 tensor-core GEMM (``torch._scaled_mm``) with
*rowwise* scaling on both sides:

* the weight ``W [N, K]`` is quantized once, at load, per output channel: row ``n`` is divided by
  ``amax(|W[n]|) / 448`` and cast to e4m3 (``Fp8Weight``);
* the activation ``x [M, K]`` is quantized on the fly per row (per token), the same way, by the
  kernel that produces it (``embedder.models.kernels``: the fused add+LayerNorm emits its FP8 copy
  and scales in the same pass; attention outputs and GELU outputs go through a one-pass
  activation+quantize kernel);
* the GEMM multiplies the e4m3 operands with fp32 accumulation and applies both scales and the bias
  (bf16) in its epilogue, writing bf16: ``y[m, n] = sa[m] * sb[n] * Σ_k qa[m, k] qb[n, k] + b[n]``.

448 is e4m3's largest finite value, so each row's largest element maps to it and nothing saturates
(values are clamped all the same: e4m3 has no infinity, an overflowing cast would be NaN). A row of
zeros gets the scale floor and quantizes to zeros.

``torch._scaled_mm`` rowwise layout, as PyTorch 2.4-2.11 check it (aten ScaledBlas.cpp): ``mat1``
``[M, K]`` row-major e4m3; ``mat2`` ``[K, N]`` column-major e4m3 — the transpose view of the
row-major ``[N, K]`` weight, ``w.t()``; ``scale_a`` float32 ``[M, 1]``; ``scale_b`` float32 ``[1, N]``
contiguous; ``K`` and ``N`` multiples of 16; ``bias`` bf16 ``[N]`` with ``out_dtype`` bf16. On
Hopper with cuBLAS >= 12.9 it is a cuBLASLt call, elsewhere (Ada) a CUTLASS kernel.

Everything here also has a CPU reference (``quantize_rows``, ``fp8_linear_reference``) that is the
same math in fp32: the tests check the kernels and the whole forward against it.

Test hooks (environment, like ``embedder.failpoints``): ``EMBEDDER_TEST_FP8_EMULATE=1`` lets
``model.dtype: float8`` run anywhere with the GEMMs emulated in fp32 (the CPU tests of the fidelity
gate through the real runner); ``EMBEDDER_TEST_FP8_SCALE=x`` multiplies the fused QKV weight scales
of every layer by ``x`` at load — a deliberately broken quantization the fidelity gate must stop.

Example:
    >>> w = Fp8Weight.from_dense(layer.weight, layer.bias, torch.device("cuda"))
    >>> xq, xs = quantize_rows(x)          # or from a fused producer kernel
    >>> y = fp8_linear(xq, xs, w)          # [M, N] bf16
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
AMAX_FLOOR = 1e-12
"""Row maxima are floored at this, so an all-zero row has a finite scale (and quantizes to zeros)."""
FP8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
FP8_REQUIREMENT = (
    "model.dtype float8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
    "Blackwell)"
)


def emulated() -> bool:
    """Whether the ``EMBEDDER_TEST_FP8_EMULATE`` test hook is on (FP8 math emulated, any device)."""
    return os.environ.get("EMBEDDER_TEST_FP8_EMULATE") == "1"


def tamper_scales(packed: Any) -> None:
    """Applies the ``EMBEDDER_TEST_FP8_SCALE`` test hook to a packed FP8 encoder (nothing when unset)."""
    factor = os.environ.get("EMBEDDER_TEST_FP8_SCALE")
    if not factor:
        return
    for layer in packed.layers:
        layer[0].scale.mul_(float(factor))


def fp8_problem(device: torch.device) -> str | None:
    """Why FP8 GEMMs cannot run on ``device`` (one line naming the requirement), or None when they can."""
    if emulated() and hasattr(torch, "float8_e4m3fn"):
        return None
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"{FP8_REQUIREMENT} and torch >= 2.4 (this torch {torch.__version__} has no torch._scaled_mm)"
    if device.type != "cuda":
        return f"{FP8_REQUIREMENT}; this run is on {device.type}: use model.dtype bfloat16 (or auto) here"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{FP8_REQUIREMENT}; {name} is compute capability {major}.{minor}: use model.dtype bfloat16"
    return None


def shape_problem(name: str, out_features: int, in_features: int) -> str | None:
    """Why a ``[out, in]`` weight cannot be an FP8 GEMM operand (``_scaled_mm`` wants multiples of 16)."""
    if out_features % 16 or in_features % 16:
        return (
            f"model.dtype float8 needs layer sizes divisible by 16; {name} is {out_features}x{in_features}: "
            "use model.dtype bfloat16 for this model"
        )
    return None


def quantize_rows(x: torch.Tensor, amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise e4m3 quantization, the reference the kernels match: ``(q [M, K] e4m3, scale [M, 1] fp32)``.

    ``scale = max(amax(|x[m]|), floor) / 448`` and ``q = clamp(x[m] * (448 / max(amax, floor)), ±448)``
    rounded to nearest e4m3, so that ``q * scale ≈ x``. Computed in fp32 from ``x`` as given (the
    kernels quantize the bf16 values they write, so this on the same bf16 tensor is bit-exact).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(amax_floor)
    limit = torch.full_like(amax, E4M3_MAX)
    # Tensor by tensor: IEEE-rounded divisions (``448.0 / t`` is a reciprocal times 448 on CPU).
    q = (xf * (limit / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (amax / limit).contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (``scale`` ``[M, 1]``, or ``[1, N]`` for a transposed operand)."""
    return q.float() * scale


@dataclass(slots=True)
class Fp8Weight:
    """A linear layer's weight in e4m3 with one scale per output channel, and its bias.

    Attributes:
        data: ``[N, K]`` float8_e4m3fn, row-major (``data.t()`` is the column-major ``mat2``).
        scale: ``[1, N]`` float32, contiguous (``_scaled_mm``'s ``scale_b``).
        bias: ``[N]`` in the output dtype (bf16), or None.
    """

    data: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        device: torch.device,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Fp8Weight:
        """Quantizes a dense ``[N, K]`` weight per output row (in fp32, from the weight as loaded)."""
        q, scale = quantize_rows(weight.detach().to(device=device, dtype=torch.float32))
        b = None if bias is None else bias.detach().to(device=device, dtype=out_dtype).contiguous()
        return cls(data=q.contiguous(), scale=scale.reshape(1, -1).contiguous(), bias=b)

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.data.shape[1])

    def dequantized(self) -> torch.Tensor:
        """``[N, K]`` fp32: what the GEMM multiplies by."""
        return self.data.float() * self.scale.reshape(-1, 1)


def fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: Fp8Weight,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``x @ Wᵀ + b`` on FP8 tensor cores: ``[M, N]`` in ``out_dtype`` (CUDA, capability >= 8.9).

    Args:
        x_q: ``[M, K]`` float8_e4m3fn, row-major contiguous.
        x_scale: ``[M, 1]`` float32 (per-row scales).
        weight: The quantized layer.
        out_dtype: bf16 (the bias's dtype).
        fast_accum: Hopper's fast FP8 accumulation (fewer promotions of the accumulator to fp32):
            faster, less exact; off by default.
    """
    return torch._scaled_mm(
        x_q,
        weight.data.t(),
        scale_a=x_scale,
        scale_b=weight.scale,
        bias=weight.bias,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


def fp8_linear_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: Fp8Weight,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``fp8_linear`` emulated on any device: the same e4m3 operands and scales, fp32 matmul, bias
    added in fp32, rounded once to ``out_dtype``."""
    del fast_accum
    y = dequantize_rows(x_q, x_scale) @ weight.dequantized().t()
    if weight.bias is not None:
        y = y + weight.bias.float()
    return y.to(out_dtype)
