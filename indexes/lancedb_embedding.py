"""LanceDB-native text search over an embedder output: the ``embedder`` embedding function.

The Lance sink records, in the table's schema metadata (``embedding_functions``, where LanceDB keeps
the embedding function of a table), the function ``embedder`` with the model, prompts, truncation
and storage dtype that made the vectors. So plain LanceDB embeds a text query the way the job
embedded the documents, instead of silently running BM25::

    import embedder  # registers the "embedder" function in LanceDB's registry (cheaply: see below)
    import lancedb

    table = lancedb.connect("out/db").open_table("chunks")
    table.search("who painted the Mona Lisa?").limit(5).to_pandas()

``import embedder`` registers the function without importing LanceDB itself: when LanceDB is not
loaded yet, a one-shot import hook (``embedder.lancedb_hook``) registers it right after LanceDB's
own import. Without ``import embedder`` LanceDB cannot resolve the name and says
``KeyError: 'embedder'`` on a text query (vector queries need no function).

Per vector dtype:

* float32 / float16: the query vector in float32; LanceDB's default metric (L2) ranks unit vectors
  as cosine does (add ``.distance_type("cosine")`` to get cosine distances, and to use the cosine
  ANN index of a large table).
* binary: the query's sign bits packed as the rows are; LanceDB searches uint8 vectors by Hamming
  distance (its default for them), with or without the ``IVF_FLAT`` index.
* int8: refused with a clear error: Lance (0.40) searches only float and packed-bit vector columns;
  use ``embedder search`` / ``embedder.open_index`` (exact int8 cosine), or store float16.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from lancedb.embeddings import TextEmbeddingFunction, get_registry, register
from pydantic import PrivateAttr

from embedder.errors import UsageError
from embedder.schema import provenance_of

FUNCTION_NAME = "embedder"
METADATA_KEY = b"embedding_functions"


class EmbeddingFunctionError(UsageError, ValueError):
    """A query LanceDB cannot be given a vector for (an int8 table, a model that does not load).

    ``status_code`` 403 makes LanceDB's retry wrapper (which retries every other exception up to 7
    times, with exponential backoff: minutes) raise it at once: retrying a local model never helps.
    """

    status_code = 403


@register(FUNCTION_NAME)
class EmbedderEmbeddings(TextEmbeddingFunction):
    """Embeds queries (and documents LanceDB adds itself) as an embedder job did.

    Attributes:
        model: The model (as the job named it, or the directory it was loaded from).
        query_prompt: Prompt put before queries.
        document_prompt: Prompt put before documents (``table.add`` of rows without vectors).
        max_seq_length: The job's sequence limit.
        truncate_dim: Matryoshka dimension, or None for the model's full width.
        vector_dtype: How the table stores vectors (``embedder.quantize``).
        quantization: The stored quantization parameters.
        dim: The vectors' dimension.
        device: Where the model runs (``auto``: the GPU when there is one).
    """

    model: str
    query_prompt: str = ""
    document_prompt: str = ""
    max_seq_length: int | None = None
    truncate_dim: int | None = None
    vector_dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    dim: int = 0
    device: str = "auto"
    _encoder: Any = PrivateAttr(default=None)

    def ndims(self) -> int:
        return self.dim

    def _load(self) -> Any:
        if self._encoder is None:
            from embedder.config import ModelConfig
            from embedder.models.encoder import Encoder

            self._encoder = Encoder.load(
                ModelConfig(
                    name=self.model, device=self.device, query_prompt=self.query_prompt,
                    document_prompt=self.document_prompt, max_seq_length=self.max_seq_length,
                    truncate_dim=self.truncate_dim,
                )
            )
        return self._encoder

    def _stored(self, vectors: np.ndarray) -> list[np.ndarray]:
        from embedder.quantize import quantize

        if self.vector_dtype == "int8":
            raise EmbeddingFunctionError(
                "this table stores int8 vectors, which Lance cannot search by vector; search it with "
                "`embedder search` or embedder.open_index(...).search(...), or embed into output.vector_dtype float16"
            )
        if self.vector_dtype == "binary":
            return list(quantize(vectors, "binary"))
        return list(np.asarray(vectors, dtype=np.float32))

    def compute_query_embeddings(self, query: str, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        if self.vector_dtype == "int8":
            return self._stored(np.zeros((1, self.dim), np.float32))
        return self._stored(self._encode([query], query=True))

    def generate_embeddings(self, texts: Any, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        return self._stored(self._encode([str(t) for t in texts], query=False))

    def _encode(self, texts: list[str], *, query: bool) -> np.ndarray:
        try:
            encoder = self._load()
            return encoder.encode_queries(texts) if query else encoder.encode_texts(texts, encoder.document_prompt)
        except Exception as err:  # raised once, not retried by LanceDB (EmbeddingFunctionError)
            raise EmbeddingFunctionError(f"the embedder function could not embed with {self.model!r}: {err}") from err


def function_config(provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``create`` arguments of the function that embeds like the job of ``provenance``."""
    return {
        "model": str(provenance.get("model") or ""),
        "query_prompt": str(provenance.get("query_prompt") or ""),
        "document_prompt": str(provenance.get("document_prompt") or ""),
        "max_seq_length": provenance.get("max_seq_length"),
        "truncate_dim": provenance.get("truncate_dim"),
        "vector_dtype": str(provenance.get("vector_dtype") or "float32"),
        "quantization": provenance.get("quantization"),
        "dim": int(provenance.get("dim") or 0),
    }


def with_embedding_function(schema: pa.Schema) -> pa.Schema:
    """``schema`` whose metadata names the ``embedder`` function (LanceDB's ``embedding_functions``
    entry, ``source_column`` text, ``vector_column`` vector); unchanged without a model in the provenance."""
    provenance = provenance_of(schema)
    if not provenance.get("model"):
        return schema
    entry = {
        "name": FUNCTION_NAME,
        "model": function_config(provenance),
        "source_column": "text",
        "vector_column": "vector",
    }
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps([entry]).encode()})


def registered() -> bool:
    """Whether LanceDB's registry resolves ``embedder`` (true once this module is imported)."""
    try:
        get_registry().get(FUNCTION_NAME)
    except KeyError:
        return False
    return True
