"""How vectors are stored: ``output.vector_dtype`` (float32, float16, int8, binary).

The encoder always produces float32 vectors; the sink boundary (``embedder.schema.chunks_to_table``)
stores them in the output's dtype, and every reader (search, validate, the LanceDB embedding
function) quantizes queries the same way, with the parameters recorded in the schema's provenance
(``quantization``), never recomputed:

* ``float32``: ``fixed_size_list<float32>[dim]``, as the model made them.
* ``float16``: ``fixed_size_list<float16>[dim]``, half the bytes; within cos 0.99999 of float32.
* ``int8``: ``fixed_size_list<int8>[dim]``, ``round(x * 127)`` clipped to [-127, 127]: one global,
  symmetric scale over the fixed range [-1, 1] (``{"int8": {"scale": 127.0, "range": [-1.0, 1.0]}}``
  in the schema). Why not per-dimension ranges calibrated on a sample (sentence-transformers'
  ``quantize_embeddings``)? (1) A fixed range is identical on every machine, resume and run, with no
  sample to choose or keep; every component of a unit vector lies in it, so nothing clips. (2) One
  scale for all dimensions keeps geometry: the cosine of two int8 vectors is the cosine of the
  vectors (up to rounding), so queries quantized the same way are scored by plain cosine; a per-
  dimension offset would reweight dimensions and need dequantizing before every dot product. The
  cost is resolution: cos to float32 is ~0.999 at 384 dims and ~0.997 at 1024 (measured in
  ``benchmarks/bench_vector_dtypes.py``). Only models that normalize their vectors may use it.
* ``binary``: ``fixed_size_list<uint8>[ceil(dim / 8)]``, the sign bits (``x > 0``) packed big-endian,
  eight dimensions a byte: exactly sentence-transformers' ``quantize_embeddings(..., "ubinary")``.
  Searched by Hamming distance (LanceDB's ``hamming`` metric on uint8 vectors; Parquet: popcount of
  the XOR); the score of a hit is the fraction of equal bits, ``1 - hamming / dim``.

Example:
    >>> stored = quantize(np.array([[0.6, -0.8]], np.float32), "int8")
    >>> stored.tolist()
    [[76, -102]]
    >>> [round(float(x), 3) for x in dequantize(stored, "int8", 2)[0]]
    [0.598, -0.803]
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

VectorDtype = Literal["float32", "float16", "int8", "binary"]
VECTOR_DTYPES: tuple[str, ...] = get_args(VectorDtype)

INT8_SCALE = 127.0
"""int8 codes per unit: ``round(x * 127)``; a unit vector's components all lie in [-1, 1]."""

_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "binary": pa.uint8()}


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is a valid vector dtype, else a ValueError listing the valid ones."""
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"Invalid vector dtype {dtype!r}. Valid: {', '.join(VECTOR_DTYPES)}")
    return dtype


def value_type(dtype: str) -> pa.DataType:
    """The Arrow type of one stored value."""
    return _VALUE_TYPES[check_dtype(dtype)]


def stored_width(dim: int, dtype: str) -> int:
    """Values per stored vector: ``dim``, or ``ceil(dim / 8)`` bytes of bits for binary."""
    return -(-dim // 8) if check_dtype(dtype) == "binary" else dim


def quantization_params(dtype: str) -> dict[str, Any] | None:
    """What readers need to quantize queries as the rows were (stored in the provenance), or None."""
    if dtype == "int8":
        return {"int8": {"scale": INT8_SCALE, "range": [-1.0, 1.0]}}
    if dtype == "binary":
        return {"binary": {"threshold": 0.0, "packing": "numpy.packbits big-endian (ubinary)"}}
    return None


def int8_scale(params: dict[str, Any] | None) -> float:
    """The int8 scale recorded in a provenance's ``quantization`` (the default for older outputs)."""
    return float(((params or {}).get("int8") or {}).get("scale", INT8_SCALE))


def quantize(vectors: np.ndarray, dtype: str, params: dict[str, Any] | None = None) -> np.ndarray:
    """``[n, dim]`` float vectors as stored: ``[n, stored_width(dim, dtype)]`` of the dtype's numpy type."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    dtype = check_dtype(dtype)
    if dtype == "float32":
        return vectors
    if dtype == "float16":
        return vectors.astype(np.float16)
    if dtype == "int8":
        scaled = np.rint(np.nan_to_num(vectors) * int8_scale(params))
        return np.clip(scaled, -127, 127).astype(np.int8)
    return np.packbits(vectors > 0, axis=1)


def dequantize(stored: np.ndarray, dtype: str, dim: int, params: dict[str, Any] | None = None) -> np.ndarray:
    """Float32 ``[n, dim]`` approximations of stored vectors (binary: ±1 per bit)."""
    stored = np.asarray(stored)
    if dtype == "binary":
        bits = np.unpackbits(stored.astype(np.uint8).reshape(len(stored), -1), axis=1, count=dim)
        return bits.astype(np.float32) * 2.0 - 1.0
    if dtype == "int8":
        return stored.astype(np.float32) / int8_scale(params)
    return stored.astype(np.float32)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def hamming(stored: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of each packed row of ``stored`` (``[n, bytes]`` uint8) to a packed query."""
    if not len(stored):
        return np.zeros(0, dtype=np.int64)
    return _POPCOUNT[np.bitwise_xor(stored, query.reshape(1, -1))].sum(axis=1, dtype=np.int64)


def similarity(stored: np.ndarray, query: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """Scores of stored rows against a query quantized the same way (higher is closer).

    float32, float16, int8: cosine (0 for a zero row); binary: ``1 - hamming / dim``.
    """
    if dtype == "binary":
        return 1.0 - hamming(stored.astype(np.uint8, copy=False), query.astype(np.uint8)) / float(dim)
    matrix = stored.astype(np.float32, copy=False)
    q = query.astype(np.float32).reshape(-1)
    q = q / (np.linalg.norm(q) or 1.0)
    norms = np.linalg.norm(matrix, axis=1)
    return (matrix @ q).astype(np.float64) / np.where(norms == 0, 1.0, norms)


def fidelity_bound(dtype: str, min_cosine: float) -> float:
    """The least agreement with a float32 reference that a stored vector of ``dtype`` must reach.

    float32/float16: ``min_cosine`` (half floats cost < 1e-5 of cosine). int8: 0.99 (rounding costs
    ~0.001 at 384 dims, ~0.003 at 1024, on top of the compute dtype's error). binary: 0.97 of the bits
    equal to the reference's signs (only components within rounding of zero may flip).
    """
    if dtype == "int8":
        return min(min_cosine, 0.99)
    if dtype == "binary":
        return min(min_cosine, 0.97)
    return min_cosine


def agreement(stored: np.ndarray, reference: np.ndarray, dtype: str, params: dict[str, Any] | None = None) -> np.ndarray:
    """Per row, how well stored vectors match float reference vectors (compared with ``fidelity_bound``).

    float32/float16/int8: cosine of the dequantized vector to the reference; binary: the fraction of
    bits equal to the reference's sign bits.
    """
    dim = reference.shape[1]
    if dtype == "binary":
        mine = np.unpackbits(np.asarray(stored, np.uint8).reshape(len(stored), -1), axis=1, count=dim)
        return (mine == (reference > 0)).mean(axis=1)
    vectors = dequantize(stored, dtype, dim, params)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return np.sum(vectors * reference, axis=1) / np.maximum(norms, 1e-12)
