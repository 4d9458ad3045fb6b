"""Padding-free forward of ModernBERT encoders (gte-modernbert-base, modernbert-embed, ModernBERT-*).

Like ``packed_bert``, the input is a whole packed batch — flat ``input_ids`` and ``position_ids`` of
``T`` tokens and ``cu_seqlens`` — with no pad tokens, and the weights are taken once from the loaded
Hugging Face ``ModernBertModel``. The math is transformers' own, layer for layer:

* embeddings: ``LayerNorm(tok_embeddings[ids])`` (no position table: positions enter through RoPE);
* each layer (pre-norm): ``x += Wo(attention(RoPE(Wqkv(attn_norm(x)))))`` then
  ``x += Wo(act(a) * g)`` with ``a, g = Wi(mlp_norm(x)).chunk(2)`` (GeGLU); ``attn_norm`` is the
  identity in layer 0; LayerNorms and linears carry a bias only where the config asks for one;
* ``final_norm`` at the end.

RoPE rotates q and k with each token's position *within its sequence* (the packer restarts
``position_ids`` at 0 per sequence) and the layer type's theta: ``global_rope_theta`` (160k in
ModernBERT-base) on global layers, ``local_rope_theta`` (10k) on local ones. cos/sin are computed
once per batch and layer type, in float32.

Attention is exact. Every ``global_attn_every_n_layers``-th layer (0, 3, 6, ...) attends over the
whole sequence; the others over a sliding window, a token seeing the keys at distance at most
``local_attention // 2`` (±64 for ModernBERT-base), never across a sequence boundary. Backends
(``attention``, as the job's ``model.attention``):

* ``varlen`` — CUDA fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 in
  PyTorch) on the packed tokens; local layers pass ``window_size=(w/2, w/2)``, the kernel skipping
  the key blocks outside the window, so local layers cost O(T·w) rather than O(Σ L²). The window
  argument appeared after torch 2.10; where ``varlen_attn`` lacks it, local layers run in
  ``flex_attention`` with a document + window block mask (compiled, also exact and block-sparse),
  global layers staying on ``varlen_attn`` (the backend then reads ``varlen+flex``). With the
  fused forward (below), local layers run in ``kernels.local_attention`` instead, a Triton kernel
  whose programs visit only the keys their 64 queries can see (``varlen+triton-window``): measured
  on an H100 at 5.6 ms a batch of 131k tokens over 14 local layers, against 15.7 ms for
  ``varlen_attn``'s window (whose 128-key tiles all need masking).
* ``flex`` — ``torch.nn.attention.flex_attention`` for every layer (any device; on CPU in eager
  mode only for tests, it materialises the scores).
* ``padded`` — anywhere (CPU, fp32): q/k/v scattered into a ``[n, L]`` grid, SDPA with the key mask
  (global layers) or key mask ∧ ``|i - j| ≤ w/2`` (local layers), gathered back.

``auto`` is ``varlen`` on CUDA in fp16/bf16 where torch has it, else ``padded``. A layer whose
window covers the longest sequence of the batch (``max_seqlen - 1 ≤ w/2``) runs as a global one:
same result, no mask.

On CUDA in fp16/bf16 with Triton (``fused=None``, the default, means "there"), each elementwise
pass between the GEMMs is one Triton kernel of ``embedder.models.kernels``, as in the decoder
forward: the residual stream is float32, a layer's closing residual add fuses with the next
LayerNorm (``add_layer_norm_f32``), RoPE rotates q and k in place inside ``Wqkv``'s output,
attention reading strided views of it (``qk_norm_rope``, cos/sin from the positions in the
kernel; v is never copied) and GeGLU is one pass (``glu``). On the local layers that run the
window kernel there is no RoPE pass at all: the kernel rotates q and k as it loads them, from
cos/sin tables computed once per batch (``local_attention(rope=...)``). ``residual_fp32 = False``
(a benchmark variant, not a job option) keeps the residual stream in the run's dtype instead, as
transformers does: ``Wo`` and the MLP's second GEMM add into it in cuBLAS's epilogue
(``x.addmm_``) and the norm passes only read it.
Where that cannot run (no Triton, a head size that is not a power of two, an activation ``glu``
lacks) or with ``fused=False``, the same math is compiled with ``torch.compile`` into a few fused
kernels per layer (``compile=None``: on CUDA in fp16/bf16; ``False`` keeps eager PyTorch ops).
Elsewhere it runs eagerly.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODERNBERT_MODEL_TYPES = ("modernbert",)
MODERNBERT_ATTENTION = ("varlen", "flex", "padded")
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def is_modernbert(auto_model: Any) -> bool:
    """Whether ``auto_model`` is a ModernBERT (``model_type: modernbert``)."""
    return getattr(getattr(auto_model, "config", None), "model_type", None) in MODERNBERT_MODEL_TYPES


def modernbert_support(auto_model: Any) -> str | None:
    """Why this ModernBERT cannot run packed, or None when it can.

    Accepted: ``ModernBertModel`` modules (embeddings with ``tok_embeddings`` and ``norm``; layers
    with ``attn_norm``, ``attn.Wqkv``, ``attn.Wo``, ``mlp_norm``, ``mlp.Wi``, ``mlp.Wo``;
    ``final_norm``), default (unscaled) RoPE and an activation of ``_ACTIVATIONS``.
    """
    if not is_modernbert(auto_model):
        return f"model type {getattr(getattr(auto_model, 'config', None), 'model_type', None)!r} is not modernbert"
    config = auto_model.config
    emb = getattr(auto_model, "embeddings", None)
    layers = getattr(auto_model, "layers", None)
    if emb is None or layers is None or not hasattr(auto_model, "final_norm"):
        return "modules do not have the ModernBertModel layout"
    if not (hasattr(emb, "tok_embeddings") and hasattr(emb, "norm")):
        return "embeddings do not have the ModernBERT layout"
    if emb.tok_embeddings.embedding_dim != config.hidden_size:
        return "embedding size differs from hidden size"
    if not len(layers):
        return "a model without layers"
    try:
        for layer in layers:
            _ = (layer.attn_norm, layer.attn.Wqkv, layer.attn.Wo, layer.mlp_norm, layer.mlp.Wi, layer.mlp.Wo)
    except AttributeError:
        return "layers do not have the ModernBERT layout"
    if config.hidden_activation not in _ACTIVATIONS:
        return f"hidden_activation {config.hidden_activation!r} has no packed implementation"
    for kind in ("full_attention", "sliding_attention"):
        rope = (getattr(config, "rope_parameters", None) or {}).get(kind) or {}
        if rope.get("rope_type", "default") != "default":
            return f"RoPE type {rope['rope_type']!r} ({kind}) has no packed implementation"
    return None


def layer_plan(config: Any) -> list[tuple[bool, float]]:
    """``(local, rope_theta)`` of each layer, from either config style of transformers.

    Newer configs list ``layer_types`` (``full_attention`` / ``sliding_attention``) and
    ``rope_parameters[type]["rope_theta"]``; older ones ``global_attn_every_n_layers`` and
    ``global_rope_theta`` / ``local_rope_theta`` (None: the global theta).
    """
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if not types:
        every = int(getattr(config, "global_attn_every_n_layers", 3) or 3)
        types = ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    rope = getattr(config, "rope_parameters", None) or {}
    global_theta = float(getattr(config, "global_rope_theta", None) or 160_000.0)
    local_theta = getattr(config, "local_rope_theta", None)

    def theta(kind: str) -> float:
        given = (rope.get(kind) or {}).get("rope_theta")
        if given is not None:
            return float(given)
        if kind == "sliding_attention" and local_theta is not None:
            return float(local_theta)
        return global_theta

    return [(t == "sliding_attention", theta(t)) for t in types[:n]]


@functools.cache
def varlen_window_supported() -> bool:
    """Whether this torch's ``varlen_attn`` takes ``window_size`` (sliding-window FlashAttention)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def choose_modernbert_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend to run (see the module docstring).

    Raises:
        ValueError: ``requested`` cannot run here, or is not a ModernBERT backend (the message says why).
    """
    from embedder.models.packed_bert import varlen_attention_available

    half_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "varlen" if half_cuda and varlen_attention_available() else "padded"
    if requested not in MODERNBERT_ATTENTION:
        return _refuse(requested, f"ModernBERT runs with attention auto, {', '.join(MODERNBERT_ATTENTION)}")
    if requested == "varlen" and not (half_cuda and varlen_attention_available()):
        return _refuse(requested, "varlen attention needs CUDA in float16/bfloat16 and torch >= 2.10")
    return requested


def _refuse(requested: str, why: str) -> str:
    raise ValueError(f"model.attention={requested}: {why}")


@dataclass(slots=True)
class _BatchAttention:
    """What every layer of one batch shares: RoPE tables and the attention masks of its backend."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    rope: dict[float, tuple[torch.Tensor, torch.Tensor]]
    window_rope: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None  # local_attention(rope=...)'s tables
    pad_index: torch.Tensor | None = None
    global_mask: torch.Tensor | None = None
    local_mask: torch.Tensor | None = None
    global_block_mask: Any = None
    local_block_mask: Any = None


# --- the elementwise pieces around the matmuls (compiled on CUDA) -----------------------------------


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' ``rotate_half`` form, in float32: ``[x1, x2] → [x1c - x2s, x2c + x1s]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _embed(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _layer_norm(F.embedding(ids, table), weight, bias, eps)


def _pre_attention(
    x: torch.Tensor,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn_norm`` (None: identity) → ``Wqkv`` → RoPE on q and k: each ``[T, heads, head_dim]``."""
    h = x if norm_w is None else _layer_norm(x, norm_w, norm_b, eps)
    qkv = F.linear(h, qkv_w, qkv_b)
    qkv = qkv.view(qkv.shape[0], 3, heads, qkv.shape[1] // (3 * heads))
    q, k, v = qkv.unbind(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    wo: torch.Tensor,
    wo_b: torch.Tensor | None,
    norm_w: torch.Tensor,
    norm_b: torch.Tensor | None,
    wi: torch.Tensor,
    wi_b: torch.Tensor | None,
    w2: torch.Tensor,
    w2_b: torch.Tensor | None,
    eps: float,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Residual + ``Wo``, then the GeGLU MLP on ``mlp_norm(x)`` and its residual."""
    x = x + F.linear(attn, wo, wo_b)
    a, gate = F.linear(_layer_norm(x, norm_w, norm_b, eps), wi, wi_b).chunk(2, dim=-1)
    return x + F.linear(act(a) * gate, w2, w2_b)


# The compiled regions run from one attention to the next, so a layer's closing residual add fuses
# with the next layer's attn_norm (and RoPE with the Wqkv output) instead of each being its own pass.


def _embed_then_pre(
    ids: torch.Tensor,
    table: torch.Tensor,
    emb_w: torch.Tensor,
    emb_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings, then layer 0 up to its attention: ``(x, q, k, v)``."""
    x = _embed(ids, table, emb_w, emb_b, eps)
    return (x, *_pre_attention(x, norm_w, norm_b, qkv_w, qkv_b, cos, sin, eps, heads))


def _post_then_pre(
    x: torch.Tensor, attn: torch.Tensor, *weights: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of layer ``i`` after its attention, then layer ``i + 1`` up to its attention.

    ``weights``: layer i's 8 post-attention tensors, layer i+1's 4 pre-attention tensors, cos, sin,
    eps, heads, act.
    """
    *post, norm_w, norm_b, qkv_w, qkv_b, cos, sin, eps, heads, act = weights
    x = _post_attention(x, attn, *post, eps, act)
    return (x, *_pre_attention(x, norm_w, norm_b, qkv_w, qkv_b, cos, sin, eps, heads))


def _post_then_final(x: torch.Tensor, attn: torch.Tensor, *weights: Any) -> torch.Tensor:
    """The last layer after its attention, then ``final_norm`` (``weights``: 8 post tensors, final
    norm weight and bias, eps, act)."""
    *post, final_w, final_b, eps, act = weights
    return _layer_norm(_post_attention(x, attn, *post, eps, act), final_w, final_b, eps)


# --- attention backends ---------------------------------------------------------------------------


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _BatchAttention, half: int | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu, m = meta.cu_seqlens, meta.max_seqlen
    if half is None:
        return varlen_attn(q, k, v, cu, cu, m, m)
    return varlen_attn(q, k, v, cu, cu, m, m, window_size=(half, half))


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _BatchAttention, half: int | None) -> torch.Tensor:
    n, length = meta.cu_seqlens.numel() - 1, meta.max_seqlen
    num_tokens, heads, head_dim = q.shape
    mask = meta.global_mask if half is None else meta.local_mask

    def grid(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(n * length, heads, head_dim)
        out.index_copy_(0, meta.pad_index, t)
        return out.view(n, length, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(n * length, heads, head_dim)[meta.pad_index]


def _attend_window_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _BatchAttention, half: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    from embedder.models import kernels

    return kernels.local_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, half, rope=rope)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _BatchAttention, half: int | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = meta.global_block_mask if half is None else meta.local_block_mask
    flex = _compiled_flex() if q.is_cuda else flex_attention
    out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
    return out[0].transpose(0, 1)


def _flex_block_mask(segments: torch.Tensor, half: int | None) -> Any:
    """Document (and window) block mask over the packed tokens, for ``flex_attention``."""
    from torch.nn.attention.flex_attention import create_block_mask

    num_tokens = segments.numel()

    def same_document(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return segments[q_idx] == segments[kv_idx]

    def same_document_in_window(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (segments[q_idx] == segments[kv_idx]) & ((q_idx - kv_idx).abs() <= half)

    mask_mod = same_document if half is None else same_document_in_window
    # Compiled on CUDA: evaluated block by block instead of materialising a [T, T] mask.
    return create_block_mask(
        mask_mod, None, None, num_tokens, num_tokens, device=segments.device, _compile=segments.is_cuda
    )


class PackedModernBertEncoder:
    """The padding-free encoder stack of a ModernBERT, weights in the run's dtype.

    Same calling convention as ``PackedBertEncoder``, so the encoder drives both alike.

    Example:
        >>> packed = PackedModernBertEncoder.from_hf(st_model[0].auto_model, torch.device("cuda"), torch.bfloat16)
        >>> meta = build_attention(cu_seqlens, segments, max_seqlen, num_tokens, packed.varlen)
        >>> hidden = packed(input_ids, position_ids, meta)  # [num_tokens, hidden_size]
    """

    def __init__(
        self,
        embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        layers: list[tuple[torch.Tensor | None, ...]],
        final_norm: tuple[torch.Tensor, torch.Tensor | None],
        plan: list[tuple[bool, float]],
        num_heads: int,
        half_window: int,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        attention: str,
        compile: bool = False,
        fused: bool = False,
        act_name: str = "",
    ) -> None:
        from embedder.models.kernels import GLU_ACTIVATIONS

        if attention not in MODERNBERT_ATTENTION:
            raise ValueError(f"attention must be one of {MODERNBERT_ATTENTION}, not {attention!r}")
        self.embeddings = embeddings
        self.layers = layers
        self.final_norm = final_norm
        self.plan = plan
        self.num_heads = num_heads
        self.half_window = half_window
        self.eps = eps
        self.act = act
        self.act_name = act_name
        self.fused = fused and act_name in GLU_ACTIVATIONS
        self.rope_in_place = True  # fused: RoPE rotates q and k inside Wqkv's output (False: copies, for benchmarks)
        # fused local layers on the window kernel: RoPE inside it (False: a pass before). On an
        # H100 (RESULTS.md, "2026-12-07/08 (third session)") the kernel with RoPE took 8.7 ms a 131k batch
        # against 5.8 ms + 4.7 ms of RoPE passes: the forward 89.0 -> 87.3 ms, the same vectors.
        self.rope_in_window = True
        # fused: GeGLU in Wi's GEMM epilogue (kernels.linear_glu; False: cuBLAS, then the glu pass).
        # Off: that Triton GEMM ran at 490 TFLOP/s against cuBLAS's 727 on an H100, 20.8 ms a 131k
        # batch against 20.0 ms for the two passes.
        self.glu_in_gemm = False
        # fused: the residual stream in float32 (False: in the run's dtype, as transformers keeps it,
        # Wo's and the MLP's GEMMs adding their output to it in cuBLAS's epilogue and the norm pass
        # reading it alone: 4 bytes an element of the add + LayerNorm passes instead of 12). On for
        # fidelity: a bf16 stream costs mean pooling min cos 0.99805 at 2048 tokens on CPU
        # (``benchmarks/modernbert_bf16_sensitivity.py``), below the 0.999 bound; the other is a
        # benchmark variant (``bench_modernbert.py``, ``bf16-residual``).
        self.residual_fp32 = True
        self.compiled = compile and not self.fused
        self._global = {"varlen": _attend_varlen, "flex": _attend_flex, "padded": _attend_padded}[attention]
        self._local = self._global
        self.attention_backend = attention
        if attention == "varlen" and self.fused:
            self._local = _attend_window_kernel
            self.attention_backend = "varlen+triton-window"
        elif attention == "varlen" and not varlen_window_supported():
            self._local = _attend_flex
            self.attention_backend = "varlen+flex"
        # whether the local layers' attention rotates q and k itself (the window kernel; the
        # other backends take q and k rotated by the RoPE pass, whatever rope_in_window says)
        self.local_takes_rope = self._local is _attend_window_kernel
        head_dim = self.hidden_size // num_heads
        self._inv_freq = {
            theta: 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=embeddings[0].device) / head_dim))
            for theta in {t for _, t in plan}
        }
        self._first: Callable[..., tuple[torch.Tensor, ...]] = _embed_then_pre
        self._between: Callable[..., tuple[torch.Tensor, ...]] = _post_then_pre
        self._last: Callable[..., torch.Tensor] = _post_then_final
        if self.compiled:
            self._first = torch.compile(_embed_then_pre, dynamic=True, fullgraph=True)
            self._between = torch.compile(_post_then_pre, dynamic=True, fullgraph=True)
            self._last = torch.compile(_post_then_final, dynamic=True, fullgraph=True)

    @classmethod
    def from_hf(
        cls,
        auto_model: Any,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "auto",
        compile: bool | None = None,
        fused: bool | None = None,
    ) -> PackedModernBertEncoder:
        """Takes the weights of a loaded ``ModernBertModel`` (see ``modernbert_support``).

        ``attention``: ``auto`` or one of ``MODERNBERT_ATTENTION``. ``fused`` (None: on CUDA in
        fp16/bf16 with Triton and a power-of-two head size) runs the elementwise passes between the
        GEMMs as Triton kernels; otherwise ``compile`` (None: on CUDA in fp16/bf16) fuses them with
        ``torch.compile``.

        Raises:
            ValueError: an explicitly requested attention backend cannot run here.
        """
        from embedder.models.kernels import fused_add_layer_norm_available

        config = auto_model.config

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        def norm(module: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if isinstance(module, torch.nn.Identity):
                return None, None
            return take(module.weight), take(module.bias)

        def linear(module: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            return take(module.weight), take(module.bias)

        emb = auto_model.embeddings
        layers = [
            (*norm(layer.attn_norm), *linear(layer.attn.Wqkv), *linear(layer.attn.Wo), *norm(layer.mlp_norm),
             *linear(layer.mlp.Wi), *linear(layer.mlp.Wo))
            for layer in auto_model.layers
        ]
        backend = choose_modernbert_attention(attention, device, dtype)
        half_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        head_dim = int(config.hidden_size) // int(config.num_attention_heads)
        if fused is None:
            fused = half_cuda and fused_add_layer_norm_available(device) and head_dim & (head_dim - 1) == 0
        return cls(
            embeddings=(take(emb.tok_embeddings.weight), *norm(emb.norm)),
            layers=layers,
            final_norm=norm(auto_model.final_norm),
            plan=layer_plan(config),
            num_heads=int(config.num_attention_heads),
            half_window=int(config.local_attention) // 2,
            eps=float(config.norm_eps),
            act=_ACTIVATIONS[config.hidden_activation],
            attention=backend,
            compile=half_cuda if compile is None else compile,
            fused=fused,
            act_name=str(config.hidden_activation),
        )

    @property
    def varlen(self) -> bool:
        """Whether attention runs on the packed tokens directly (no padded grid metadata needed)."""
        return self.attention_backend != "padded"

    @property
    def elementwise(self) -> str:
        """How the passes between the GEMMs run, for the load log line ("" when eager)."""
        if self.fused:
            return "Triton kernels between the GEMMs"
        return "torch.compile between the GEMMs" if self.compiled else ""

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings[0].shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        """Width of the widest activation: ``Wi``'s output (input and gate of the GeGLU)."""
        return int(self.layers[0][8].shape[0]) if self.layers else 0

    def _batch_attention(self, position_ids: torch.Tensor, meta: Any) -> _BatchAttention:
        """RoPE tables of each theta (the fused kernels compute their own) and the backend's masks,
        once per batch."""
        positions = position_ids.long()
        rope = {}
        for theta, inv_freq in ({} if self.fused else self._inv_freq).items():
            freqs = positions.float().unsqueeze(1) * inv_freq  # [T, head_dim / 2], float32
            rope[theta] = (freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1))
        out = _BatchAttention(cu_seqlens=meta.cu_seqlens, max_seqlen=meta.max_seqlen, rope=rope)
        if self.fused and self.rope_in_window and self.local_takes_rope and meta.max_seqlen - 1 > self.half_window:
            from embedder.models.kernels import rope_tables

            dtype = self.embeddings[0].dtype
            thetas = {theta for local, theta in self.plan if local}
            out.window_rope = {theta: rope_tables(positions, self._inv_freq[theta], dtype) for theta in thetas}
        uses_flex = self.attention_backend in ("flex", "varlen+flex")
        if self.attention_backend == "padded":
            out.pad_index, out.global_mask = meta.pad_index, meta.key_mask
            grid = torch.arange(meta.max_seqlen, device=positions.device)
            window = (grid.unsqueeze(0) - grid.unsqueeze(1)).abs() <= self.half_window
            out.local_mask = meta.key_mask & window
        elif uses_flex:
            cu = meta.cu_seqlens.long()
            segments = torch.searchsorted(cu[1:], torch.arange(positions.numel(), device=cu.device), right=True)
            if self.attention_backend == "flex":
                out.global_block_mask = _flex_block_mask(segments, None)
            out.local_block_mask = _flex_block_mask(segments, self.half_window)
        return out

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: Any) -> torch.Tensor:
        """Token states ``[T, hidden]`` of a packed batch.

        Args:
            input_ids: ``[T]`` on the device, int32 or int64.
            position_ids: ``[T]``, each sequence's positions from 0.
            meta: ``packed_bert.build_attention(..., varlen=self.varlen)`` of the batch.
        """
        batch = self._batch_attention(position_ids, meta)
        if self.fused:
            return self._forward_fused(input_ids, position_ids, batch)
        eps, heads, act = self.eps, self.num_heads, self.act
        last = len(self.layers) - 1
        x, q, k, v = self._first(input_ids, *self.embeddings, *self.layers[0][:4], *batch.rope[self.plan[0][1]], eps, heads)
        for i in range(len(self.layers)):
            attn = self._attend(i, q, k, v, batch)
            post = self.layers[i][4:]
            if i < last:
                cos, sin = batch.rope[self.plan[i + 1][1]]
                x, q, k, v = self._between(x, attn, *post, *self.layers[i + 1][:4], cos, sin, eps, heads, act)
            else:
                x = self._last(x, attn, *post, *self.final_norm, eps, act)
        return x

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: _BatchAttention) -> torch.Tensor:
        """Layer ``i``'s attention ``[T, hidden]``: windowed on a local layer whose window does not
        cover the batch's longest sequence, global otherwise."""
        if self.plan[i][0] and batch.max_seqlen - 1 > self.half_window:
            out = self._local(q, k, v, batch, self.half_window)
        else:
            out = self._global(q, k, v, batch, None)
        return out.reshape(q.shape[0], self.hidden_size)

    def _forward_fused(self, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: _BatchAttention) -> torch.Tensor:
        """The forward with each elementwise pass one Triton kernel (``kernels.add_layer_norm_f32``,
        ``qk_norm_rope``, ``glu``) around a float32 residual stream; a layer's closing residual add
        fuses with the next layer's ``attn_norm`` (the last one's with ``final_norm``). With
        ``residual_fp32`` off the stream is in the run's dtype and the adds happen in the GEMMs
        (``_sublayer_out``), the norm passes only reading it."""
        from embedder.models import kernels

        heads, eps, last = self.num_heads, self.eps, len(self.layers) - 1
        table, emb_w, emb_b = self.embeddings
        # the residual stream (float32 unless residual_fp32 is off), updated in place
        x = _layer_norm(F.embedding(input_ids, table).float(), emb_w.float(), None if emb_b is None else emb_b.float(), eps)
        if not self.residual_fp32:
            x = x.to(table.dtype)
        h = x.to(table.dtype) if self.layers[0][0] is None else kernels.add_layer_norm_f32(x, None, *self.layers[0][:2], eps)
        for i, (_, _, qkv_w, qkv_b, wo, wo_b, mlp_w, mlp_b, wi, wi_b, w2, w2_b) in enumerate(self.layers):
            local, theta = self.plan[i]
            qkv = F.linear(h, qkv_w, qkv_b)
            if batch.window_rope is not None and local:  # built only where the window kernel runs local layers
                # the window kernel rotates q and k itself, as it loads them
                q, k, v = qkv.view(qkv.shape[0], 3, heads, -1).unbind(1)
                attn = self._local(q, k, v, batch, self.half_window, batch.window_rope[theta]).reshape(h.shape)
            else:
                q, k, v = kernels.qk_norm_rope(
                    qkv, position_ids, self._inv_freq[theta], 1.0, heads, heads, None, None, eps,
                    in_place=self.rope_in_place, tokens=32,
                )
                attn = self._attend(i, q, k, v, batch)
            h = kernels.add_layer_norm_f32(x, self._sublayer_out(x, attn, wo, wo_b), mlp_w, mlp_b, eps)
            if self.glu_in_gemm:
                glu = kernels.linear_glu(h, wi, wi_b, self.act_name)
            else:
                glu = kernels.glu(F.linear(h, wi, wi_b), self.act_name)
            out = self._sublayer_out(x, glu, w2, w2_b)
            norm_w, norm_b = self.final_norm if i == last else self.layers[i + 1][:2]
            if norm_w is None:  # an identity attn_norm: the residual itself goes on
                if out is not None:
                    x += out
                h = x.to(table.dtype)
            else:
                h = kernels.add_layer_norm_f32(x, out, norm_w, norm_b, eps)
        return h

    def _sublayer_out(
        self, x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A sublayer's closing linear: its output, which the next norm pass adds to the float32
        residual ``x``; or, with ``residual_fp32`` off, None, the GEMM having added it to ``x`` itself."""
        if self.residual_fp32:
            return F.linear(inp, weight, bias)
        x.addmm_(inp, weight.t())  # cuBLAS's beta = 1: fp32 accumulation, x rounded once
        if bias is not None:
            x += bias
        return None
