"""Padding-free forward of decoder-style embedding models (Qwen2, Qwen3, Mistral, Llama).

Qwen3-Embedding, gte-Qwen2, e5-mistral and their siblings are decoder stacks read out at the last
token. Like ``packed_bert``, the forward takes a whole packed batch — flat ``input_ids`` and
``position_ids`` of ``T`` tokens and ``cu_seqlens`` — with no padding and no mask, and the weights
are taken once from the loaded Hugging Face model: q/k/v fused into one matrix, gate and up fused
into one matrix, everything cast to the run's dtype. Each layer is exactly the Hugging Face math::

    h = RMSNorm(x);  q, k, v = h Wqkv (+ b)      # grouped-query: fewer k/v heads than q heads
    q, k = RMSNorm_head(q), RMSNorm_head(k)      # Qwen3 only (q_norm / k_norm over head_dim)
    q, k = RoPE(q, k, position_ids)              # per-sequence positions from the packing
    x = x + attention(q, k, v) Wo
    x = x + (act(h Wgate) * h Wup) Wdown,  h = RMSNorm(x)
    ... final RMSNorm

RoPE is computed from the packed ``position_ids`` with the model's own inverse frequencies and
attention scaling (read from its rotary module, so ``rope_theta`` and the static scalings
``linear``, ``llama3`` and ``yarn`` are exactly the model's). Scalings that depend on the sequence
length at run time (``dynamic``, ``longrope``) are refused with the reason: the model then runs on
the padded fallback.

Attention is causal, as the models were trained, unless the config turns the causal mask off:
transformers' own switch ``is_causal: false`` in ``config.json`` (what its mask builder honours,
e.g. for gte-Qwen2-style bidirectional embedders) makes it bidirectional here too. Models with
custom modeling code (``trust_remote_code``) are not packed: their attention cannot be read off
the config. Backends (``attention=``, the job's ``model.attention``):

* ``varlen`` — CUDA fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
  PyTorch) on the packed tokens, causal and with grouped-query heads where the installed torch
  takes those arguments (checked with ``inspect.signature``: torch 2.10 has ``is_causal``, later
  ones ``window_size=(-1, 0)``; grouped-query heads go through ``enable_gqa`` where it exists, else
  torch's FlashAttention-2 op directly, which takes fewer k/v heads natively; k/v heads are repeated
  only without either).
* ``padded`` — anywhere (CPU, fp32): q/k/v scattered into a ``[n, L]`` grid, SDPA with a causal
  and key mask, gathered back.

The residual stream between the layers is kept in float32 (each RMSNorm casts its output to the
run's dtype for the GEMMs, as Hugging Face's does), so 28–32 residual adds are not each rounded to
bf16 (together with the fused kernels below, measured on an H200: a Mistral-7B shape's min cos to fp32
went from 0.99716 to 0.99780, Qwen3-0.6B's from 0.99989 to 0.99995).

On CUDA in fp16/bf16 every elementwise pass between the GEMMs is one Triton kernel
(``kernels.add_rms_norm``: the residual add and the next RMSNorm; ``kernels.qk_norm_rope``:
Qwen3's q/k norms and RoPE, written in place inside the QKV output that attention then reads as
strided views — with ``fp32_gemm_out``, rounded into new q/k/v tensors; ``kernels.glu``) —
``fused=None``, the default there.
Where the kernels cannot take the model (a head size that is not a power of two, an activation
they do not implement) or with ``fused=False``, the same math is compiled with ``torch.compile`` into
regions running from one attention to the next (``compile``), or runs eagerly. Measured on an H200
(Qwen3-0.6B shape, benchmarks/RESULTS.md): eager 195k tok/s, compiled 273k, fused kernels 450k.

Sliding-window attention (Mistral's ``sliding_window``, Qwen's ``use_sliding_window``) is exact as
full causal attention when the window is at least the sequence limit; a shorter window is refused.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

from embedder.models.kernels import GLU_ACTIVATIONS, fused_add_layer_norm_available
from embedder.models.packed_bert import PackedAttention, choose_attention

log = logging.getLogger(__name__)

DECODER_MODEL_TYPES = ("qwen2", "qwen3", "mistral", "llama")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE variants whose inverse frequencies do not change with the sequence length."""


def rope_type(config: Any) -> str:
    """The config's RoPE type (transformers 5 ``rope_parameters``, or the older ``rope_scaling``)."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict) and params:
            if "full_attention" in params and isinstance(params["full_attention"], dict):
                params = params["full_attention"]
            return str(params.get("rope_type") or params.get("type") or "default")
    return "default"


def is_bidirectional(config: Any) -> bool:
    """True when the config turns the causal mask off (transformers' ``is_causal: false``)."""
    return getattr(config, "is_causal", True) is False


def decoder_support(auto_model: Any, max_seq_length: int) -> str | None:
    """Why ``auto_model`` cannot run on the packed decoder forward, or None when it can.

    Accepted: transformers' own Qwen2/Qwen3/Mistral/Llama base models (the layout below), a static
    RoPE type, and sliding windows (if any) no shorter than ``max_seq_length``.
    """
    config = getattr(auto_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in DECODER_MODEL_TYPES:
        return f"model type {model_type!r} has no packed implementation"
    if not type(auto_model).__module__.startswith("transformers."):
        return f"custom modeling code ({type(auto_model).__module__}) whose attention cannot be read off the config"
    layers = getattr(auto_model, "layers", None)
    if layers is None or not hasattr(auto_model, "embed_tokens") or not hasattr(auto_model, "norm"):
        return "not a decoder base model (embed_tokens, layers, norm)"
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        return f"RoPE scaling {kind!r} is not implemented (packed: {', '.join(ROPE_TYPES)})"
    rotary = getattr(auto_model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding module with inv_freq"
    try:
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            _ = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.input_layernorm)
            _ = (mlp.gate_proj, mlp.up_proj, mlp.down_proj, layer.post_attention_layernorm)
            window = getattr(attn, "sliding_window", None)
            if window is None and model_type == "mistral":
                window = getattr(config, "sliding_window", None)
            if window is not None and int(window) < max_seq_length:
                return (
                    f"sliding-window attention of {window} tokens is shorter than the sequence limit {max_seq_length} "
                    f"(set model.max_seq_length to at most {window} to run it packed)"
                )
    except AttributeError:
        return "layers do not have the Llama/Qwen decoder layout"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        return f"activation {config.hidden_act!r} is not implemented"
    return None


@functools.cache
def _varlen_options() -> tuple[frozenset[str], Any]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters), varlen_attn


@functools.cache
def _flash_forward_gqa() -> Any:
    """``aten._flash_attention_forward`` (varlen, grouped-query k/v heads), or None without it."""
    return getattr(torch.ops.aten, "_flash_attention_forward", None)


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedAttention, causal: bool) -> torch.Tensor:
    params, varlen_attn = _varlen_options()
    kwargs: dict[str, Any] = {}
    if causal:
        if "window_size" in params:  # torch >= 2.11
            kwargs["window_size"] = (-1, 0)
        else:  # torch 2.10
            kwargs["is_causal"] = True
    cu = meta.cu_seqlens
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif _flash_forward_gqa() is not None:
            # torch's FlashAttention-2 takes fewer k/v heads natively (measured on an H200: 1.0 ms for a
            # Qwen3-0.6B layer at 64k tokens against 1.5 ms with k/v repeated first); varlen_attn
            # (torch 2.11) has no argument for it, so its op is called directly.
            return _flash_forward_gqa()(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, 0.0, causal, False)[0]
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, **kwargs)


def _attend_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedAttention, mask: torch.Tensor
) -> torch.Tensor:
    n, length = meta.num_sequences, meta.max_seqlen

    def grid(t: torch.Tensor) -> torch.Tensor:
        g = t.new_zeros(n * length, t.shape[1], t.shape[2])
        g.index_copy_(0, meta.pad_index, t)
        return g.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2)  # [n, heads, L, d]

    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(n * length, q.shape[1], q.shape[2])[meta.pad_index]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalised in fp32, cast to the weights' (the run's) dtype, scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(weight.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --- the elementwise pieces around the matmuls (compiled on CUDA) -----------------------------------
# Each region runs from one attention to the next, so a layer's closing residual add, the next
# layer's RMSNorm, the q/k norms and RoPE fuse into a few kernels around the GEMMs instead of each
# being its own memory pass (the same cut as ``packed_modernbert``).


def _pre_attention(
    x: torch.Tensor,
    ln1: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``RMSNorm → Wqkv → q/k norms → RoPE``: q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``."""
    num_tokens = x.shape[0]
    qkv = F.linear(_rms_norm(x, ln1, eps), qkv_w, qkv_b)
    d = qkv.shape[1] // (heads + 2 * kv_heads)
    q = qkv[:, : heads * d].view(num_tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(num_tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].reshape(num_tokens, kv_heads, d)
    if q_norm is not None:
        q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.contiguous()


def _post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_w: torch.Tensor,
    o_b: torch.Tensor | None,
    ln2: torch.Tensor,
    gu_w: torch.Tensor,
    gu_b: torch.Tensor | None,
    down_w: torch.Tensor,
    down_b: torch.Tensor | None,
    eps: float,
    act: Any,
) -> torch.Tensor:
    """Residual + ``Wo``, then the SwiGLU MLP on ``RMSNorm(x)`` and its residual."""
    x = x + F.linear(attn, o_w, o_b)
    gate, up = F.linear(_rms_norm(x, ln2, eps), gu_w, gu_b).chunk(2, dim=-1)
    return x + F.linear(act(gate) * up, down_w, down_b)


def _embed_then_pre(ids: torch.Tensor, table: torch.Tensor, *pre: Any) -> tuple[torch.Tensor, ...]:
    """Embeddings, then layer 0 up to its attention: ``(x, q, k, v)`` (``pre``: see ``_pre_attention``)."""
    x = F.embedding(ids, table).float()  # the residual stream is float32 (see the module's docstring)
    return (x, *_pre_attention(x, *pre))


def _post_then_pre(x: torch.Tensor, attn: torch.Tensor, *weights: Any) -> tuple[torch.Tensor, ...]:
    """The rest of layer ``i`` after its attention, then layer ``i + 1`` up to its attention.

    ``weights``: layer i's 7 post-attention tensors, layer i+1's 5 pre-attention tensors, cos, sin,
    eps, heads, kv_heads, act.
    """
    *post, ln1, qkv_w, qkv_b, q_norm, k_norm, cos, sin, eps, heads, kv_heads, act = weights
    x = _post_attention(x, attn, *post, eps, act)
    return (x, *_pre_attention(x, ln1, qkv_w, qkv_b, q_norm, k_norm, cos, sin, eps, heads, kv_heads))


def _post_then_final(x: torch.Tensor, attn: torch.Tensor, *weights: Any) -> torch.Tensor:
    """The last layer after its attention, then the final RMSNorm (``weights``: 7 post tensors, the
    final norm's weight, eps, act)."""
    *post, final_w, eps, act = weights
    return _rms_norm(_post_attention(x, attn, *post, eps, act), final_w, eps)


class PackedDecoderEncoder:
    """The padding-free stack of a Qwen2/Qwen3/Mistral/Llama model, weights in the run's dtype.

    Example:
        >>> packed = PackedDecoderEncoder.from_hf(st_model[0].auto_model, torch.device("cuda"), torch.bfloat16)
        >>> meta = build_attention(cu_seqlens, segments, max_seqlen, num_tokens, packed.varlen)
        >>> hidden = packed(input_ids, position_ids, meta)  # [num_tokens, hidden_size]
    """

    def __init__(
        self,
        embed: torch.Tensor,
        layers: list[tuple[torch.Tensor | None, ...]],
        final_norm: torch.Tensor,
        inv_freq: torch.Tensor,
        rope_scale: float,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        act: Any,
        attention: str,
        causal: bool,
        compile: bool = False,
        fused: bool = False,
        act_name: str = "",
        fp32_gemm_out: bool = False,
    ) -> None:
        if attention not in ("varlen", "padded"):
            raise ValueError(f"the packed decoder runs varlen or padded attention, not {attention!r}")
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.inv_freq = inv_freq
        self.rope_scale = rope_scale
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.eps = eps
        self.act = act
        self.attention_backend = attention
        self.causal = causal
        self.fused = fused and act_name in GLU_ACTIVATIONS
        self.fp32_gemm_out = fp32_gemm_out and self.fused
        self.act_name = act_name
        self.compiled = compile and not self.fused
        self._first: Any = _embed_then_pre
        self._between: Any = _post_then_pre
        self._last: Any = _post_then_final
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
        fp32_gemm_out: bool = False,
    ) -> PackedDecoderEncoder:
        """Takes the weights of a loaded decoder base model (see ``decoder_support``).

        ``attention``: ``auto`` (varlen where it can run, else padded), ``varlen`` or ``padded``.
        ``fused`` (None: on CUDA in fp16/bf16 with Triton, varlen attention and a power-of-two
        head size) runs every elementwise pass between the GEMMs as one of ``kernels``' decoder
        kernels; otherwise ``compile`` (None: on CUDA in fp16/bf16) fuses them with ``torch.compile``.
        ``fp32_gemm_out`` (fused forward only; opt-in) has the GEMMs write float32 (cuBLAS
        accumulates in fp32 anyway), so their outputs are rounded once, by the kernel that reads
        them, instead of twice: a CPU emulation of the 7B shape moves min cos to fp32 from 0.99763
        to 0.99845 (``benchmarks/decoder_bf16_sensitivity.py``); measured on an H100, 0.99780 ->
        0.99822 at 5% less speed (float16 reaches 0.99997 at full speed: benchmarks/RESULTS.md).
        The gate/up output then takes twice the memory, which ``auto_token_budget`` does not count:
        set the budget.

        Raises:
            ValueError: an explicitly requested attention backend cannot run here.
        """
        from transformers.activations import ACT2FN

        config = auto_model.config
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads)
        if attention == "flash4":
            raise ValueError("model.attention=flash4 is implemented for BERT-layout models only; use auto or varlen")
        backend = choose_attention(attention, device, dtype, head_dim)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        def cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
            return None if any(p is None for p in parts) else take(torch.cat(parts, dim=0))

        layers = []
        for layer in auto_model.layers:
            a, m = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            layers.append(
                (
                    take(layer.input_layernorm.weight),
                    cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                    cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                    None if q_norm is None else take(q_norm.weight),
                    None if k_norm is None else take(k_norm.weight),
                    take(a.o_proj.weight),
                    take(a.o_proj.bias),
                    take(layer.post_attention_layernorm.weight),
                    cat(m.gate_proj.weight, m.up_proj.weight),
                    cat(m.gate_proj.bias, m.up_proj.bias),
                    take(m.down_proj.weight),
                    take(m.down_proj.bias),
                )
            )
        rotary = auto_model.rotary_emb
        eps = float(getattr(config, "rms_norm_eps", 1e-6))
        half_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        return cls(
            embed=take(auto_model.embed_tokens.weight),
            layers=layers,
            final_norm=take(auto_model.norm.weight),
            inv_freq=rotary.inv_freq.detach().to(device=device, dtype=torch.float32),
            rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            eps=eps,
            act=ACT2FN[config.hidden_act],
            attention=backend,
            causal=not is_bidirectional(config),
            compile=half_cuda if compile is None else compile,
            fused=(half_cuda and fused_add_layer_norm_available(device) and head_dim & (head_dim - 1) == 0)
            if fused is None else fused,
            act_name=str(config.hidden_act),
            fp32_gemm_out=fp32_gemm_out,
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
        return int(self.embed.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        return int(self.layers[0][8].shape[0]) // 2 if self.layers else 0

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, d/2], fp32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(dtype).unsqueeze(1)  # [T, 1, d]
        sin = (emb.sin() * self.rope_scale).to(dtype).unsqueeze(1)
        return cos, sin

    def _padded_mask(self, meta: PackedAttention) -> torch.Tensor:
        mask = meta.key_mask  # [n, 1, 1, L]
        if self.causal:
            length = meta.max_seqlen
            tril = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            mask = mask & tril.view(1, 1, length, length)
        return mask

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
        """Token states ``[T, hidden]`` of a packed batch (ids on the device, int32 or int64)."""
        if self.fused:
            return self._forward_fused(input_ids, position_ids, meta)
        heads, kv_heads = self.num_heads, self.num_kv_heads
        cos, sin = self._rope(position_ids, self.embed.dtype)
        mask = None if self.varlen else self._padded_mask(meta)
        eps, act, last = self.eps, self.act, len(self.layers) - 1
        x, q, k, v = self._first(input_ids, self.embed, *self.layers[0][:5], cos, sin, eps, heads, kv_heads)
        num_tokens = x.shape[0]
        for i in range(len(self.layers)):
            if mask is None:
                attn = _attend_varlen(q, k, v, meta, self.causal)
            else:
                attn = _attend_padded(q, k, v, meta, mask)
            attn = attn.reshape(num_tokens, heads * self.head_dim)
            post = self.layers[i][5:]
            if i < last:
                x, q, k, v = self._between(x, attn, *post, *self.layers[i + 1][:5], cos, sin, eps, heads, kv_heads, act)
            else:
                x = self._last(x, attn, *post, self.final_norm, eps, act)
        return x

    def _forward_fused(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: PackedAttention) -> torch.Tensor:
        """The same forward with each elementwise pass one Triton kernel (``kernels.add_rms_norm``,
        ``qk_norm_rope``, ``glu``); a layer's closing residual add fuses with the next RMSNorm."""
        from embedder.models import kernels

        heads, kv_heads, eps, last = self.num_heads, self.num_kv_heads, self.eps, len(self.layers) - 1
        dtype, linear = self.embed.dtype, _linear_f32 if self.fp32_gemm_out else F.linear
        x = F.embedding(input_ids, self.embed).float()  # the float32 residual stream, updated in place
        num_tokens = x.shape[0]
        mask = None if self.varlen else self._padded_mask(meta)
        h = kernels.add_rms_norm(x, None, self.layers[0][0], eps)
        for i, (_, qkv_w, qkv_b, q_norm, k_norm, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b) in enumerate(self.layers):
            q, k, v = kernels.qk_norm_rope(
                linear(h, qkv_w, qkv_b), position_ids, self.inv_freq, self.rope_scale, heads, kv_heads, q_norm, k_norm,
                eps, dtype=dtype, in_place=not self.fp32_gemm_out,
            )
            if mask is None:
                attn = _attend_varlen(q, k, v, meta, self.causal)
            else:
                attn = _attend_padded(q, k, v, meta, mask)
            h = kernels.add_rms_norm(x, linear(attn.reshape(num_tokens, heads * self.head_dim), o_w, o_b), ln2, eps)
            up = kernels.glu(linear(h, gu_w, gu_b), self.act_name, dtype=dtype)
            norm = self.final_norm if i == last else self.layers[i + 1][0]
            h = kernels.add_rms_norm(x, linear(up, down_w, down_b), norm, eps)
        return h


def _linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a float32 output. On CUDA from fp16/bf16 operands, cuBLAS writes its fp32
    accumulator (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8); elsewhere the result of
    ``F.linear`` in float32 (exact in an fp32 run)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        out = torch.mm(x, weight.t(), out_dtype=torch.float32)
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias).float()
