"""Vector validation: canaries re-embedded with the reference path, and sanity checks on vectors.

Every run keeps a small uniform sample of the chunks it wrote (``validation.canary_samples``) and,
at the end, re-embeds their text with ``SentenceTransformer.encode`` in fp32 — the reference
implementation, independent of our padding-free forward — and compares. A canary below
``validation.min_cosine`` fails the run loudly, naming the chunks.

The check must cost little next to the run: the reference runs on the job's GPU when it has one
(fp32 there is still the reference: no TF32, no packing, no fused kernels), and the sample is
bounded in tokens (``validation.canary_max_tokens``), so 32 canaries of a long-context model no longer
take minutes of CPU after a run of seconds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.errors import EmbedderError

_REFERENCE_MODELS: dict[tuple[str, bool], Any] = {}


class CanaryFailed(EmbedderError, RuntimeError):
    """Canary vectors disagree with the reference implementation."""


class FidelityGateFailed(EmbedderError, RuntimeError):
    """FP8 vectors of the calibration sample disagree with bf16: the run stops before writing (exit 1)."""


def check_fidelity(ids: list[str], vectors: np.ndarray, reference: np.ndarray, min_cosine: float) -> dict[str, Any]:
    """The FP8 fidelity gate's comparison: each FP8 vector against its bf16 one.

    Returns:
        ``count``, ``min_cosine``, ``mean_cosine``, ``threshold`` and the ``worst`` chunks.

    Raises:
        FidelityGateFailed: a cosine below ``min_cosine`` (or a NaN), naming the worst chunks and the
            ways out; nothing was written by then.
    """
    report = compare(ids, vectors, _unit(np.asarray(reference, dtype=np.float32)))
    cos = np.sum(_unit(np.asarray(vectors, dtype=np.float32)) * _unit(np.asarray(reference, dtype=np.float32)), axis=1)
    low = int(np.sum(~(cos >= min_cosine)))  # NaN counts as low
    out = {**report.to_dict(), "threshold": min_cosine}
    if low:
        worst = ", ".join(f"{cid} (cos {c:.4f})" for cid, c in report.worst[:3])
        lowest = f"{np.nanmin(cos):.4f}" if np.isfinite(cos).any() else "nan"
        raise FidelityGateFailed(
            f"FP8 fidelity gate failed: {low} of {report.count} calibration chunks (the first batch) embed in float8 "
            f"below validation.min_cosine {min_cosine} against bf16 (min cos {lowest}; worst: {worst}); nothing was "
            "written. Run with model.dtype bfloat16 for this model"
        )
    return out


@dataclass(slots=True)
class CanaryReport:
    """Cosine of each canary to its reference vector."""

    count: int = 0
    min_cosine: float | None = None
    mean_cosine: float | None = None
    worst: list[tuple[str, float]] = field(default_factory=list)
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine,
                "worst": [list(w) for w in self.worst], "tokens": self.tokens}


class CanarySampler:
    """A uniform sample (reservoir) of written chunks: id, text, vector. Deterministic per run.

    Args:
        size: How many to keep (0 keeps none).
        seed: Seed of the sampling.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.samples: list[tuple[str, str, np.ndarray, int]] = []  # id, text, vector, tokens
        self._rng = random.Random(seed)

    def offer(self, chunk_id: str, text: str, vector: np.ndarray, tokens: int = 0) -> None:
        if self.size <= 0:
            return
        self.seen += 1
        if len(self.samples) < self.size:
            self.samples.append((chunk_id, text, np.array(vector, dtype=np.float32), tokens))
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.samples[j] = (chunk_id, text, np.array(vector, dtype=np.float32), tokens)

    def bounded(self, max_tokens: int) -> list[tuple[str, str, np.ndarray, int]]:
        """The samples whose tokens add up to at most ``max_tokens`` (taken in the reservoir's random
        order, skipping any that would overflow; at least the shortest one)."""
        chosen, total = [], 0
        for sample in self.samples:
            if total + sample[3] <= max_tokens:
                chosen.append(sample)
                total += sample[3]
        if not chosen and self.samples:
            chosen = [min(self.samples, key=lambda s: s[3])]
        return chosen


PRELOAD_MAX_BYTES = 4 << 30
"""Weights up to this size are loaded for the canary check while the run embeds (host memory: one fp32
copy of the model); larger models load when the check starts."""

_PRELOADS: dict[tuple[str, bool], concurrent.futures.Future] = {}


def preload_reference(source: str, trust_remote_code: bool = False, weights_bytes: int | None = None) -> bool:
    """Starts loading the reference model on the CPU in a background thread, so the end-of-run canary
    check does not wait for it (it took most of the check for an 8k-token XLM-R-large on an H200).

    Skipped for weights over ``PRELOAD_MAX_BYTES`` or of unknown size. Returns whether it started."""
    key = (source, trust_remote_code)
    if key in _PRELOADS or any(k[:2] == key for k in _REFERENCE_MODELS):
        return True
    if weights_bytes is None or weights_bytes > PRELOAD_MAX_BYTES:
        return False

    def load() -> Any:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(source, device="cpu", trust_remote_code=trust_remote_code)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedder-reference")
    _PRELOADS[key] = pool.submit(load)
    pool.shutdown(wait=False)
    return True


def reference_model(source: str, trust_remote_code: bool = False, device: str = "cpu") -> Any:
    """The model as plain sentence-transformers loads it, fp32 on ``device`` (cached per process; a
    preloaded CPU copy is moved there)."""
    key = (source, trust_remote_code, device)
    if key not in _REFERENCE_MODELS:
        preload = _PRELOADS.pop((source, trust_remote_code), None)
        model = None
        if preload is not None:
            try:
                model = preload.result().to(device)
            except Exception:  # a failed preload: load it here and let that error speak
                model = None
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(source, device=device, trust_remote_code=trust_remote_code)
        _REFERENCE_MODELS[key] = model
    return _REFERENCE_MODELS[key]


REFERENCE_BATCH_TOKENS = 8192
"""Padded tokens per reference batch: sentence-transformers pads a batch to its longest text, and one
8k-token canary among 15 short ones made it compute 16 × 8k tokens in fp32."""


def reference_vectors(
    source: str,
    texts: list[str],
    prompt: str,
    trust_remote_code: bool = False,
    device: str = "cpu",
    lengths: list[int] | None = None,
) -> np.ndarray:
    """``SentenceTransformer.encode(texts, prompt=prompt)`` in fp32 on ``device``, L2-normalized.

    With ``lengths`` (tokens per text), texts are encoded longest first in batches of at most
    ``REFERENCE_BATCH_TOKENS`` padded tokens; without, in batches of 16. On CUDA, TF32 matmuls are
    off for the call: the reference stays true fp32."""
    model = reference_model(source, trust_remote_code, device)
    if lengths is None:
        batches = [list(range(i, min(i + 16, len(texts)))) for i in range(0, len(texts), 16)]
    else:
        batches, batch = [], []
        for i in sorted(range(len(texts)), key=lambda j: -lengths[j]):
            if batch and (len(batch) + 1) * lengths[batch[0]] > REFERENCE_BATCH_TOKENS:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    order = [i for batch in batches for i in batch]
    with _strict_fp32(device):
        parts = [model.encode([texts[i] for i in batch], prompt=prompt or None, batch_size=len(batch),
                              convert_to_numpy=True) for batch in batches]
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = np.concatenate(parts).astype(np.float32, copy=False)
    out = np.empty_like(vectors)
    out[order] = vectors
    return _unit(out)


@contextlib.contextmanager
def _strict_fp32(device: str) -> Iterator[None]:
    if not device.startswith("cuda"):
        yield
        return
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def truncated(reference: np.ndarray, dim: int) -> np.ndarray:
    """Unit reference vectors cut to their first ``dim`` dimensions and made unit again: what
    ``SentenceTransformer(..., truncate_dim=dim)`` then normalizing gives (Matryoshka)."""
    return _unit(np.ascontiguousarray(reference[:, :dim]))


def compare(ids: list[str], vectors: np.ndarray, reference: np.ndarray) -> CanaryReport:
    """Cosines between ``vectors`` and ``reference`` (row by row); a reference wider than the vectors
    (a job with ``model.truncate_dim``) is cut to their width first (``truncated``)."""
    if not ids:
        return CanaryReport()
    vectors = np.asarray(vectors, dtype=np.float32)
    if reference.shape[1] > vectors.shape[1]:
        reference = truncated(reference, vectors.shape[1])
    cos = np.sum(_unit(vectors) * reference, axis=1)
    order = np.argsort(cos)
    return CanaryReport(
        count=len(ids),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        worst=[(ids[i], float(cos[i])) for i in order[:5]],
    )


def check_canaries(
    sampler: CanarySampler,
    source: str,
    prompt: str,
    min_cosine: float,
    trust_remote_code: bool = False,
    device: str = "cpu",
    max_tokens: int | None = None,
) -> CanaryReport:
    """Re-embeds the sampled chunks with the reference path and compares.

    Args:
        device: Where the reference runs (the job's GPU when it has one).
        max_tokens: Bound on the canaries' tokens (None: every sample).

    Raises:
        CanaryFailed: when a canary's cosine is below ``min_cosine``, naming the worst chunks.
    """
    samples = sampler.samples if max_tokens is None else sampler.bounded(max_tokens)
    if not samples:
        return CanaryReport()
    ids = [s[0] for s in samples]
    reference = reference_vectors(
        source, [s[1] for s in samples], prompt, trust_remote_code, device, lengths=[s[3] for s in samples]
    )
    report = compare(ids, np.stack([s[2] for s in samples]), reference)
    report.tokens = sum(s[3] for s in samples)
    if report.min_cosine is not None and report.min_cosine < min_cosine:
        worst = ", ".join(f"{cid} (cos {c:.4f})" for cid, c in report.worst if c < min_cosine)
        raise CanaryFailed(
            f"canary check failed: {sum(1 for _, c in report.worst if c < min_cosine)}+ of {report.count} sampled "
            f"chunks differ from SentenceTransformer.encode (min cos {report.min_cosine:.4f} < {min_cosine}): {worst}. "
            "The vectors written by this run are suspect: check the model, dtype and device"
        )
    return report


def vector_problems(vectors: np.ndarray) -> np.ndarray:
    """Per row: "" when fine, else why the vector must not be written (NaN/Inf, zero norm)."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1)
    out = np.full(len(vectors), "", dtype=object)
    out[~finite] = "vector has NaN or Inf values"
    out[finite & (norms <= 1e-12)] = "vector has zero norm"
    return out
