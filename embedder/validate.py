"""Vector validation: canaries re-embedded with the reference path, and sanity checks on vectors.

Every run keeps a small uniform sample of the chunks it wrote (``validation.canary_samples``) and,
at the end, re-embeds their text with ``SentenceTransformer.encode`` in fp32 on the CPU — the
reference implementation, independent of our padding-free forward — and compares. A canary below
``validation.min_cosine`` fails the run loudly, naming the chunks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_REFERENCE_MODELS: dict[tuple[str, bool], Any] = {}


class CanaryFailed(RuntimeError):
    """Canary vectors disagree with the reference implementation."""


@dataclass(slots=True)
class CanaryReport:
    """Cosine of each canary to its reference vector."""

    count: int = 0
    min_cosine: float | None = None
    mean_cosine: float | None = None
    worst: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine,
                "worst": [list(w) for w in self.worst]}


class CanarySampler:
    """A uniform sample (reservoir) of written chunks: id, text, vector. Deterministic per run.

    Args:
        size: How many to keep (0 keeps none).
        seed: Seed of the sampling.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self.samples: list[tuple[str, str, np.ndarray]] = []
        self._rng = random.Random(seed)

    def offer(self, chunk_id: str, text: str, vector: np.ndarray) -> None:
        if self.size <= 0:
            return
        self.seen += 1
        if len(self.samples) < self.size:
            self.samples.append((chunk_id, text, np.array(vector, dtype=np.float32)))
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.samples[j] = (chunk_id, text, np.array(vector, dtype=np.float32))


def reference_model(source: str, trust_remote_code: bool = False) -> Any:
    """The model as plain sentence-transformers loads it, fp32 on CPU (cached per process)."""
    key = (source, trust_remote_code)
    if key not in _REFERENCE_MODELS:
        from sentence_transformers import SentenceTransformer

        _REFERENCE_MODELS[key] = SentenceTransformer(source, device="cpu", trust_remote_code=trust_remote_code)
    return _REFERENCE_MODELS[key]


def reference_vectors(source: str, texts: list[str], prompt: str, trust_remote_code: bool = False) -> np.ndarray:
    """``SentenceTransformer.encode(texts, prompt=prompt)`` in fp32 on CPU, L2-normalized."""
    model = reference_model(source, trust_remote_code)
    vectors = model.encode(texts, prompt=prompt or None, batch_size=16, convert_to_numpy=True)
    return _unit(np.asarray(vectors, dtype=np.float32))


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def compare(ids: list[str], vectors: np.ndarray, reference: np.ndarray) -> CanaryReport:
    """Cosines between ``vectors`` and ``reference`` (row by row)."""
    if not ids:
        return CanaryReport()
    cos = np.sum(_unit(np.asarray(vectors, dtype=np.float32)) * reference, axis=1)
    order = np.argsort(cos)
    return CanaryReport(
        count=len(ids),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        worst=[(ids[i], float(cos[i])) for i in order[:5]],
    )


def check_canaries(
    sampler: CanarySampler, source: str, prompt: str, min_cosine: float, trust_remote_code: bool = False
) -> CanaryReport:
    """Re-embeds the sampled chunks with the reference path and compares.

    Raises:
        CanaryFailed: when a canary's cosine is below ``min_cosine``, naming the worst chunks.
    """
    if not sampler.samples:
        return CanaryReport()
    ids = [s[0] for s in sampler.samples]
    reference = reference_vectors(source, [s[1] for s in sampler.samples], prompt, trust_remote_code)
    report = compare(ids, np.stack([s[2] for s in sampler.samples]), reference)
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
