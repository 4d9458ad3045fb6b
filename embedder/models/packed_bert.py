"""Padding-free forward of BERT-layout encoders (BERT, RoBERTa, XLM-RoBERTa and their siblings).

Input is a whole packed batch — flat ``input_ids`` and ``position_ids`` of ``T`` tokens and
``cu_seqlens`` — with no attention mask and no pad tokens, so no FLOP is spent on padding. The
weights are taken once from the loaded Hugging Face model: q/k/v fused into one matrix, the type-0
token-type row folded into a single vector, everything cast to the run's dtype. Each layer is
``QKV → attention → out proj + residual + LayerNorm → FFN (the config's activation) + residual +
LayerNorm``, exactly the Hugging Face math.

Attention is exact per sequence on every device (``attention=``, the job's ``model.attention``):

* ``varlen`` — CUDA fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
  PyTorch) on the packed tokens.
* ``padded`` — anywhere (CPU, fp32, older torch): the packed q/k/v are scattered into a ``[n, L]``
  grid, run through ``scaled_dot_product_attention`` with a key mask and gathered back — the same
  packed code path around it, so CPU tests exercise packing, positions and pooling.
* ``flash4`` — opt-in, CUDA fp16/bf16 on Hopper or Blackwell with the optional ``flash-attn-4``
  package (FlashAttention-4, CuTe DSL kernels compiled on first use): its varlen forward. On an H200
  with BERT-size heads (64) and sequences of at most 512 tokens it measured ~20% *slower* than
  ``varlen`` (benchmarks/RESULTS.md), so ``auto`` does not pick it.

``auto`` takes ``varlen`` where it can run, else ``padded``.

On CUDA in fp16/bf16 the elementwise passes around the matmuls are fused:

* GELU runs in the FFN input matmul's epilogue (cuBLASLt), in its tanh form. For erf-GELU models
  (BERT's ``gelu``: BGE, E5, MiniLM) that form differs from erf by at most 4.7e-4, under half the
  rounding step of bf16/fp16 at the values where it matters, and it removes a whole read and write of
  the widest activation (~10% of BGE-large's time). ``approximate_gelu=False`` keeps erf as a
  separate pass. Elsewhere (CPU, fp32) GELU is always the model's own function.
* The residual add and LayerNorm closing each half-layer run as one Triton kernel
  (``embedder.models.kernels.add_layer_norm``) when Triton is importable; PyTorch's two ops otherwise.

With ``fp8`` (``model.dtype: float8``; ``embedder.models.fp8``) the four GEMMs of every layer (fused
QKV, attention output, FFN in, FFN out) run on FP8 tensor cores: weights e4m3 with per-output-channel
scales (quantized once here), activations quantized per token where they are produced. Embeddings,
LayerNorm, attention (softmax included), residuals, pooling and normalization stay bf16. What is fused:

* LayerNorm → QKV and LayerNorm → FFN in: the fused add+LayerNorm kernel writes the bf16 residual
  and its e4m3 copy with per-row scales in one pass (``kernels.add_layer_norm_quantize``).
* FFN in → GELU → FFN out: the GEMM writes bf16 (``_scaled_mm`` has no activation epilogue), then one
  kernel applies GELU in fp32 — the model's own erf form, at no extra cost here — and quantizes
  (``kernels.activation_quantize``): the activated tensor is never written.
* Biases: in each GEMM's epilogue.
* Not fused: the attention output is quantized by its own pass (``activation_quantize`` with no
  activation; torch's varlen attention has no quantizing epilogue), and the embeddings' output once
  per batch.

Without Triton the same math runs with PyTorch ops (unfused); ``fp8="emulate"`` runs it on any device
with the GEMM emulated in fp32 (``fp8_linear_reference``) — the CPU tests' reference path.

With ``compile=True`` the per-layer math after attention (out proj, residual, LayerNorm, FFN) and
the embeddings are compiled with dynamic shapes. Measured on an H200 (benchmarks/RESULTS.md) that
was ~7% slower than eager for a BGE-large shape, so it is opt-in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


def packed_support(auto_model: Any) -> str | None:
    """Why ``auto_model`` cannot run packed, or None when it can.

    Accepted: the model types above whose modules have the BERT layout (embeddings with word,
    position, token-type embeddings and LayerNorm; layers with self-attention q/k/v, attention
    output, intermediate and output), absolute positions and no embedding projection.
    """
    config = getattr(auto_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return f"model type {model_type!r} has no packed implementation"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {config.position_embedding_type!r} is not absolute"
    if getattr(config, "is_decoder", False):
        return "decoder configuration"
    emb = getattr(auto_model, "embeddings", None)
    encoder = getattr(auto_model, "encoder", None)
    needed = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
    if emb is None or encoder is None or not all(hasattr(emb, a) for a in needed):
        return "embeddings do not have the BERT layout"
    if emb.word_embeddings.embedding_dim != config.hidden_size:
        return "embedding size differs from hidden size"
    try:
        for layer in encoder.layer:
            attn = layer.attention
            _ = (attn.self.query, attn.self.key, attn.self.value, attn.output.dense, attn.output.LayerNorm)
            _ = (layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm)
            if getattr(layer, "add_cross_attention", False):
                return "layers with cross-attention"
    except AttributeError:
        return "layers do not have the BERT layout"
    return None


def position_offset(auto_model: Any) -> int:
    """First position id of a sequence: ``padding_idx + 1`` for RoBERTa-style embeddings, else 0."""
    padding_idx = getattr(getattr(auto_model, "embeddings", None), "padding_idx", None)
    return int(padding_idx) + 1 if padding_idx is not None else 0


ATTENTION_BACKENDS = ("varlen", "padded", "flash4")  # auto: varlen, else padded (flash4 is opt-in)
FLASH4_INSTALL = "pip install 'embedder[flash4]' (the flash-attn-4 package)"


def varlen_attention_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_problem(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why attention ``backend`` cannot run for this device, dtype and head size; None when it can."""
    if backend == "padded":
        return None
    if backend not in ATTENTION_BACKENDS:
        return f"unknown attention {backend!r}; use one of auto, {', '.join(ATTENTION_BACKENDS)}"
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return f"{backend} attention needs CUDA in float16/bfloat16 (here: {device.type}, {str(dtype).removeprefix('torch.')})"
    if backend == "varlen":
        return None if varlen_attention_available() else "torch.nn.attention.varlen needs torch >= 2.10"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10, 11):
        return f"flash4 attention runs on Hopper (9.x) and Blackwell (10.x/11.x) GPUs; this one is {major}.x"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"flash4 attention needs a head size in 8..256 divisible by 8, not {head_dim}"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as err:  # ImportError, or the CuTe DSL failing to find its CUDA libraries
        return f"flash-attn-4 is not usable ({type(err).__name__}: {str(err)[:200]}); {FLASH4_INSTALL}"
    return None


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The attention backend to run: ``requested``, or for ``auto`` ``varlen`` where it can run, else
    ``padded`` (``flash4`` measured slower than ``varlen`` on an H200, so only on request).

    Raises:
        ValueError: an explicitly requested backend cannot run here (the message says why).
    """
    if requested != "auto":
        problem = attention_problem(requested, device, dtype, head_dim)
        if problem:
            raise ValueError(f"model.attention={requested}: {problem}")
        return requested
    return "varlen" if attention_problem("varlen", device, dtype, head_dim) is None else "padded"


@dataclass(slots=True)
class PackedAttention:
    """Per-batch attention metadata, built once and shared by every layer.

    Attributes:
        cu_seqlens: int32 ``[n + 1]`` on the device.
        max_seqlen: Longest sequence (a host int: no device sync to read it).
        num_sequences: ``n``.
        pad_index: For the padded backend: each token's slot in the ``[n * max_seqlen]`` grid.
        key_mask: For the padded backend: bool ``[n, 1, 1, max_seqlen]``, True on real tokens.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_sequences: int
    pad_index: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None


def build_attention(
    cu_seqlens: torch.Tensor, segments: torch.Tensor, max_seqlen: int, num_tokens: int, varlen: bool
) -> PackedAttention:
    """Attention metadata for one packed batch (``segments``: sequence index of each token)."""
    n = cu_seqlens.numel() - 1
    meta = PackedAttention(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, num_sequences=n)
    if not varlen:
        cu = cu_seqlens.long()
        position = torch.arange(num_tokens, device=cu.device) - cu[:-1][segments]
        meta.pad_index = segments * max_seqlen + position
        lengths = cu[1:] - cu[:-1]
        grid = torch.arange(max_seqlen, device=cu.device)
        meta.key_mask = (grid.unsqueeze(0) < lengths.unsqueeze(1)).view(n, 1, 1, max_seqlen)
    return meta


def _attend_varlen(qkv: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = qkv.unbind(1)  # each [T, heads, head_dim], last dim contiguous
    cu = meta.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen)


def _attend_flash4(qkv: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
    from flash_attn.cute.interface import flash_attn_varlen_func

    q, k, v = qkv.unbind(1)  # strided views of the fused projection: no copies
    cu = meta.cu_seqlens
    out, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=meta.max_seqlen, max_seqlen_k=meta.max_seqlen
    )
    return out


def _attend_padded(qkv: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
    n, length = meta.num_sequences, meta.max_seqlen
    _, three, heads, head_dim = qkv.shape
    grid = qkv.new_zeros(n * length, three, heads, head_dim)
    grid.index_copy_(0, meta.pad_index, qkv)
    grid = grid.view(n, length, three, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, n, heads, L, d]
    out = F.scaled_dot_product_attention(grid[0], grid[1], grid[2], attn_mask=meta.key_mask)
    return out.transpose(1, 2).reshape(n * length, heads, head_dim)[meta.pad_index]


def _embed(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    x = F.embedding(input_ids, word) + token_type
    x = x + F.embedding(position_ids, position)
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)


def _ffn_in_tanh_gelu_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ Wᵀ + b)`` in one cuBLASLt call (bias and GELU in the matmul's epilogue)."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


class _LinearThenActivation:
    """``act(x @ Wᵀ + b)``: the FFN input projection with the config's activation as a separate op."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.act = act

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, weight, bias))


def _add_layer_norm_torch(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(h + x, (x.shape[-1],), weight, bias, eps)


def _layer_after_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    out_w: torch.Tensor,
    out_b: torch.Tensor,
    ln1_w: torch.Tensor,
    ln1_b: torch.Tensor,
    ffn_in_w: torch.Tensor,
    ffn_in_b: torch.Tensor,
    ffn_out_w: torch.Tensor,
    ffn_out_b: torch.Tensor,
    ln2_w: torch.Tensor,
    ln2_b: torch.Tensor,
    eps: float,
    ffn_in: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    add_norm: Callable[..., torch.Tensor] = _add_layer_norm_torch,
) -> torch.Tensor:
    h = F.linear(attn, out_w, out_b)
    x = add_norm(h, x, ln1_w, ln1_b, eps)
    h = F.linear(ffn_in(x, ffn_in_w, ffn_in_b), ffn_out_w, ffn_out_b)
    return add_norm(h, x, ln2_w, ln2_b, eps)


TANH_GELU_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
FP8_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", **{name: "gelu_tanh" for name in TANH_GELU_ACTS}}
"""Hugging Face activations the FP8 path applies inside its quantize kernel (others: PyTorch, then quantize)."""


def _reference_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {
        "none": lambda t: t,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
    }[name]


class Fp8Ops:
    """The quantize and GEMM steps of the FP8 forward, on the kernels the device has.

    ``fused`` (Triton): ``kernels.add_layer_norm_quantize`` and ``kernels.activation_quantize``;
    else the same math in PyTorch (``fp8.quantize_rows`` after the op). ``emulate``: the GEMM is
    ``fp8_linear_reference`` (fp32 matmul of the e4m3 operands, any device) instead of
    ``torch._scaled_mm``. Every variant computes the same values up to fp32 summation order.
    """

    def __init__(self, fused: bool, emulate: bool, fast_accum: bool = False) -> None:
        from embedder.models import fp8

        self.fused = fused
        self.emulate = emulate
        self.fast_accum = fast_accum
        self._linear = fp8.fp8_linear_reference if emulate else fp8.fp8_linear

    def linear(self, x_q: torch.Tensor, x_scale: torch.Tensor, weight: Any) -> torch.Tensor:
        return self._linear(x_q, x_scale, weight, fast_accum=self.fast_accum)

    def quantize(self, x: torch.Tensor, activation: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """``act(x)`` quantized per row (``activation``: ``none``, ``gelu``, ``gelu_tanh``, ``relu``)."""
        if self.fused:
            from embedder.models.kernels import activation_quantize

            return activation_quantize(x.contiguous(), activation)
        from embedder.models.fp8 import quantize_rows

        return quantize_rows(_reference_activation(activation)(x.float()))

    def add_norm(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        if self.fused:
            from embedder.models.kernels import add_layer_norm

            return add_layer_norm(h, x, w, b, eps)
        return F.layer_norm(h.float() + x.float(), (x.shape[-1],), w.float(), b.float(), eps).to(x.dtype)

    def add_norm_quantize(
        self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, y_q, y_scale)``: ``y = LayerNorm(h + x)`` and its FP8 copy (one pass when fused)."""
        if self.fused:
            from embedder.models.kernels import add_layer_norm_quantize

            return add_layer_norm_quantize(h, x, w, b, eps)
        from embedder.models.fp8 import quantize_rows

        y = self.add_norm(h, x, w, b, eps)
        return (y, *quantize_rows(y))


class PackedBertEncoder:
    """The padding-free encoder stack of a BERT-layout model, weights in the run's dtype.

    Example:
        >>> packed = PackedBertEncoder.from_hf(st_model[0].auto_model, torch.device("cuda"), torch.bfloat16)
        >>> meta = build_attention(cu_seqlens, segments, max_seqlen, num_tokens, packed.varlen)
        >>> hidden = packed(input_ids, position_ids, meta)  # [num_tokens, hidden_size]
    """

    def __init__(
        self,
        embeddings: tuple[torch.Tensor, ...],
        layers: list[tuple[torch.Tensor, ...]],
        num_heads: int,
        eps: float,
        ffn_in: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        attention: str,
        compile: bool = False,
        fused_add_norm: bool = False,
        fp8: Fp8Ops | None = None,
        fp8_activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu",
    ) -> None:
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, not {attention!r}")
        self.embeddings = embeddings
        self.layers = layers
        self.num_heads = num_heads
        self.eps = eps
        self.ffn_in = ffn_in
        self.attention_backend = attention
        self._attend = {"flash4": _attend_flash4, "varlen": _attend_varlen, "padded": _attend_padded}[attention]
        self.add_norm: Callable[..., torch.Tensor] = _add_layer_norm_torch
        if fused_add_norm and not compile:  # compiled graphs fuse the add themselves
            from embedder.models.kernels import add_layer_norm

            self.add_norm = add_layer_norm
        self.fp8 = fp8
        self.fp8_activation = fp8_activation
        self._embed: Callable[..., torch.Tensor] = _embed
        self._after_attention: Callable[..., torch.Tensor] = _layer_after_attention
        self.compiled = bool(compile and fp8 is None)
        if self.compiled:
            self._embed = torch.compile(_embed, dynamic=True, fullgraph=True)
            self._after_attention = torch.compile(_layer_after_attention, dynamic=True, fullgraph=True)

    @classmethod
    def from_hf(
        cls,
        auto_model: Any,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
        approximate_gelu: bool | None = None,
        fused_add_norm: bool | None = None,
        attention: str = "auto",
        fp8: bool | str = False,
    ) -> PackedBertEncoder:
        """Takes the weights of a loaded BERT-layout model (see ``packed_support``).

        On CUDA in fp16/bf16, GELU is fused into the FFN matmul (cuBLASLt epilogue, tanh form): for
        tanh-GELU models (``gelu_new``, ``gelu_pytorch_tanh``) that is their own function; for
        erf-GELU models (``gelu``) it is the default too (``approximate_gelu=None``), since the two
        differ by at most 4.7e-4, below the dtype's rounding; ``approximate_gelu=False`` keeps erf
        exact (a separate pass). ``fused_add_norm`` (None: on where the Triton kernel can run on
        ``device``) fuses each residual add with its LayerNorm. ``attention``: ``auto`` or one of
        ``ATTENTION_BACKENDS`` (see the module docstring).

        ``fp8``: True runs the four GEMMs of each layer in FP8 (``dtype`` must be bf16: the dtype of
        everything else; needs a GPU with FP8 tensor cores, see ``fp8.fp8_problem``); ``"emulate"``
        runs the same quantized math on any device with the GEMMs emulated in fp32 (tests). GELU is
        then the model's own function (erf for ``gelu``), applied in the quantize kernel.

        Raises:
            ValueError: an explicitly requested attention backend cannot run here, or (FP8) a layer
                size that is not a multiple of 16.
        """
        from transformers.activations import ACT2FN

        from embedder.models.kernels import fused_add_layer_norm_available

        config = auto_model.config

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        emb = auto_model.embeddings
        embeddings = (
            take(emb.word_embeddings.weight),
            take(emb.position_embeddings.weight),
            take(emb.token_type_embeddings.weight[0]),
            take(emb.LayerNorm.weight),
            take(emb.LayerNorm.bias),
        )
        if fp8:
            return cls._from_hf_fp8(auto_model, embeddings, device, dtype, attention, fused_add_norm, fp8 == "emulate")
        layers = []
        for layer in auto_model.encoder.layer:
            s = layer.attention.self
            out = layer.attention.output
            layers.append(
                (
                    take(torch.cat([s.query.weight, s.key.weight, s.value.weight], dim=0)),
                    take(torch.cat([s.query.bias, s.key.bias, s.value.bias], dim=0)),
                    take(out.dense.weight),
                    take(out.dense.bias),
                    take(out.LayerNorm.weight),
                    take(out.LayerNorm.bias),
                    take(layer.intermediate.dense.weight),
                    take(layer.intermediate.dense.bias),
                    take(layer.output.dense.weight),
                    take(layer.output.dense.bias),
                    take(layer.output.LayerNorm.weight),
                    take(layer.output.LayerNorm.bias),
                )
            )
        act = config.hidden_act
        half_on_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        erf_as_tanh = approximate_gelu is not False and act == "gelu"
        fuse = half_on_cuda and (act in TANH_GELU_ACTS or erf_as_tanh)
        ffn_in = _ffn_in_tanh_gelu_fused if fuse else _LinearThenActivation(ACT2FN[act] if isinstance(act, str) else act)
        return cls(
            embeddings=embeddings,
            layers=layers,
            num_heads=int(config.num_attention_heads),
            eps=float(config.layer_norm_eps),
            ffn_in=ffn_in,
            attention=choose_attention(
                attention, device, dtype, int(config.hidden_size) // int(config.num_attention_heads)
            ),
            compile=compile,
            fused_add_norm=fused_add_layer_norm_available(device) if fused_add_norm is None else fused_add_norm,
        )

    @classmethod
    def _from_hf_fp8(
        cls,
        auto_model: Any,
        embeddings: tuple[torch.Tensor, ...],
        device: torch.device,
        dtype: torch.dtype,
        attention: str,
        fused_add_norm: bool | None,
        emulate: bool,
    ) -> PackedBertEncoder:
        from transformers.activations import ACT2FN

        from embedder.models.fp8 import Fp8Weight, shape_problem
        from embedder.models.kernels import fused_add_layer_norm_available

        config = auto_model.config

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def quantized(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp8Weight:
            problem = shape_problem(name, int(weight.shape[0]), int(weight.shape[1]))
            if problem:
                raise ValueError(problem)
            return Fp8Weight.from_dense(weight, bias, device, out_dtype=dtype)

        layers = []
        for layer in auto_model.encoder.layer:
            s = layer.attention.self
            out = layer.attention.output
            qkv_weight = torch.cat([s.query.weight, s.key.weight, s.value.weight], dim=0)
            qkv_bias = torch.cat([s.query.bias, s.key.bias, s.value.bias], dim=0)
            layers.append(
                (
                    quantized("the fused QKV projection", qkv_weight, qkv_bias),
                    quantized("the attention output projection", out.dense.weight, out.dense.bias),
                    take(out.LayerNorm.weight),
                    take(out.LayerNorm.bias),
                    quantized("the FFN input projection", layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                    quantized("the FFN output projection", layer.output.dense.weight, layer.output.dense.bias),
                    take(layer.output.LayerNorm.weight),
                    take(layer.output.LayerNorm.bias),
                )
            )
        act = config.hidden_act
        fused = fused_add_layer_norm_available(device) if fused_add_norm is None else fused_add_norm
        activation = FP8_ACTIVATIONS.get(act) if isinstance(act, str) else None
        return cls(
            embeddings=embeddings,
            layers=layers,
            num_heads=int(config.num_attention_heads),
            eps=float(config.layer_norm_eps),
            ffn_in=_LinearThenActivation(ACT2FN[act] if isinstance(act, str) else act),
            attention=choose_attention(
                attention, device, dtype, int(config.hidden_size) // int(config.num_attention_heads)
            ),
            fp8=Fp8Ops(fused=fused, emulate=emulate),
            fp8_activation=activation or (ACT2FN[act] if isinstance(act, str) else act),
        )

    @property
    def varlen(self) -> bool:
        """Whether attention runs on the packed tokens directly (no padded grid metadata needed)."""
        return self.attention_backend != "padded"

    @property
    def gelu_fused(self) -> bool:
        return self.ffn_in is _ffn_in_tanh_gelu_fused

    @property
    def add_norm_fused(self) -> bool:
        if self.fp8 is not None:
            return self.fp8.fused
        return self.add_norm is not _add_layer_norm_torch

    @property
    def elementwise(self) -> str:
        """Which passes around the GEMMs are fused, for the load log line ("" when none)."""
        notes = [
            "fused tanh-GELU" if self.gelu_fused else "",
            "fused add+LayerNorm" if self.add_norm_fused else "",
            "torch.compile" if self.compiled else "",
        ]
        return ", ".join(n for n in notes if n)

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings[0].shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        if not self.layers:
            return 0
        return self.layers[0][4].out_features if self.fp8 is not None else int(self.layers[0][6].shape[0])

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
        """Token states ``[T, hidden]`` of a packed batch (ids on the device, int32 or int64)."""
        if self.fp8 is not None:
            return self._forward_fp8(input_ids, position_ids, meta)
        x = self._embed(input_ids, position_ids, *self.embeddings, self.eps)
        num_tokens, hidden = x.shape
        head_dim = hidden // self.num_heads
        attend = self._attend
        for qkv_w, qkv_b, *rest in self.layers:
            qkv = F.linear(x, qkv_w, qkv_b).view(num_tokens, 3, self.num_heads, head_dim)
            attn = attend(qkv, meta).reshape(num_tokens, hidden)
            x = self._after_attention(x, attn, *rest, self.eps, self.ffn_in, self.add_norm)
        return x

    def _forward_fp8(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
        """The FP8 forward (see the module docstring): bf16 residual stream, e4m3 GEMM inputs."""
        ops = self.fp8
        assert ops is not None
        x = self._embed(input_ids, position_ids, *self.embeddings, self.eps)
        num_tokens, hidden = x.shape
        head_dim = hidden // self.num_heads
        x_q, x_scale = ops.quantize(x)
        act = self.fp8_activation
        last = len(self.layers) - 1
        for i, (qkv_w, out_w, ln1_w, ln1_b, in_w, ffn_out_w, ln2_w, ln2_b) in enumerate(self.layers):
            qkv = ops.linear(x_q, x_scale, qkv_w).view(num_tokens, 3, self.num_heads, head_dim)
            attn = self._attend(qkv, meta).reshape(num_tokens, hidden)
            h = ops.linear(*ops.quantize(attn), out_w)
            x, x_q, x_scale = ops.add_norm_quantize(h, x, ln1_w, ln1_b, self.eps)
            f = ops.linear(x_q, x_scale, in_w)
            f_q, f_scale = ops.quantize(f, act) if isinstance(act, str) else ops.quantize(act(f))
            h = ops.linear(f_q, f_scale, ffn_out_w)
            if i == last:  # the last LayerNorm feeds pooling, not a GEMM: no FP8 copy
                x = ops.add_norm(h, x, ln2_w, ln2_b, self.eps)
            else:
                x, x_q, x_scale = ops.add_norm_quantize(h, x, ln2_w, ln2_b, self.eps)
        return x
