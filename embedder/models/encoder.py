"""The encoder: a sentence-transformers model that embeds ``PackedBatch``es padding-free.

``Encoder.load(job.model)`` loads the model through sentence-transformers (so its own config decides
pooling, normalization, prompts and limit), takes the weights into a padding-free forward where the
family has one (BERT, XLM-RoBERTa and siblings: ``packed_bert``; ModernBERT: ``packed_modernbert``)
and otherwise falls back to the Hugging Face forward on a padded batch (correct, slower; logged
once). Vectors match ``SentenceTransformer.encode(texts, prompt=<document prompt>)``.

On a GPU the runner keeps the device busy by submitting the next batch before reading the last
one's vectors::

    encoder = Encoder.load(job.model)
    in_flight = collections.deque()
    for batch in batches:
        in_flight.append((batch, encoder.encode_async(batch)))   # copies ids, launches, returns
        if len(in_flight) > 2:
            done, handle = in_flight.popleft()
            write(done, handle.result())                         # waits for that batch only
    for done, handle in in_flight:
        write(done, handle.result())

``encode_async`` stages the ids in reused pinned host buffers, copies them to the device without
blocking, runs the forward and pooling with no host-device sync, and queues the copy of the vectors
back; ``result()`` waits for that batch's copy alone. ``encode(batch)`` is
``encode_async(batch).result()``. An encoder is used from one thread at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedder.models.layout import prompt_token_ids, sequence_layout
from embedder.models.loader import (
    ModelError,
    fast_tokenizer_json,
    load_sentence_transformer,
    read_model_spec,
    resolve_device,
    resolve_dtype,
    task_query_prompt,
    transformer_module,
    weights_sha256,
)
from embedder.models.packed_bert import (
    PackedBertEncoder,
    build_attention,
    choose_attention,
    packed_support,
    position_offset,
)
from embedder.models.packed_decoder import DECODER_MODEL_TYPES, PackedDecoderEncoder, decoder_support
from embedder.models.packed_modernbert import PackedModernBertEncoder, is_modernbert, modernbert_support
from embedder.models.pooling import normalize, pool, token_segments
from embedder.packing import SequenceLayout, build_batch, plan_batches
from embedder.records import Chunk, PackedBatch

if TYPE_CHECKING:
    import tokenizers

    from embedder.config import ModelConfig

__all__ = ["EncodeHandle", "Encoder", "ModelError", "auto_token_budget", "packed_family", "split_batch"]

log = logging.getLogger(__name__)

CPU_TOKEN_BUDGET = 8192
AUTO_BUDGET_CAP = 131072
PINNED_SLOTS = 3
# CUDA batches are topped up with filler sequences to a multiple of this many tokens, so the matmul
# shapes repeat: every new shape costs cuBLAS a heuristic lookup, and the allocator fewer block sizes.
CUDA_TOKEN_GRANULE = 512


class EncodeHandle:
    """The vectors of one submitted batch; ``result()`` waits for them (``[n, dim]`` float32)."""

    __slots__ = ("_event", "_out", "_value")

    def __init__(self, value: np.ndarray | None = None, event: Any = None, out: torch.Tensor | None = None) -> None:
        self._value = value
        self._event = event
        self._out = out

    def done(self) -> bool:
        """True when ``result()`` would not wait."""
        return self._value is not None or self._event is None or bool(self._event.query())

    def result(self) -> np.ndarray:
        if self._value is None:
            self._event.synchronize()
            self._value = self._out.numpy().copy()  # the pinned slot is reused by later batches
            self._event = self._out = None
        return self._value


class _ConcatHandle(EncodeHandle):
    """A batch split in parts after an out-of-memory error: the parts' vectors, in order."""

    __slots__ = ("_parts",)

    def __init__(self, parts: list[EncodeHandle]) -> None:
        super().__init__()
        self._parts = parts

    def done(self) -> bool:
        return all(p.done() for p in self._parts)

    def result(self) -> np.ndarray:
        if self._value is None:
            self._value = np.concatenate([p.result() for p in self._parts])
            self._parts = []
        return self._value


class _PinnedSlot:
    """Pinned host buffers for one batch in flight: ids in, vectors out, and the event after both."""

    __slots__ = ("event", "handle", "inputs", "outputs")

    def __init__(self) -> None:
        self.inputs = torch.empty(0, dtype=torch.int32)
        self.outputs = torch.empty(0, dtype=torch.float32)
        self.event: torch.cuda.Event | None = None
        self.handle: EncodeHandle | None = None

    def reserve(self, num_inputs: int, num_outputs: int) -> None:
        """Waits for the slot's last batch, then makes sure the buffers are large enough."""
        if self.handle is not None:
            self.handle.result()  # also waits for the event: the buffers are free after this
            self.handle = None
        if self.inputs.numel() < num_inputs:
            self.inputs = torch.empty(_grow(num_inputs), dtype=torch.int32, pin_memory=True)
        if self.outputs.numel() < num_outputs:
            self.outputs = torch.empty(_grow(num_outputs), dtype=torch.float32, pin_memory=True)


def _grow(n: int) -> int:
    return 1 << max(12, (n - 1).bit_length())


def split_batch(batch: PackedBatch) -> tuple[PackedBatch, PackedBatch]:
    """Splits a batch of two or more sequences into two with about half the tokens each."""
    n = batch.num_sequences
    if n < 2:
        raise ValueError("a batch of one sequence cannot be split")
    cu = batch.cu_seqlens.astype(np.int64)
    half = cu[-1] / 2
    k = int(np.clip(np.searchsorted(cu, half), 1, n - 1))
    if k > 1 and abs(cu[k - 1] - half) < abs(cu[k] - half):
        k -= 1  # the sequence boundary nearest to half the tokens
    cut = int(cu[k])
    lengths = np.diff(cu)

    def part(seqs: slice, tokens: slice, base: int) -> PackedBatch:
        fields: dict[str, Any] = {
            "input_ids": batch.input_ids[tokens],
            "position_ids": batch.position_ids[tokens],
            "cu_seqlens": (cu[seqs.start : (seqs.stop + 1 if seqs.stop is not None else None)] - base).astype(np.int32),
            "max_seqlen": int(lengths[seqs].max()),
            "chunk_ids": batch.chunk_ids[seqs],
            "prompt_lengths": None if batch.prompt_lengths is None else batch.prompt_lengths[seqs],
        }
        if getattr(batch, "chunks", None) is not None:
            fields["chunks"] = batch.chunks[seqs]
        return dataclasses.replace(batch, **fields)

    return part(slice(0, k), slice(0, cut), 0), part(slice(k, None), slice(cut, None), cut)


def activation_bytes_per_token(
    dtype: torch.dtype, hidden: int, intermediate: int, glu: bool = False, f32_residual: bool = False
) -> int:
    """Peak activation bytes of one token in one layer, as ``auto_token_budget`` counts them."""
    elem = torch.finfo(dtype).bits // 8
    per_token = elem * (8 * hidden + (3 if glu else 2) * intermediate) + 8 * hidden + 16 * 128
    return per_token + (4 * hidden if f32_residual else 0)


def auto_token_budget(
    device: torch.device,
    dtype: torch.dtype,
    hidden: int,
    layers: int,
    intermediate: int,
    max_seq_length: int,
    glu: bool = False,
    f32_residual: bool = False,
) -> int:
    """Tokens per batch from free GPU memory and the model's size (CPU: ``CPU_TOKEN_BUDGET``).

    Peak activation memory of one layer is about ``(8 * hidden + 2 * intermediate)`` values a token
    (residual stream, fused q/k/v, attention output, FFN in/out; ``glu``: ``3 * intermediate`` for
    the fused gate/up projection and their product; ``f32_residual``: 4 bytes more per hidden value
    for the float32 residual stream the fused decoder and ModernBERT forwards keep beside the
    half-precision normed copy) plus float32 pooling and RoPE tables; half the
    free memory is left as margin for the allocator and other batches in flight. Memory is linear
    in the tokens whatever the sequence length (varlen attention keeps no ``L × L`` scores), so the
    same budget holds 8k- or 32k-token chunks; it is never below ``max_seq_length``, so one
    full-length chunk always fits a batch. Beyond ``AUTO_BUDGET_CAP`` tokens a batch no longer
    runs faster, it only takes longer to fill.
    """
    if device.type != "cuda":
        return max(CPU_TOKEN_BUDGET, max_seq_length)
    free, _ = torch.cuda.mem_get_info(device)
    per_token = activation_bytes_per_token(dtype, hidden, intermediate, glu=glu, f32_residual=f32_residual)
    budget = int(0.5 * free / per_token)
    return int(max(max_seq_length, min(AUTO_BUDGET_CAP, budget)))


class Encoder:
    """A loaded model that embeds packed batches; build it with ``Encoder.load``.

    Attributes:
        name: The model as configured.
        source: The directory or hub id it was loaded from.
        tokenizer_json: The fast tokenizer serialized (``tokenizers.Tokenizer.from_str`` rebuilds it).
        tokenizer: That tokenizer, truncation and padding off.
        max_seq_length: Max tokens of a sequence, special tokens and prompt included.
        dim: Size of the vectors: the model's, or ``model.truncate_dim`` (Matryoshka).
        full_dim: The model's own vector size.
        truncate_dim: The Matryoshka dimension the vectors are cut to (None: the model's full width).
        pooling: ``"cls"``, ``"mean"`` or ``"lasttoken"``.
        normalize: Whether vectors are L2-normalized.
        document_prompt: Prompt put before every chunk ("" for none).
        query_prompt: Prompt for ``encode_queries`` ("" for none).
        layout: Specials, document prompt ids and position offset for the packer.
        device: Where the forward runs.
        dtype: Its precision.
        token_budget: Tokens per batch; halved after a CUDA out-of-memory error (packers follow it).
        packed: True when the padding-free forward is in use, False for the padded fallback.
        token_granule: Batches run as a multiple of this many tokens, topped up with filler
            sequences whose vectors are dropped (``CUDA_TOKEN_GRANULE`` on CUDA, 1 elsewhere).

    Example:
        >>> from embedder.config import ModelConfig
        >>> encoder = Encoder.load(ModelConfig(name="all-MiniLM-L6-v2"))
        >>> encoder.encode_texts(["a sentence"], encoder.document_prompt).shape
        (1, 384)
    """

    def __init__(self) -> None:  # use Encoder.load
        self.name = ""
        self.source = ""
        self.tokenizer_json = ""
        self.tokenizer: tokenizers.Tokenizer
        self.max_seq_length = 0
        self.dim = 0
        self.full_dim = 0
        self.truncate_dim: int | None = None
        self.pooling = "mean"
        self.normalize = False
        self.include_prompt = True
        self.document_prompt = ""
        self.query_prompt = ""
        self.layout: SequenceLayout
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.token_budget = CPU_TOKEN_BUDGET
        self.packed = False
        self.token_granule = 1
        self.architecture = ""
        self._local_dir: str | None = None
        self._packed_model: PackedBertEncoder | PackedDecoderEncoder | PackedModernBertEncoder | None = None
        self._hf_model: Any = None
        self._pad_id = 0
        self._vocab_size = 0
        self._max_positions = 0
        self._post_modules: list[Any] = []
        self._layouts: dict[str, SequenceLayout] = {}
        self._slots: list[_PinnedSlot] = []
        self._next_slot = 0
        self._weights_sha256: str | None = None
        self._fidelity_gate: _FidelityGate | None = None
        self._fidelity_failure: Exception | None = None
        self.fidelity: dict[str, Any] | None = None

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, config: ModelConfig, *, approximate_gelu: bool | None = None, fidelity_min_cosine: float | None = None
    ) -> Encoder:
        """Loads the model ``config.name`` and prepares it for ``config.device``/``config.dtype``.

        ``approximate_gelu`` (CUDA, fp16/bf16, erf-GELU models; None: ``config.approximate_gelu``,
        whose ``auto`` means yes): GELU in tanh form inside the FFN matmul's epilogue (~10% faster
        for BGE-large; within 4.7e-4 of erf, under the dtype's rounding). False keeps erf exact.

        ``model.dtype: float8``: the packed forward's GEMMs run in FP8 (``embedder.models.fp8``) and
        a bf16 copy of the model is kept for the *fidelity gate*: the first batch encoded is also
        encoded in bf16, and any vector below ``fidelity_min_cosine`` (the job's
        ``validation.min_cosine``; None: its default) raises ``FidelityGateFailed`` — before the
        caller has any vector to write. The bf16 copy is dropped once the gate has passed.

        Raises:
            ModelError: unknown or unloadable model, unsupported pipeline, prompt that does not
                tokenize apart from the text.
            ConfigError: device/dtype/max_seq_length settings that cannot work (float8 on a machine
                without FP8 tensor cores, or for a model without a packed forward).
        """
        from embedder.config import ConfigError, ValidationConfig

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        fp8 = dtype == getattr(torch, "float8_e4m3fn", None)
        compute_dtype = torch.bfloat16 if fp8 else dtype
        if fp8 and config.compile:
            raise ConfigError("model.compile is not supported with model.dtype float8; set model.compile: false")
        if approximate_gelu is None:
            configured = getattr(config, "approximate_gelu", "auto")
            approximate_gelu = None if configured == "auto" else bool(configured)
        st_model, source, local_dir = load_sentence_transformer(config.name, "cpu", config.trust_remote_code)
        spec = read_model_spec(st_model)
        transformer = transformer_module(st_model)
        auto_model = transformer.auto_model

        self = cls()
        self.name = config.name
        self.source = source
        self._local_dir = local_dir
        self.architecture = spec.architecture
        self.pooling = spec.pooling
        self.normalize = spec.normalize
        self.include_prompt = spec.include_prompt
        self.dim = self.full_dim = spec.dim
        truncate_dim = getattr(config, "truncate_dim", None)
        if truncate_dim is not None:
            if truncate_dim > spec.dim:
                raise ConfigError(
                    f"model.truncate_dim {truncate_dim} is above the dimension of {config.name!r} ({spec.dim}); "
                    f"use at most {spec.dim} or leave it unset"
                )
            if truncate_dim < spec.dim:
                self.dim = self.truncate_dim = int(truncate_dim)
        self.device, self.dtype = device, dtype
        self.document_prompt = spec.document_prompt if config.document_prompt is None else config.document_prompt
        self.query_prompt = spec.query_prompt if config.query_prompt is None else config.query_prompt
        if getattr(config, "task", None):
            self.query_prompt = task_query_prompt(self.query_prompt, config.task)

        self.tokenizer_json = fast_tokenizer_json(transformer)
        from embedder.pipeline.chunk import tokenizer_from_json

        self.tokenizer = tokenizer_from_json(self.tokenizer_json)
        model_config = auto_model.config
        self._vocab_size = int(getattr(model_config, "vocab_size", 0) or 0)
        self._pad_id = int(getattr(model_config, "pad_token_id", None) or 0)
        self._max_positions = int(getattr(model_config, "max_position_embeddings", 0) or 0)

        limit = spec.max_seq_length
        if self._max_positions:
            limit = min(limit, self._max_positions - position_offset(auto_model))
        if config.max_seq_length is not None:
            if config.max_seq_length > limit:
                raise ConfigError(
                    f"model.max_seq_length {config.max_seq_length} is above the model's limit {limit}; "
                    f"use at most {limit} or leave it unset"
                )
            limit = config.max_seq_length
        self.max_seq_length = limit
        family, reason = packed_family(auto_model, limit) if config.packed else (None, "packed: false in the job")
        if fp8 and family != "bert":
            raise ConfigError(
                f"model.dtype float8 runs on the packed BERT-layout forward only (BERT, XLM-RoBERTa families), and "
                f"{spec.architecture} {'has none here (' + reason + ')' if reason else 'runs another family'}; "
                "use model.dtype bfloat16"
            )
        offset = position_offset(auto_model) if family == "bert" else 0
        self.layout = sequence_layout(self.tokenizer, self.document_prompt, offset)
        self._layouts[self.document_prompt] = self.layout
        _check_layout_matches_model_tokenizer(
            transformer.tokenizer,
            self.tokenizer,
            self.layout,
            self.document_prompt,
            lower=bool(getattr(transformer, "do_lower_case", False)),
        )
        if self.layout.overhead >= limit:
            raise ModelError(
                f"the prompt and special tokens take {self.layout.overhead} tokens, the whole limit of {limit}; "
                "use a shorter model.document_prompt"
            )

        for module in spec.post_modules:
            self._post_modules.append(module.to(device=device, dtype=torch.float32).eval())
        glu = False
        if family == "bert":
            head_dim = int(model_config.hidden_size) // int(model_config.num_attention_heads)
            try:
                attention = choose_attention(config.attention, device, compute_dtype, head_dim)
            except ValueError as err:  # an explicit model.attention that cannot run here
                raise ConfigError(str(err)) from None
            if fp8:
                from embedder.models.fp8 import emulated, tamper_scales

                try:
                    self._packed_model = PackedBertEncoder.from_hf(
                        auto_model, device, compute_dtype, attention=attention, fp8="emulate" if emulated() else True
                    )
                except ValueError as err:  # a layer size FP8 GEMMs cannot take
                    raise ConfigError(str(err)) from None
                tamper_scales(self._packed_model)
                reference = PackedBertEncoder.from_hf(
                    auto_model, device, compute_dtype, approximate_gelu=approximate_gelu, attention=attention
                )
                if fidelity_min_cosine is None:
                    fidelity_min_cosine = float(ValidationConfig.model_fields["min_cosine"].default)
                self._fidelity_gate = _FidelityGate(reference, fidelity_min_cosine)
            else:
                self._packed_model = PackedBertEncoder.from_hf(
                    auto_model, device, dtype, compile=config.compile, approximate_gelu=approximate_gelu,
                    attention=attention,
                )
        elif family == "modernbert":
            try:
                self._packed_model = PackedModernBertEncoder.from_hf(
                    auto_model, device, dtype, attention=config.attention, compile=True if config.compile else None
                )
            except ValueError as err:  # an explicit model.attention that cannot run here
                raise ConfigError(str(err)) from None
            glu = True
        elif family == "decoder":
            try:
                self._packed_model = PackedDecoderEncoder.from_hf(
                    auto_model, device, dtype, attention=config.attention, compile=True if config.compile else None
                )
            except ValueError as err:  # an explicit model.attention that cannot run here
                raise ConfigError(str(err)) from None
            glu = True
        if self._packed_model is not None:
            self.packed = True
            hidden, layers = self._packed_model.hidden_size, self._packed_model.num_layers
            intermediate = self._packed_model.intermediate_size
        else:
            log.warning(
                "%s: %s; using the padded Hugging Face forward (correct, slower)", spec.architecture, reason
            )
            self._hf_model = cast_keeping_rotary_frequencies(auto_model, device, dtype).eval()
            hidden = int(getattr(model_config, "hidden_size", 1024) or 1024)
            layers = int(getattr(model_config, "num_hidden_layers", 24) or 24)
            intermediate = int(getattr(model_config, "intermediate_size", 4 * hidden) or 4 * hidden)
        self.token_granule = CUDA_TOKEN_GRANULE if device.type == "cuda" else 1
        if config.token_budget == "auto":
            f32_residual = bool(getattr(self._packed_model, "fused", False)) and family in ("decoder", "modernbert")
            self.token_budget = auto_token_budget(
                device, compute_dtype, hidden, layers, intermediate, limit, glu=glu, f32_residual=f32_residual
            )
        else:
            if config.token_budget < limit:
                raise ConfigError(
                    f"model.token_budget {config.token_budget} is below max_seq_length {limit}: a full-length "
                    f"chunk would not fit a batch; use at least {limit} or 'auto'"
                )
            self.token_budget = int(config.token_budget)
        del st_model
        log.info(
            "model %s (%s, %s pooling%s) on %s %s: %s, max %d tokens, token budget %d",
            self.name,
            self.architecture,
            self.pooling,
            ", normalized" if self.normalize else "",
            device,
            str(dtype).removeprefix("torch."),
            (
                f"packed {family} ({self._packed_model.attention_backend} attention"
                f"{'' if getattr(self._packed_model, 'causal', True) else ', bidirectional'}"
                f"{', FP8 GEMMs (e4m3, rowwise scales), bf16 elsewhere' if fp8 else ''}"
                f"{', ' + self._packed_model.elementwise if self._packed_model.elementwise else ''})"
            )
            if self.packed
            else "padded fallback",
            self.max_seq_length,
            self.token_budget,
        )
        return self

    # --- metadata -------------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What produced the vectors, stored with them (schema metadata)."""
        from embedder import __version__

        if self._weights_sha256 is None:
            self._weights_sha256 = weights_sha256(self._local_dir) or "unknown"
        return {
            "model": self.name,
            "source": self.source,
            "weights_sha256": self._weights_sha256,
            "architecture": self.architecture,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "document_prompt": self.document_prompt,
            "query_prompt": self.query_prompt,
            "max_seq_length": self.max_seq_length,
            "dim": self.dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "embedder_version": __version__,
            # absent: the model's full width (embedder.schema.FINGERPRINT_DEFAULTS)
            **({"truncate_dim": self.truncate_dim} if self.truncate_dim is not None else {}),
        }

    def layout_for(self, prompt: str) -> SequenceLayout:
        """The sequence layout with ``prompt`` in place of the document prompt (cached)."""
        layout = self._layouts.get(prompt)
        if layout is None:
            layout = dataclasses.replace(self.layout, prompt_ids=prompt_token_ids(self.tokenizer, prompt))
            self._layouts[prompt] = layout
        return layout

    # --- encoding -------------------------------------------------------------------------------

    def encode(self, batch: PackedBatch) -> np.ndarray:
        """Vectors of a packed batch: ``[n, dim]`` float32 in batch order."""
        return self.encode_async(batch).result()

    def encode_async(self, batch: PackedBatch) -> EncodeHandle:
        """Submits a batch and returns at once on a GPU; ``handle.result()`` gives its vectors.

        A CUDA out-of-memory error halves ``token_budget`` (kept for later batches) and runs the
        batch as two halves instead of failing.
        """
        if batch.num_sequences == 0:
            return EncodeHandle(np.zeros((0, self.dim), dtype=np.float32))
        self._check(batch)
        if self._fidelity_failure is not None:
            raise self._fidelity_failure
        if self._fidelity_gate is not None:
            return self._pass_fidelity_gate(batch)
        try:
            return self._submit(batch)
        except torch.OutOfMemoryError:
            if batch.num_sequences < 2:
                raise
        # Out of the except block: the failed attempt's frames and their tensors are released now.
        torch.cuda.empty_cache()
        old = self.token_budget
        self.token_budget = max(self.max_seq_length, min(old, batch.num_tokens) // 2)
        log.warning(
            "CUDA out of memory on a batch of %d tokens: token budget %d → %d, retrying in halves",
            batch.num_tokens,
            old,
            self.token_budget,
        )
        first, second = split_batch(batch)
        return _ConcatHandle([self.encode_async(first), self.encode_async(second)])

    def _pass_fidelity_gate(self, batch: PackedBatch) -> EncodeHandle:
        """The FP8 fidelity gate, on the first batch: its vectors in FP8 and in bf16, compared.

        Raises:
            FidelityGateFailed: a vector below the gate's cosine; every later call raises it again.
        """
        from embedder.validate import FidelityGateFailed, check_fidelity

        gate, self._fidelity_gate = self._fidelity_gate, None
        assert gate is not None
        fp8_model = self._packed_model
        vectors = self._submit(batch).result()
        self._packed_model = gate.reference
        try:
            reference = self._submit(batch).result()
        finally:
            self._packed_model = fp8_model
        try:
            report = check_fidelity(list(batch.chunk_ids), vectors, reference, gate.min_cosine)
        except FidelityGateFailed as err:
            self._fidelity_failure = err
            raise
        finally:
            del gate
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 copy's memory goes back to the batches
        self.fidelity = report
        log.info(
            "FP8 fidelity gate passed: %d chunk(s) of the first batch, min cos %.5f to bf16 (>= %s)",
            report["count"], report["min_cosine"], report["threshold"],
        )
        return EncodeHandle(vectors)

    def encode_texts(self, texts: Sequence[str], prompt: str, truncated: list[int] | None = None) -> np.ndarray:
        """Tokenizes, packs and encodes texts with ``prompt``: ``[n, dim]`` float32 in input order.

        Texts longer than the limit are truncated, as ``SentenceTransformer.encode`` does. A prompt
        that does not tokenize apart from the text (see ``layout.prompt_token_ids``) is tokenized
        together with each text, exactly as sentence-transformers does. The indices of truncated texts
        are appended to ``truncated`` when it is given.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        try:
            layout, joint = self.layout_for(prompt), False
        except ModelError:
            # A prompt whose ids depend on the text after it (byte-level BPE: Qwen3-Embedding's
            # "...\nQuery:" merges ":" with the query's first word): tokenize prompt + text as one
            # string, as SentenceTransformer.encode does. Pooling that leaves the prompt out needs
            # the prompt's own ids, so it keeps the error.
            if not self.include_prompt:
                raise
            layout, joint = self.layout_for(""), True
        room = self.max_seq_length - layout.overhead
        if room < 1:
            raise ModelError(f"prompt {prompt!r} leaves no room for text within {self.max_seq_length} tokens")
        inputs = [prompt + t for t in texts] if joint else list(texts)
        encodings = self.tokenizer.encode_batch(inputs, add_special_tokens=False)
        if truncated is not None:
            truncated.extend(i for i, e in enumerate(encodings) if len(e.ids) > room)
        chunks = [
            Chunk(doc_id=str(i), chunk_index=0, text="", token_ids=np.asarray(e.ids[:room], np.int32), content_hash="")
            for i, e in enumerate(encodings)
        ]
        lengths = np.fromiter((len(c.token_ids) for c in chunks), np.int64, len(chunks)) + layout.overhead
        from embedder.pipeline.encode import encode_stream

        batches = (build_batch([chunks[i] for i in group], layout) for group in plan_batches(lengths, self.token_budget))
        for batch, vectors in encode_stream(self, batches):
            out[[int(c.doc_id) for c in batch.chunks]] = vectors
        return out

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of search queries, with the model's query prompt."""
        return self.encode_texts(texts, self.query_prompt)

    # --- internals ------------------------------------------------------------------------------

    def _check(self, batch: PackedBatch) -> None:
        """Refuses batches that would index out of the embedding tables (a device-side assert)."""
        if batch.max_seqlen > self.max_seq_length:
            raise ValueError(
                f"a sequence of {batch.max_seqlen} tokens is above the encoder's max_seq_length "
                f"{self.max_seq_length}; chunk with Chunker.for_encoder(encoder, ...)"
            )
        if self._vocab_size and int(batch.input_ids.max()) >= self._vocab_size:
            raise ValueError(f"token id {int(batch.input_ids.max())} is outside the model's vocabulary ({self._vocab_size})")
        if self.packed and self._max_positions and int(batch.position_ids.max()) >= self._max_positions:
            raise ValueError(
                f"position id {int(batch.position_ids.max())} is outside the model's {self._max_positions} positions; "
                "pack with the encoder's layout (encoder.layout)"
            )

    def _skip_lengths(self, batch: PackedBatch) -> np.ndarray | None:
        """Leading tokens each sequence leaves out of pooling (None: the model pools them all)."""
        if self.include_prompt or batch.prompt_lengths is None:
            return None
        prompt = batch.prompt_lengths.astype(np.int64)
        # sentence-transformers drops the leading special token and the prompt, and only with a prompt.
        return np.where(prompt > 0, prompt + len(self.layout.prefix_ids), 0)

    def _filler_lengths(self, batch: PackedBatch) -> list[int]:
        """Lengths of the filler sequences that top the batch up to a multiple of ``token_granule``."""
        missing = -batch.num_tokens % self.token_granule
        longest = max(1, batch.max_seqlen)
        return [longest] * (missing // longest) + ([missing % longest] if missing % longest else [])

    def _submit(self, batch: PackedBatch) -> EncodeHandle:
        n, real_tokens = batch.num_sequences, batch.num_tokens
        skip = self._skip_lengths(batch)
        filler = self._filler_lengths(batch)
        num_tokens, m = real_tokens + sum(filler), n + len(filler)
        with torch.inference_mode():
            if self.device.type != "cuda":
                ids, pos, cu, skip_arr = self._host_arrays(batch, skip, filler)
                skip_t = None if skip_arr is None else torch.from_numpy(skip_arr)
                vectors = self._forward(
                    torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(cu), skip_t, batch.max_seqlen, num_tokens
                )
                return EncodeHandle(vectors[:n].numpy().astype(np.float32, copy=True))
            # One pinned staging buffer, one host-to-device copy: [ids | positions | cu_seqlens | skip].
            slot = self._slot()
            total = 2 * num_tokens + m + 1 + (0 if skip is None else m)
            slot.reserve(total, n * self.dim)
            host = slot.inputs.numpy()
            host[:real_tokens] = batch.input_ids
            host[real_tokens:num_tokens] = self._pad_id
            host[num_tokens : num_tokens + real_tokens] = batch.position_ids
            host[num_tokens + real_tokens : 2 * num_tokens] = self.layout.position_offset
            cu_at = 2 * num_tokens
            host[cu_at : cu_at + n + 1] = batch.cu_seqlens
            if filler:
                host[cu_at + n + 1 : cu_at + m + 1] = real_tokens + np.cumsum(filler)
            if skip is not None:
                host[cu_at + m + 1 : cu_at + m + 1 + n] = skip
                host[cu_at + m + 1 + n : total] = 0
            dev = slot.inputs[:total].to(self.device, non_blocking=True)
            ids, pos = dev[:num_tokens], dev[num_tokens : 2 * num_tokens]
            cu = dev[cu_at : cu_at + m + 1]
            skip_t = None if skip is None else dev[cu_at + m + 1 : total]
            vectors = self._forward(ids, pos, cu, skip_t, batch.max_seqlen, num_tokens)
            out = slot.outputs[: n * self.dim].view(n, self.dim)
            out.copy_(vectors[:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            slot.handle = EncodeHandle(event=event, out=out)
            return slot.handle

    def _host_arrays(
        self, batch: PackedBatch, skip: np.ndarray | None, filler: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The batch's ids, positions, cu_seqlens and skip counts as host arrays, filler appended."""
        if not filler:
            return (
                np.ascontiguousarray(batch.input_ids, dtype=np.int64),
                np.ascontiguousarray(batch.position_ids, dtype=np.int64),
                np.ascontiguousarray(batch.cu_seqlens, dtype=np.int32),
                skip,
            )
        extra = sum(filler)
        ids = np.concatenate([batch.input_ids, np.full(extra, self._pad_id)]).astype(np.int64)
        pos = np.concatenate([batch.position_ids, np.full(extra, self.layout.position_offset)]).astype(np.int64)
        cu = np.concatenate([batch.cu_seqlens, batch.num_tokens + np.cumsum(filler)]).astype(np.int32)
        skip = None if skip is None else np.concatenate([skip, np.zeros(len(filler), np.int64)])
        return ids, pos, cu, skip

    def _slot(self) -> _PinnedSlot:
        if not self._slots:
            self._slots = [_PinnedSlot() for _ in range(PINNED_SLOTS)]
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        return slot

    def _forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cu: torch.Tensor,
        skip: torch.Tensor | None,
        max_seqlen: int,
        num_tokens: int,
    ) -> torch.Tensor:
        """Float32 ``[n, dim]`` vectors of one batch already on the device; no host sync."""
        segments = token_segments(cu, num_tokens)
        if self._packed_model is not None:
            meta = build_attention(cu, segments, max_seqlen, num_tokens, self._packed_model.varlen)
            hidden = self._packed_model(ids, pos, meta)
        else:
            hidden = self._padded_forward(ids, cu, segments, max_seqlen, num_tokens)
        vectors = pool(hidden, cu, segments, self.pooling, skip)
        for module in self._post_modules:
            vectors = module({"sentence_embedding": vectors})["sentence_embedding"]
        if self.truncate_dim is not None:
            # sentence-transformers cuts after the model's modules (its Normalize included); the
            # cut vector is made unit again when the model normalizes (normalize_embeddings=True).
            vectors = vectors[:, : self.truncate_dim]
        return normalize(vectors) if self.normalize else vectors.float()

    def _padded_forward(
        self, ids: torch.Tensor, cu: torch.Tensor, segments: torch.Tensor, max_seqlen: int, num_tokens: int
    ) -> torch.Tensor:
        """The fallback: unpack to a right-padded batch, run the HF model, pack the states again."""
        n = cu.numel() - 1
        starts = cu.long()[:-1]
        grid_index = segments * max_seqlen + (torch.arange(num_tokens, device=ids.device) - starts[segments])
        padded = torch.full((n * max_seqlen,), self._pad_id, dtype=torch.long, device=ids.device)
        padded[grid_index] = ids.long()
        mask = torch.zeros(n * max_seqlen, dtype=torch.long, device=ids.device)
        mask[grid_index] = 1
        out = self._hf_model(input_ids=padded.view(n, max_seqlen), attention_mask=mask.view(n, max_seqlen))
        states = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return states.reshape(n * max_seqlen, -1)[grid_index]


def cast_keeping_rotary_frequencies(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``module.to(device, dtype)`` that leaves rotary embeddings' ``inv_freq`` buffers in float32.

    ``Module.to(dtype)`` casts buffers too, and a bf16 ``inv_freq`` is off by up to 0.4%: RoPE's
    angles then drift by a tenth of a radian at position 500 and further beyond — the model sees
    wrong positions. Loading with ``from_pretrained(dtype=...)`` keeps them in float32, and
    transformers' rotary modules compute cos/sin from them in float32; this keeps the same.
    """
    kept = {name: buf for name, buf in module.named_buffers() if name.endswith("inv_freq") and buf.is_floating_point()}
    module.to(device=device, dtype=dtype)
    for name, buf in kept.items():
        owner_name, _, leaf = name.rpartition(".")
        # assigning a tensor to a buffer's name replaces the buffer (its persistence unchanged)
        setattr(module.get_submodule(owner_name), leaf, buf.to(device=device, dtype=torch.float32))
    return module


def packed_family(auto_model: Any, max_seq_length: int) -> tuple[str | None, str | None]:
    """Which padding-free forward runs ``auto_model``: ``("bert", None)``, ``("decoder", None)``, or
    ``(None, reason)`` when none does (the encoder then logs the reason and runs the padded fallback).

    The one place that maps a loaded model to a packed implementation: BERT-layout encoders
    (``packed_bert.packed_support``) and Qwen2/Qwen3/Mistral/Llama decoders
    (``packed_decoder.decoder_support``, which needs the sequence limit to check sliding windows), and
    ModernBERT (``packed_modernbert.modernbert_support``).
    """
    model_type = getattr(getattr(auto_model, "config", None), "model_type", None)
    if is_modernbert(auto_model):
        reason = modernbert_support(auto_model)
        return ("modernbert", None) if reason is None else (None, reason)
    if model_type in DECODER_MODEL_TYPES:
        reason = decoder_support(auto_model, max_seq_length)
        return ("decoder", None) if reason is None else (None, reason)
    reason = packed_support(auto_model)
    return ("bert", None) if reason is None else (None, reason)


@dataclasses.dataclass(slots=True)
class _FidelityGate:
    """What the FP8 fidelity gate needs until it has run: the bf16 forward and the bound."""

    reference: PackedBertEncoder
    min_cosine: float


def _check_layout_matches_model_tokenizer(
    hf_tokenizer: Any, tokenizer: tokenizers.Tokenizer, layout: SequenceLayout, prompt: str, lower: bool
) -> None:
    """The packed ids of a probe must equal what the model's own tokenizer gives for prompt + probe."""
    from embedder.models.layout import PROBES

    for probe in PROBES:
        text = prompt + probe
        expected = list(hf_tokenizer(text.lower() if lower else text)["input_ids"])
        body = tokenizer.encode(probe, add_special_tokens=False).ids
        got = [*layout.prefix_ids.tolist(), *layout.prompt_ids.tolist(), *body, *layout.suffix_ids.tolist()]
        if got != expected:
            raise ModelError(
                f"the packed layout of {probe!r} ({got}) differs from the model tokenizer's ids ({expected}); "
                "this tokenizer adds tokens in a way the packer cannot reproduce"
            )
