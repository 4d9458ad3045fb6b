"""What a job will cost before it runs: documents, chunks, tokens, GPU-hours and dollars.

``estimate(job)`` reads a deterministic sample of the source, chunks it with the model's real
tokenizer and chunking settings (the same ``read_and_chunk`` a run uses, so the sample's token
counts are exactly what a run would embed), and extrapolates by input bytes:

1. The source is listed with small shards (``sample_mb / SAMPLE_STRATA``, at most
   ``SAMPLE_SHARD_MB``, or the job's own when smaller), so that the sample is made of many whole
   shards spread over the whole source (files that cannot be split, like a single bz2 stream or
   a gzip file, stay one shard each).
2. Shards are read whole, in a low-discrepancy order over the listing (the 1st, the middle, the
   quarters...), until ``sample_mb`` of input or ``max_seconds`` are spent (at least one shard is
   always read whole). When every shard was read the counts are exact.
3. ``documents``, ``chunks`` and ``tokens`` scale by ``total bytes / sampled bytes``.
4. GPU time = sequence tokens (chunk tokens plus the model's special tokens and prompt per chunk,
   what the encoder computes) / tokens per second of the model's shape on the chosen GPU, from
   ``embedder/data/throughput.json`` (figures measured by ``benchmarks/bench_encoder.py``), or
   from a short real run of the encoder on the sample with ``calibrate=True`` (needs CUDA).
   A shape the table lacks is scaled from the nearest measured one by FLOPs per token (see
   ``ModelShape.flops_per_token`` and ``table_throughput``) and flagged ``extrapolated``.
5. ``usd = gpu_hours x gpu_hourly_usd`` when a price is given (``--gpu-hourly-usd`` or the job's
   ``runner.gpu_hourly_usd``), else None: prices are the user's to give, not ours to guess.

Only the tokenizer and the model's config files are read (``model_profile``), never its weights,
unless ``calibrate`` runs the model.

Example:
    >>> from embedder.config import build_job
    >>> job = build_job({"source": {"uri": "enwiki.xml.bz2"}, "output": {"uri": "out"},
    ...                  "model": {"name": "BAAI/bge-large-en-v1.5"}})
    >>> print(estimate(job, gpu="h200", gpu_hourly_usd=3.5).to_dict()["gpu_hours"])
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from embedder.config import ConfigError, Job, ModelConfig

if TYPE_CHECKING:
    import tokenizers

    from embedder.chunking import Chunker
    from embedder.records import Chunk

SAMPLE_SHARD_MB = 1.0
"""Largest shard size the source is listed with for sampling: small, so the sample spans the source."""

SAMPLE_STRATA = 32
"""The sample is at least this many shards (when the source has that many): shards are
``sample_mb / SAMPLE_STRATA`` small, down to ``MIN_SAMPLE_SHARD_MB``."""

MIN_SAMPLE_SHARD_MB = 1 / 64

SAMPLE_MB = 64.0
"""Input bytes read by default (a couple of CPU-seconds per MB for Wikipedia XML)."""

SAMPLE_SECONDS = 60.0
"""Default time budget of the sample; checked between shards."""

THROUGHPUT_TABLE = Path(__file__).parent / "data" / "throughput.json"

CALIBRATION_TOKENS = 4_000_000
"""Sequence tokens a calibration run encodes (the sample repeated if it is smaller)."""

_TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.py", "*/*.json"]
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer")


class EstimateError(ConfigError):
    """An estimate that cannot be made as asked (no figures for a GPU, no CUDA to calibrate)."""


# --- the model, without its weights ----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ModelShape:
    """The transformer's size, which decides its cost per token."""

    hidden: int
    layers: int
    intermediate: int

    def flops_per_token(self, attention_length: float) -> float:
        """Forward FLOPs per token: ``2 x (4h^2 + 2hi) x layers`` for the matmuls (Q/K/V/out and the
        two FFN projections) plus ``4 x h x layers x attention_length`` for ``QK^T`` and ``PV``.

        ``attention_length`` is ``sum(len^2) / sum(len)`` over the sequences (the length a token
        attends over, on average). The same formula as ``benchmarks/bench_encoder.py``.
        """
        h, i, n = self.hidden, self.intermediate, self.layers
        return 2.0 * (4 * h * h + 2 * h * i) * n + 4.0 * h * n * attention_length


@dataclass(slots=True)
class ModelProfile:
    """What an estimate needs of a model: its tokenizer, limits, per-sequence overhead and shape."""

    name: str
    tokenizer: tokenizers.Tokenizer
    max_seq_length: int
    overhead: int
    shape: ModelShape


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _model_dir(name: str) -> Path:
    """A local directory with the model's config and tokenizer files (weights not needed)."""
    from embedder.models.loader import ModelError, hub_load_mode, resolve_model_source

    source, local_dir = resolve_model_source(name)
    if local_dir is not None:
        return Path(local_dir)
    cache_only = hub_load_mode(name, source) == "cache"  # fails in seconds when the model cannot be had
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=_TOKENIZER_FILES, local_files_only=cache_only))
    except Exception as err:  # hub errors come in many types; all mean "cannot get the files"
        raise ModelError(
            f"cannot read model {name!r}'s config and tokenizer ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "give a local model directory, or allow network access once to fetch its small config files"
        ) from err


def model_profile(config: ModelConfig) -> ModelProfile:
    """Reads the model's tokenizer and config files the way ``Encoder.load`` uses them, without weights.

    The sequence limit, the document prompt (``model.document_prompt`` or the model's saved
    ``document``/``passage``/``corpus`` prompt) and the special tokens give the chunker exactly
    the windows a run would cut.

    Raises:
        ModelError: a model whose files cannot be found, or whose tokenizer has no fast version.
    """
    from transformers import AutoTokenizer

    from embedder.models.layout import sequence_layout
    from embedder.models.loader import DOCUMENT_PROMPT_NAMES, ModelError, fast_tokenizer_json

    root = _model_dir(config.name)
    modules = _read_json(root / "modules.json")
    transformer_dir = root
    for module in modules if isinstance(modules, list) else []:
        if str(module.get("type", "")).endswith("Transformer"):
            transformer_dir = root / module.get("path", "")
            break
    st_config = _read_json(transformer_dir / "sentence_bert_config.json") or _read_json(root / "sentence_bert_config.json")
    hf_config = _read_json(transformer_dir / "config.json")
    if not hf_config:
        raise ModelError(f"model {config.name!r} has no config.json in {transformer_dir}")
    prompts = {k: v for k, v in (_read_json(root / "config_sentence_transformers.json").get("prompts") or {}).items() if v}
    prompt = config.document_prompt
    if prompt is None:
        prompt = next((prompts[n] for n in DOCUMENT_PROMPT_NAMES if prompts.get(n)), "")

    hf_tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), trust_remote_code=config.trust_remote_code)
    lower = bool(st_config.get("do_lower_case", False))
    tokenizer_json = fast_tokenizer_json(SimpleNamespace(tokenizer=hf_tokenizer, do_lower_case=lower))
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()

    max_positions = int(hf_config.get("max_position_embeddings") or 0)
    limit = st_config.get("max_seq_length")
    if not limit:
        model_max = getattr(hf_tokenizer, "model_max_length", None)
        limit = model_max if model_max and model_max < 1_000_000 else (max_positions or 512)
    if max_positions:
        offset = int(hf_config.get("pad_token_id") or 0) + 1 if hf_config.get("model_type") in _ROBERTA_LIKE else 0
        limit = min(int(limit), max_positions - offset)
    if config.max_seq_length is not None:
        limit = min(int(limit), config.max_seq_length)
    layout = sequence_layout(tokenizer, prompt, 0)
    hidden = int(hf_config.get("hidden_size") or hf_config.get("d_model") or 1024)
    shape = ModelShape(
        hidden=hidden,
        layers=int(hf_config.get("num_hidden_layers") or hf_config.get("n_layers") or 24),
        intermediate=int(hf_config.get("intermediate_size") or 4 * hidden),
    )
    return ModelProfile(config.name, tokenizer, int(limit), layout.overhead, shape)


# --- throughput -------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Throughput:
    """Tokens per second (special tokens and prompt included) for one model shape on one GPU.

    Attributes:
        tokens_per_second: The rate.
        source: Where it comes from (the benchmark line, or the calibration).
        extrapolated: True when scaled from another shape by FLOPs per token.
    """

    tokens_per_second: float
    source: str
    extrapolated: bool = False
    projected: bool = False


def table_models_key(dtype: str) -> str:
    """The table section of a compute dtype: ``models_float8`` for float8, ``models`` (bf16) otherwise."""
    return "models_float8" if dtype in ("float8", "fp8") else "models"


def load_throughput_table(path: str | Path | None = None) -> dict[str, Any]:
    """The measured throughput table (``embedder/data/throughput.json`` by default)."""
    path = Path(path) if path else THROUGHPUT_TABLE
    if not path.exists():
        raise EstimateError(f"no throughput table at {path}; reinstall embedder or give --calibrate on a GPU")
    return json.loads(path.read_text(encoding="utf-8"))


def table_throughput(
    table: dict[str, Any], gpu: str, shape: ModelShape, attention_length: float | None = None, dtype: str = "auto"
) -> Throughput:
    """The measured rate of ``shape`` on ``gpu``, or the nearest measured shape's scaled by FLOPs.

    Scaling: ``rate = measured_rate x flops(measured shape) / flops(shape)`` at the benchmark's
    ``attention_length`` (the table's, or the argument), from the measured shape nearest in FLOPs
    per token (log distance). The encoder is compute-bound on big models, so this is fair near
    measured shapes and rough far from them; small models are bound by the CPU side of the
    pipeline instead, so a scaled rate is capped at the fastest measured one.

    ``dtype`` ``float8`` reads the GPU's ``models_float8`` rows; a row marked ``projected`` (a target,
    not a measurement) makes the result ``projected`` and says so in its source.

    Raises:
        EstimateError: when the table has no figures for ``gpu`` (lists the GPUs it has).
    """
    gpus = table.get("gpus", {})
    entry = gpus.get(gpu.lower())
    key = table_models_key(dtype)
    if entry and key != "models":
        if not entry.get(key):
            raise EstimateError(f"no float8 throughput for GPU {gpu!r} in the table; give --tokens-per-second or --calibrate")
        entry = {**entry, "models": entry[key]}
    if not entry or not entry.get("models"):
        measured = ", ".join(sorted(g for g, e in gpus.items() if e.get("models"))) or "none"
        raise EstimateError(
            f"no measured throughput for GPU {gpu!r} (measured: {measured}); pick one of those with --gpu, "
            "run with --calibrate on that GPU, or give --tokens-per-second"
        )
    length = float(attention_length or entry.get("attention_length") or table.get("attention_length") or 512)
    wanted = shape.flops_per_token(length)
    rows = {
        name: (ModelShape(int(row["hidden"]), int(row["layers"]), int(row["intermediate"])), row)
        for name, row in entry["models"].items()
    }
    for name, (row_shape, row) in rows.items():
        if row_shape == shape:
            if row.get("projected"):
                return Throughput(float(row["tokens_per_second"]), f"projected for {gpu} ({name}): {row['source']}", projected=True)
            return Throughput(float(row["tokens_per_second"]), f"measured on {gpu} ({name}): {row['source']}")
    name, (row_shape, row) = min(
        rows.items(), key=lambda item: abs(math.log(item[1][0].flops_per_token(length) / wanted))
    )
    ceiling = max(float(r["tokens_per_second"]) for _, r in rows.values())
    rate = min(ceiling, float(row["tokens_per_second"]) * row_shape.flops_per_token(length) / wanted)
    projected = bool(row.get("projected"))
    return Throughput(
        rate,
        f"extrapolated by FLOPs/token from {name} {'projected for' if projected else 'measured on'} {gpu} ({row['source']})",
        extrapolated=True,
        projected=projected,
    )


def calibrate(job: Job, chunks: list[Chunk], tokens: int = CALIBRATION_TOKENS) -> Throughput:
    """Measures the encoder's rate on this GPU with the sample's real chunk lengths.

    The sample's chunks (repeated up to ``tokens`` sequence tokens) are packed with the run's
    packer and encoded with two batches in flight, after a warm-up; the rate counts special
    tokens and prompt, like the table's. It measures the GPU side only: a run whose readers
    cannot keep up goes slower.

    Raises:
        EstimateError: no CUDA GPU, or no chunks to encode.
    """
    import torch

    from embedder.models.encoder import Encoder
    from embedder.packing import TokenBudgetPacker

    if not torch.cuda.is_available():
        raise EstimateError("--calibrate needs a CUDA GPU; without one the estimate uses the measured throughput table")
    if not chunks:
        raise EstimateError("the sample produced no chunks to calibrate with")
    encoder = Encoder.load(job.model.model_copy(update={"device": "cuda"}))
    packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)
    per_pass = sum(len(c.token_ids) + encoder.layout.overhead for c in chunks)
    repeats = max(1, math.ceil(tokens / max(per_pass, 1)))
    batches = [b for _ in range(repeats) for b in packer.add(chunks)] + list(packer.flush())

    def run(selection: list[Any]) -> int:
        in_flight, done = [], 0
        for batch in selection:
            in_flight.append(encoder.encode_async(batch))
            if len(in_flight) >= 2:
                in_flight.pop(0).result()
            done += batch.num_tokens
        for handle in in_flight:
            handle.result()
        return done

    run(batches[: max(2, len(batches) // 10)])  # warm-up: kernels, allocator, autotuning
    torch.cuda.synchronize()
    started = time.perf_counter()
    computed = run(batches)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    device = torch.cuda.get_device_name(0)
    rate = computed / seconds
    return Throughput(rate, f"calibrated on {device}: {computed:,} tokens in {seconds:.2f} s ({encoder.dtype})")


# --- the sample ---------------------------------------------------------------------------------------


def spread_order(n: int) -> Iterator[int]:
    """``0..n-1`` in an order whose every prefix is spread over the range (van der Corput picks:
    0, n/2, n/4, 3n/4, ...), so a sample stopped at any point covers the source evenly."""
    seen: set[int] = set()
    k = 0
    while len(seen) < n and k < 4 * n + 64:
        x, denominator, bits = 0.0, 1.0, k
        while bits:
            denominator *= 2
            x += (bits & 1) / denominator
            bits >>= 1
        index = int(x * n)
        if index not in seen:
            seen.add(index)
            yield index
        k += 1
    yield from (i for i in range(n) if i not in seen)


@dataclass(slots=True)
class SourceSample:
    """What the sample read and what the run would make of it."""

    total_shards: int = 0
    total_bytes: int = 0
    shards: int = 0
    bytes: int = 0
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    bad_records: int = 0
    seconds: float = 0.0
    kept_chunks: list[Any] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.shards == self.total_shards


def sample_source(
    job: Job,
    chunker: Chunker,
    sample_mb: float = SAMPLE_MB,
    max_seconds: float = SAMPLE_SECONDS,
    keep_chunks: int = 0,
) -> SourceSample:
    """Reads whole shards of the source, spread over it, within ``sample_mb`` and ``max_seconds``.

    Args:
        job: The job (its source format resolved).
        chunker: The chunker a run would use.
        sample_mb: Input megabytes to read at most (the first shard is read whatever its size).
        max_seconds: Time budget, checked between shards.
        keep_chunks: Keep up to this many chunks (for calibration).
    """
    from embedder.runners.stages import ShardEnd, make_connector, read_and_chunk

    shard_mb = min(job.source.shard_size_mb, SAMPLE_SHARD_MB, max(MIN_SAMPLE_SHARD_MB, sample_mb / SAMPLE_STRATA))
    source = job.source.model_copy(update={"shard_size_mb": shard_mb})
    connector = make_connector(job.model_copy(update={"source": source}))
    shards = connector.list_shards()
    out = SourceSample(total_shards=len(shards), total_bytes=sum(max(0, s.size_bytes) for s in shards))
    started = time.perf_counter()
    budget = sample_mb * (1 << 20)
    for index in spread_order(len(shards)):
        if out.shards and (out.bytes >= budget or time.perf_counter() - started >= max_seconds):
            break
        shard = shards[index]
        for item in read_and_chunk(connector, chunker, shard):
            if isinstance(item, ShardEnd):
                out.documents += item.documents
                out.chunks += item.chunks
                out.tokens += item.tokens
                out.bad_records += len(item.bad_records)
            elif len(out.kept_chunks) < keep_chunks:
                out.kept_chunks += item[: keep_chunks - len(out.kept_chunks)]
        out.shards += 1
        out.bytes += max(0, shard.size_bytes)
    out.seconds = time.perf_counter() - started
    return out


# --- the estimate -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Estimate:
    """A job's predicted size and cost. ``to_dict`` gives the ``--json`` object.

    Attributes:
        documents, chunks, tokens: Predicted counts (``tokens``: chunk tokens, as run records count).
        sequence_tokens: Tokens the encoder computes (``tokens`` plus specials and prompt per chunk).
        gpu_hours: Predicted encoder time on one GPU.
        usd: ``gpu_hours x gpu_hourly_usd``; None without a price.
        usd_per_million_tokens: ``gpu_hourly_usd`` over millions of tokens an hour (sequence tokens
            at the rate); None without a price.
        dtype: The job's compute dtype (``float8`` reads the table's FP8 rows).
        projected: True when the rate is a projected figure, not a measurement.
        exact: True when the whole source was sampled (counts are exact, not extrapolated).
        extrapolated: True when the throughput was scaled from another model shape.
    """

    model: str
    gpu: str
    documents: int
    chunks: int
    tokens: int
    sequence_tokens: int
    gpu_hours: float
    usd: float | None
    gpu_hourly_usd: float | None
    tokens_per_second: float
    throughput_source: str
    extrapolated: bool
    exact: bool
    sample: dict[str, Any]
    mean_chunk_tokens: float
    max_seq_length: int
    dtype: str = "auto"
    projected: bool = False
    usd_per_million_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    job: Job,
    *,
    gpu: str = "h200",
    gpu_hourly_usd: float | None = None,
    sample_mb: float = SAMPLE_MB,
    max_seconds: float = SAMPLE_SECONDS,
    calibrate_on_gpu: bool = False,
    tokens_per_second: float | None = None,
    throughput_table: str | Path | None = None,
) -> Estimate:
    """Predicts documents, chunks, tokens, GPU-hours and cost of ``job`` from a sample of its source.

    Args:
        job: The job to estimate (its output is not touched).
        gpu: GPU of the throughput table (``h200``...), or a label when ``tokens_per_second`` or
            ``calibrate_on_gpu`` give the rate.
        gpu_hourly_usd: Price of the GPU per hour (default: the job's ``runner.gpu_hourly_usd``).
        sample_mb: Input megabytes to sample.
        max_seconds: Sampling time budget.
        calibrate_on_gpu: Measure the rate with a short real encoder run (needs CUDA).
        tokens_per_second: Use this rate (sequence tokens per second) instead.
        throughput_table: Another throughput JSON than the bundled one.
    """
    from embedder.chunking import Chunker
    from embedder.runners.stages import resolve_job

    job = resolve_job(job)
    profile = model_profile(job.model)
    chunker = Chunker.from_settings(profile.tokenizer, profile.max_seq_length, profile.overhead, job.chunking)
    sample = sample_source(job, chunker, sample_mb, max_seconds, keep_chunks=200_000 if calibrate_on_gpu else 0)
    if sample.bytes <= 0 and not sample.complete:
        raise EstimateError(f"the sample of {job.source.uri!r} read no bytes; cannot extrapolate")
    scale = 1.0 if sample.complete else sample.total_bytes / sample.bytes
    documents = round(sample.documents * scale)
    chunks = round(sample.chunks * scale)
    tokens = round(sample.tokens * scale)
    sequence_tokens = tokens + chunks * profile.overhead
    if tokens_per_second is not None:
        if tokens_per_second <= 0:
            raise EstimateError(f"--tokens-per-second must be positive, got {tokens_per_second}")
        rate = Throughput(float(tokens_per_second), "given with --tokens-per-second")
    elif calibrate_on_gpu:
        rate = calibrate(job, sample.kept_chunks)
    else:
        rate = table_throughput(load_throughput_table(throughput_table), gpu, profile.shape, dtype=job.model.dtype)
    price = job.runner.gpu_hourly_usd if gpu_hourly_usd is None else gpu_hourly_usd
    if price is not None and price < 0:
        raise EstimateError(f"--gpu-hourly-usd must be >= 0, got {price}")
    gpu_hours = sequence_tokens / rate.tokens_per_second / 3600.0
    return Estimate(
        model=job.model.name,
        gpu=gpu,
        documents=documents,
        chunks=chunks,
        tokens=tokens,
        sequence_tokens=sequence_tokens,
        gpu_hours=gpu_hours,
        usd=None if price is None else gpu_hours * price,
        gpu_hourly_usd=price,
        tokens_per_second=rate.tokens_per_second,
        throughput_source=rate.source,
        extrapolated=rate.extrapolated,
        exact=sample.complete,
        sample={
            "shards": sample.shards,
            "total_shards": sample.total_shards,
            "bytes": sample.bytes,
            "total_bytes": sample.total_bytes,
            "documents": sample.documents,
            "chunks": sample.chunks,
            "tokens": sample.tokens,
            "bad_records": sample.bad_records,
            "seconds": round(sample.seconds, 3),
        },
        mean_chunk_tokens=sample.tokens / sample.chunks if sample.chunks else 0.0,
        max_seq_length=profile.max_seq_length,
        dtype=job.model.dtype,
        projected=rate.projected,
        usd_per_million_tokens=None if price is None else price / (rate.tokens_per_second * 3600.0 / 1e6),
    )
