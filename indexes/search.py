"""Search over what a job wrote: nearest chunks to a query, by cosine similarity.

``open_index`` finds out which sink wrote ``uri`` (a LanceDB database holding the table, or
``part-*.parquet`` files), reads the provenance stored in the schema, and returns an ``Index``.
Queries are embedded with ``embed_query`` when given, else with the model named in the provenance
(``embedder.models.encoder.Encoder``, loaded on the first query, with the model's query prompt).

* LanceDB: ``table.search(vector).distance_type("cosine")`` (exact flat search until an ANN index
  exists); filters are Lance SQL predicates (``title = 'Paris'``).
* Parquet: brute force with numpy, streamed batch by batch with a running top-k, so memory stays
  bounded; filters are the SQL subset of ``indexes.parquet.parse_filter`` (comparisons, IN, IS NULL,
  LIKE, AND/OR/NOT), which means the same as in Lance, or a ``pyarrow.compute`` expression. It reads
  every vector per query: fine for the corpora people search from local Parquet, not for billions.

Example:
    >>> index = open_index("out/db")
    >>> for hit in index.search("who painted the Mona Lisa?", k=3, filter="title != 'Louvre'"):
    ...     print(f"{hit.score:.3f} {hit.title}: {hit.text[:60]}")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedder.schema import BASE_COLUMNS, provenance_of
from embedder.storage import filesystem, is_local, join
from indexes.lance import connect_database, table_exists
from indexes.parquet import PART_GLOB, open_dataset, to_expression

if TYPE_CHECKING:
    import fsspec

QueryEmbedder = Callable[[str], np.ndarray]
HIT_COLUMNS = ["id", "doc_id", "chunk_index", "title", "text"]
SCAN_BATCH_ROWS = 16_384


class SearchError(LookupError):
    """No index at the URI, or a query that does not fit it."""


@dataclass(slots=True)
class Hit:
    """One search result.

    Attributes:
        id: ``doc_id#chunk_index``.
        doc_id: The source document.
        chunk_index: Position of the chunk in its document.
        title: The document title, if any.
        text: The chunk text (as embedded, without prompt).
        score: Cosine similarity to the query, higher is closer (1.0 for the same direction).
        metadata: Passthrough columns of the row (``url``, ...).
    """

    id: str
    doc_id: str
    chunk_index: int
    title: str | None
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


class Index(ABC):
    """A searchable output. Build it with ``open_index``.

    Attributes:
        uri: Where the output is.
        schema: The output schema.
        provenance: What made the vectors (model, weights fingerprint, prompts, chunking...).
        dim: Vector size.
    """

    kind: str = ""

    def __init__(self, uri: str, schema: pa.Schema, embed_query: QueryEmbedder | None) -> None:
        self.uri = uri
        self.schema = schema
        self.provenance = provenance_of(schema)
        self.dim = schema.field("vector").type.list_size
        self.metadata_columns = [f.name for f in schema if f.name not in BASE_COLUMNS]
        self._embed_query = embed_query or _encoder_query_embedder(self.provenance)

    def search(self, query: str, k: int = 5, filter: str | None = None) -> list[Hit]:
        """The ``k`` chunks closest to ``query``, best first, among rows matching ``filter``."""
        return self.search_vector(self.embed(query), k=k, filter=filter)

    def embed(self, query: str) -> np.ndarray:
        """The query's vector, checked against the index's dimension."""
        vector = np.asarray(self._embed_query(query), dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise SearchError(
                f"the query vector has {vector.shape[0]} dims but {self.uri} holds {self.dim}-dim vectors "
                f"of {self.provenance.get('model', 'an unknown model')!r}; embed queries with that model"
            )
        return vector

    @abstractmethod
    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | None = None) -> list[Hit]:
        """The ``k`` rows closest to ``vector`` by cosine, best first."""

    @abstractmethod
    def count_rows(self) -> int:
        """Rows in the index."""

    def _hits(self, rows: pa.Table, scores: np.ndarray) -> list[Hit]:
        data = rows.select(HIT_COLUMNS + self.metadata_columns).to_pylist()
        hits = [
            Hit(
                id=row["id"],
                doc_id=row["doc_id"],
                chunk_index=row["chunk_index"],
                title=row["title"],
                text=row["text"],
                score=float(score),
                metadata={name: row[name] for name in self.metadata_columns},
            )
            for row, score in zip(data, scores)
        ]
        hits.sort(key=lambda hit: (-hit.score, hit.id))
        return hits


class LanceIndex(Index):
    """Search over a LanceDB table (exact cosine until an ANN index is built)."""

    kind = "lance"

    def __init__(self, table: Any, uri: str, embed_query: QueryEmbedder | None) -> None:
        super().__init__(uri, table.schema, embed_query)
        self.table = table

    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | None = None) -> list[Hit]:
        query = (
            self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .select([*HIT_COLUMNS, *self.metadata_columns, "_distance"])
            .limit(k)
        )
        if filter:
            query = query.where(filter, prefilter=True)
        rows = query.to_arrow()
        scores = 1.0 - rows.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
        return self._hits(rows, scores)

    def count_rows(self) -> int:
        return self.table.count_rows()


class ParquetIndex(Index):
    """Brute-force cosine search over Parquet part files, streamed with a running top-k."""

    kind = "parquet"

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, uri: str, embed_query: QueryEmbedder | None
    ) -> None:
        self.fs = fs
        self.root = root
        dataset = open_dataset(fs, root)
        if dataset is None:
            raise SearchError(f"no {PART_GLOB} files under {uri}")
        super().__init__(uri, dataset.schema, embed_query)

    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | pc.Expression | None = None) -> list[Hit]:
        if k <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        query = query / (np.linalg.norm(query) or 1.0)
        dataset = open_dataset(self.fs, self.root)
        if dataset is None:
            return []
        # Pass 1 reads ids and vectors only, keeping a running top-k; pass 2 reads the k rows' text.
        expression = to_expression(filter)
        best_ids: list[str] = []
        best_scores = np.empty(0, dtype=np.float64)
        for batch in dataset.to_batches(columns=["id", "vector"], filter=expression, batch_size=SCAN_BATCH_ROWS):
            if batch.num_rows == 0:
                continue
            scores = _cosine(batch.column("vector"), query, self.dim)
            keep = _top(scores, k)
            best_ids += batch.column("id").take(pa.array(keep)).to_pylist()
            best_scores = np.concatenate([best_scores, scores[keep]])
            if len(best_ids) > k:
                keep = _top(best_scores, k)
                best_ids, best_scores = [best_ids[i] for i in keep], best_scores[keep]
        if not best_ids:
            return []
        rows = dataset.to_table(columns=HIT_COLUMNS + self.metadata_columns, filter=pc.field("id").isin(best_ids))
        score_of = dict(zip(best_ids, best_scores))
        return self._hits(rows, np.array([score_of[i] for i in rows.column("id").to_pylist()]))

    def count_rows(self) -> int:
        dataset = open_dataset(self.fs, self.root)
        return 0 if dataset is None else dataset.count_rows()


def _cosine(vectors: pa.FixedSizeListArray, query: np.ndarray, dim: int) -> np.ndarray:
    """Cosine of each row with a unit ``query`` (0 for zero or null vectors)."""
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if vectors.null_count:
        # flatten() drops null lists; put zero rows back where they were.
        full = np.zeros((len(vectors), dim), dtype=np.float32)
        full[vectors.is_valid().to_numpy(zero_copy_only=False)] = matrix
        matrix = full
    norms = np.linalg.norm(matrix, axis=1)
    return (matrix @ query).astype(np.float64) / np.where(norms == 0, 1.0, norms)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores (any order)."""
    if len(scores) <= k:
        return np.arange(len(scores))
    return np.argpartition(-scores, k - 1)[:k]


def _encoder_query_embedder(provenance: Mapping[str, Any]) -> QueryEmbedder:
    """Embeds queries with the model that wrote the index; the model loads on the first query."""
    model = provenance.get("model")
    encoder: Any = None

    def embed(query: str) -> np.ndarray:
        nonlocal encoder
        if not model:
            raise SearchError("the index records no model in its provenance; pass embed_query= to open_index")
        if encoder is None:
            from embedder.config import ModelConfig
            from embedder.models.encoder import Encoder

            encoder = Encoder.load(ModelConfig(name=model, device="cpu"))
        return np.asarray(encoder.encode_queries([query])[0], dtype=np.float32)

    return embed


def open_index(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    table: str = "chunks",
    embed_query: QueryEmbedder | None = None,
) -> Index:
    """Opens the output at ``uri`` for search, whichever sink wrote it.

    Args:
        uri: The job's output URI (local path or ``s3://...``).
        storage_options: fsspec options for the URI (as in the job's ``output.storage_options``).
        table: The LanceDB table name.
        embed_query: ``query -> vector`` for the index's model; by default the model recorded in the
            index's provenance, loaded with ``embedder.models.encoder.Encoder`` on first use.

    Raises:
        SearchError: when the URI holds neither a LanceDB table nor Parquet part files.
    """
    fs, root = filesystem(uri, storage_options)
    if not is_local(fs):
        fs.invalidate_cache(root)
    if fs.glob(join(root, PART_GLOB)):
        return ParquetIndex(fs, root, uri, embed_query)
    if fs.exists(join(root, f"{table}.lance")):
        db = connect_database(uri, storage_options)
        if table_exists(db, table):
            return LanceIndex(db.open_table(table), uri, embed_query)
    raise SearchError(
        f"no index at {uri}: expected a LanceDB database with table {table!r} ({table}.lance) "
        f"or {PART_GLOB} files (pass table= if the job named another table)"
    )
