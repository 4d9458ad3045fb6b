"""Search over what a job wrote: nearest chunks to a query by cosine similarity, full-text (BM25)
matches, or both fused (hybrid).

``open_index`` finds out which sink wrote ``uri`` (a LanceDB database holding the table, or
``part-*.parquet`` files), reads the provenance stored in the schema, and returns an ``Index``.
Queries are embedded with ``embed_query`` when given, else with the model named in the provenance
(``embedder.models.encoder.Encoder``, loaded on the first query, with the model's query prompt).

* LanceDB: ``table.search(vector).distance_type("cosine")``: exact flat search on small tables, the
  ANN index ``finish`` built on large ones (with the probes/re-ranking of
  ``indexes.lance.vector_index_for``); filters are Lance SQL predicates (``title = 'Paris'``),
  applied before the nearest-neighbour search. Full text: the table's native FTS index on ``text``.
* Parquet: brute force with numpy, streamed batch by batch with a running top-k, so memory stays
  bounded; filters are the SQL subset of ``indexes.parquet.parse_filter`` (comparisons, IN, IS NULL,
  LIKE, AND/OR/NOT), which means the same as in Lance, or a ``pyarrow.compute`` expression. It reads
  every vector per query: fine for the corpora people search from local Parquet, not for billions.
  Full text: ``bm25_search``, two streamed passes over ``text`` (also Lance's fallback for tables
  written without an FTS index).

Modes (``Index.search(query, k, filter, mode=...)``):

* ``vector`` (default): the query embedded with the model's query prompt; score = cosine.
* ``fts``: BM25 over ``text``; score = BM25 (Lance's English stemming and stop words; the Parquet
  scan lower-cases, drops stop words and folds plurals). Finds exact names and rare terms that
  embeddings blur.
* ``hybrid``: both, fused by reciprocal rank (``rrf``: ``sum 1 / (60 + rank)``, the constant of
  Cormack et al. 2009); score = the fused score. Robust to the two scores' different scales.

Example:
    >>> index = open_index("out/db")
    >>> for hit in index.search("who painted the Mona Lisa?", k=3, filter="title != 'Louvre'"):
    ...     print(f"{hit.score:.3f} {hit.title}: {hit.text[:60]}")
"""

from __future__ import annotations

import difflib
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedder.errors import UsageError
from embedder.quantize import quantize, similarity
from embedder.schema import BASE_COLUMNS, provenance_of, vector_dim_of, vector_dtype_of
from embedder.storage import filesystem, is_local, join
from indexes.lance import (
    VECTOR_INDEX_NAME,
    VectorIndexPlan,
    connect_database,
    index_kind,
    sql_string,
    table_exists,
    vector_index_for,
)
from indexes.parquet import PART_GLOB, FilterError, filter_columns, open_dataset, parse_filter, to_expression

if TYPE_CHECKING:
    import fsspec

QueryEmbedder = Callable[[str], np.ndarray]
SearchMode = Literal["vector", "hybrid", "fts"]
_T = TypeVar("_T")
HIT_COLUMNS = ["id", "doc_id", "chunk_index", "title", "text"]
SCAN_BATCH_ROWS = 16_384

RRF_K = 60
"""Reciprocal-rank-fusion constant (Cormack, Clarke & Büttcher 2009): damps the top ranks' weight."""

HYBRID_CANDIDATES = 50
"""Hits each side (vector, full text) contributes to a hybrid search, at least ``k``."""

HNSW_QUERY_EF = 128
"""HNSW beam width at query time (at least ``k``): recall ~0.99 at k=10 with m=16 graphs."""

BM25_K1, BM25_B = 1.2, 0.75
"""The usual BM25 constants (term-frequency saturation, length normalization)."""

STOP_WORDS = frozenset(
    "a an and are as at be but by for from has have how i in is it its of on or that the this to was "
    "were what when where which who whom why will with does do did can".split()
)
"""Words ``bm25_search`` ignores (question words included: queries are often questions)."""


class SearchError(UsageError, LookupError):
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
        score: Higher is closer. ``vector`` search: cosine similarity to the query (1.0 for the
            same direction); ``fts``: BM25; ``hybrid``: the reciprocal-rank-fusion score.
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
        dim: Vector size (of the model, or its ``truncate_dim``).
        vector_dtype: How the vectors are stored (``embedder.quantize``); queries are quantized the
            same way: float32/float16/int8 hits score by cosine, binary ones by ``1 - hamming / dim``.
    """

    kind: str = ""

    def __init__(self, uri: str, schema: pa.Schema, embed_query: QueryEmbedder | None) -> None:
        self.uri = uri
        self.schema = schema
        self.provenance = provenance_of(schema)
        self.dim = vector_dim_of(schema)
        self.vector_dtype = vector_dtype_of(schema)
        self.quantization = self.provenance.get("quantization")
        self.metadata_columns = [f.name for f in schema if f.name not in BASE_COLUMNS]
        self._embed_query = embed_query or _encoder_query_embedder(self.provenance)

    def search(self, query: str, k: int = 5, filter: str | None = None, mode: SearchMode = "vector") -> list[Hit]:
        """The ``k`` chunks that best match ``query``, best first, among rows matching ``filter``.

        Args:
            query: Natural-language text (embedded with the model's query prompt for
                ``vector``/``hybrid``; matched word by word for ``fts``/``hybrid``).
            k: Number of hits.
            filter: A SQL predicate on the columns (``"title = 'Albedo'"``), applied first.
            mode: ``vector`` (cosine), ``fts`` (BM25 over ``text``) or ``hybrid`` (both, fused by
                reciprocal rank).

        Raises:
            SearchError: an unknown mode, a filter that does not parse or names an unknown column, or a
                query vector of the wrong size.
        """
        if mode not in get_args(SearchMode):
            raise SearchError(f"Invalid search mode {mode!r}. Valid: {', '.join(get_args(SearchMode))}")
        self.check_filter(filter)
        if mode == "vector":
            return self.search_vector(self.embed(query), k=k, filter=filter)
        if mode == "fts":
            return self.search_text(query, k=k, filter=filter)
        if k <= 0:
            return []
        depth = max(k, HYBRID_CANDIDATES)
        by_vector = self.search_vector(self.embed(query), k=depth, filter=filter)
        by_text = self.search_text(query, k=depth, filter=filter)
        hits = {h.id: h for h in by_text} | {h.id: h for h in by_vector}
        fused = rrf([[h.id for h in by_vector], [h.id for h in by_text]])
        return [replace(hits[hit_id], score=score) for hit_id, score in fused[:k]]

    def check_filter(self, filter: str | pc.Expression | None) -> None:
        """Checks a filter string against the table before any query runs (``search`` calls it before
        it loads the model to embed the query), so a typo costs a one-line error, not a library trace.

        Raises:
            SearchError: the filter names a column the table lacks (the message lists its columns), or
                does not parse (the library's message, on one line).
        """
        if isinstance(filter, str) and filter.strip():
            self._check_filter(filter)

    @abstractmethod
    def _check_filter(self, filter: str) -> None:
        """Raises ``SearchError`` for a filter string this index cannot apply."""

    def _unknown_column(self, name: str) -> SearchError:
        columns = self.schema.names
        close = difflib.get_close_matches(name, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return SearchError(f"unknown column {name!r} in --filter{hint}; columns: {', '.join(columns)}")

    def embed(self, query: str | Sequence[str]) -> np.ndarray:
        """The query's vector (``[dim]``), or one vector per query of a list (``[n, dim]``), with the
        index's model and query prompt, checked against the index's dimension."""
        if isinstance(query, str):
            vectors = np.asarray(self._embed_query(query), dtype=np.float32).reshape(1, -1)
        else:
            queries = list(query)
            embed_many = getattr(self._embed_query, "embed_many", None)
            if not queries:
                vectors = np.zeros((0, self.dim), dtype=np.float32)
            elif embed_many is not None:
                vectors = np.asarray(embed_many(queries), dtype=np.float32).reshape(len(queries), -1)
            else:
                vectors = np.stack([np.asarray(self._embed_query(q), dtype=np.float32).reshape(-1) for q in queries])
        if vectors.shape[1] != self.dim:
            raise SearchError(
                f"the query vector has {vectors.shape[1]} dims but {self.uri} holds {self.dim}-dim vectors "
                f"of {self.provenance.get('model', 'an unknown model')!r}; embed queries with that model"
            )
        return vectors[0] if isinstance(query, str) else vectors

    @abstractmethod
    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | None = None) -> list[Hit]:
        """The ``k`` rows closest to ``vector`` (float32, quantized here as the rows were) by cosine
        (binary outputs: by Hamming distance), best first."""

    def stored_query(self, vector: np.ndarray) -> np.ndarray:
        """A float query vector as the rows are stored (``embedder.quantize.quantize``)."""
        return quantize(np.asarray(vector, dtype=np.float32).reshape(1, -1), self.vector_dtype, self.quantization)[0]

    def _scan_top_k(self, batches: Iterable[pa.RecordBatch], vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Exact search over ``(id, vector)`` batches with a running top-k: ``(id, score)`` pairs."""
        query = self.stored_query(vector)
        width = query.shape[0]
        best_ids: list[str] = []
        best_scores = np.empty(0, dtype=np.float64)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            scores = similarity(_matrix(batch.column("vector"), width), query, self.vector_dtype, self.dim)
            keep = _top(scores, k)
            best_ids += batch.column("id").take(pa.array(keep)).to_pylist()
            best_scores = np.concatenate([best_scores, scores[keep]])
            if len(best_ids) > k:
                keep = _top(best_scores, k)
                best_ids, best_scores = [best_ids[i] for i in keep], best_scores[keep]
        return list(zip(best_ids, best_scores.tolist()))

    @abstractmethod
    def search_text(self, query: str, k: int = 5, filter: str | None = None) -> list[Hit]:
        """The ``k`` rows whose ``text`` best matches ``query`` by BM25, best first."""

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

    def _rows_for(self, scored: list[tuple[str, float]], read: Callable[[list[str]], pa.Table]) -> list[Hit]:
        """Hits for ``(id, score)`` pairs, reading their rows with ``read(ids)``."""
        if not scored:
            return []
        score_of = dict(scored)
        rows = read(list(score_of))
        return self._hits(rows, np.array([score_of[i] for i in rows.column("id").to_pylist()], dtype=np.float64))


class LanceIndex(Index):
    """Search over a LanceDB table: its ANN index when ``finish`` built one (else exact cosine), and
    its full-text index on ``text`` (else a BM25 scan)."""

    kind = "lance"

    def __init__(self, table: Any, uri: str, embed_query: QueryEmbedder | None) -> None:
        super().__init__(uri, table.schema, embed_query)
        self.table = table
        self._reading(self._inspect, refresh=False)

    def _inspect(self) -> None:
        """Reads which indexes the table's version has (they change when a run's ``finish`` builds them)."""
        indexes = {idx.name: idx for idx in self.table.list_indices()}
        self.vector_plan = self._vector_plan(indexes)
        self.has_text_index = any(idx.columns == ["text"] and idx.index_type == "FTS" for idx in indexes.values())

    def _reading(self, read: Callable[[], _T], refresh: bool = True) -> _T:
        """``read()``, again on the latest version when the one it read was cleaned away meanwhile.

        A run's ``finish`` compacts the table and then deletes the files of every older version
        (``cleanup_old_versions``), and its periodic prune drops old versions too; a reader that
        opened the table before (``embedder search`` opens it, then loads the model) gets Lance's
        "Not found" for a data file or manifest of its version. That error alone (``version_cleaned``:
        a file of this table's own ``data/``, ``_versions/``, ``_indices/`` or ``_deletions/``) moves
        the table to its latest version and reads again, up to ``READ_ATTEMPTS`` times with a short
        backoff; any other error is raised as it is.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                if attempt:
                    time.sleep(READ_BACKOFF_S * 4 ** (attempt - 1))
                    self.table.checkout_latest()
                    if refresh:
                        self._inspect()
                return read()
            except (OSError, RuntimeError, ValueError) as err:  # how Lance surfaces a missing object
                if attempt == READ_ATTEMPTS - 1 or not version_cleaned(err, self.table.name):
                    raise
        raise AssertionError("unreachable")

    def _vector_plan(self, indexes: dict[str, Any]) -> VectorIndexPlan | None:
        """How queries use the table's vector index (None: no index, exact search)."""
        index = indexes.get(VECTOR_INDEX_NAME) or next((i for i in indexes.values() if i.columns == ["vector"]), None)
        if index is None or index_kind(index.index_type) not in ("IVF_PQ", "IVF_HNSW_SQ", "IVF_FLAT"):
            return None
        rows = self.table.index_stats(index.name).num_indexed_rows
        return vector_index_for(index_kind(index.index_type), rows, self.dim)

    def _check_filter(self, filter: str) -> None:
        # Planning the scan (no rows read) makes Lance parse the SQL and resolve its columns.
        try:
            self._reading(lambda: self.table.to_lance().scanner(filter=filter, columns=["id"], limit=0).explain_plan())
        except ValueError as err:  # how Lance reports a predicate it cannot plan
            if version_cleaned(err, self.table.name):
                raise
            missing = _LANCE_NO_FIELD.search(str(err))
            if missing:
                raise self._unknown_column(missing.group(1)) from None
            raise SearchError(f"invalid --filter {filter!r}: {_one_line(str(err))}") from None

    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | None = None) -> list[Hit]:
        if k <= 0:
            return []
        return self._reading(lambda: self._search_vector(vector, k, filter))

    def _search_vector(self, vector: np.ndarray, k: int, filter: str | None) -> list[Hit]:
        if self.vector_dtype == "int8":  # Lance searches only float and packed-bit vectors: exact scan
            dataset = self.table.to_lance()
            top = self._scan_top_k(dataset.to_batches(columns=["id", "vector"], filter=filter), vector, k)
            return self._rows_for(
                top, lambda ids: dataset.to_table(columns=HIT_COLUMNS + self.metadata_columns, filter=_id_in(ids))
            )
        binary = self.vector_dtype == "binary"
        query = (
            self.table.search(self.stored_query(vector), vector_column_name="vector")
            .distance_type("hamming" if binary else "cosine")
            .select([*HIT_COLUMNS, *self.metadata_columns, "_distance"])
            .limit(k)
        )
        plan = self.vector_plan
        if plan is not None:
            query = query.nprobes(plan.nprobes)
            if plan.refine_factor:
                query = query.refine_factor(plan.refine_factor)
            if plan.kind == "IVF_HNSW_SQ":
                query = query.ef(max(HNSW_QUERY_EF, k))
        if filter:
            query = query.where(filter, prefilter=True)
        rows = query.to_arrow()
        distances = rows.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
        return self._hits(rows, 1.0 - (distances / self.dim if binary else distances))

    def search_text(self, query: str, k: int = 5, filter: str | None = None) -> list[Hit]:
        if k <= 0 or not query_terms(query):
            return []
        return self._reading(lambda: self._search_text(query, k, filter))

    def _search_text(self, query: str, k: int, filter: str | None) -> list[Hit]:
        if not self.has_text_index:
            dataset = self.table.to_lance()
            top = bm25_search(lambda columns: dataset.to_batches(columns=columns, filter=filter), query, k)
            return self._rows_for(
                top, lambda ids: dataset.to_table(columns=HIT_COLUMNS + self.metadata_columns, filter=_id_in(ids))
            )
        search = (
            self.table.search(query, query_type="fts", fts_columns="text")
            .select([*HIT_COLUMNS, *self.metadata_columns])
            .limit(k)
        )
        if filter:
            search = search.where(filter, prefilter=True)
        rows = search.to_arrow()
        return self._hits(rows, rows.column("_score").to_numpy(zero_copy_only=False).astype(np.float64))

    def count_rows(self) -> int:
        return self._reading(self.table.count_rows)


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

    def _check_filter(self, filter: str) -> None:
        try:
            columns = filter_columns(filter)
        except FilterError as err:
            raise SearchError(str(err)) from None
        for name in columns:
            if name not in self.schema.names:
                raise self._unknown_column(name)
        import pyarrow.dataset as pads

        # Binding to the schema (of an empty table: no file is opened) finds type mismatches too.
        try:
            pads.dataset(self.schema.empty_table()).scanner(filter=parse_filter(filter), columns=[])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise SearchError(f"invalid --filter {filter!r}: {_one_line(str(err))}") from None

    def search_vector(self, vector: np.ndarray, k: int = 5, filter: str | pc.Expression | None = None) -> list[Hit]:
        if k <= 0:
            return []
        dataset = open_dataset(self.fs, self.root)
        if dataset is None:
            return []
        # Pass 1 reads ids and vectors only, keeping a running top-k; pass 2 reads the k rows' text.
        expression = to_expression(filter)
        batches = dataset.to_batches(columns=["id", "vector"], filter=expression, batch_size=SCAN_BATCH_ROWS)
        top = self._scan_top_k(batches, vector, k)
        return self._rows_for(
            top, lambda ids: dataset.to_table(columns=HIT_COLUMNS + self.metadata_columns, filter=pc.field("id").isin(ids))
        )

    def search_text(self, query: str, k: int = 5, filter: str | pc.Expression | None = None) -> list[Hit]:
        dataset = open_dataset(self.fs, self.root)
        if dataset is None or k <= 0:
            return []
        expression = to_expression(filter)
        top = bm25_search(
            lambda columns: dataset.to_batches(columns=columns, filter=expression, batch_size=SCAN_BATCH_ROWS), query, k
        )
        return self._rows_for(
            top, lambda ids: dataset.to_table(columns=HIT_COLUMNS + self.metadata_columns, filter=pc.field("id").isin(ids))
        )

    def count_rows(self) -> int:
        dataset = open_dataset(self.fs, self.root)
        return 0 if dataset is None else dataset.count_rows()


def rrf(rankings: Iterable[list[str]], k0: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: ``score(id) = sum over rankings of 1 / (k0 + rank)`` (rank from 1).

    Returns ``(id, score)`` best first (ties by id). Scale-free: cosine and BM25 never mix.
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k0 + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


def _fold(word: str) -> str:
    """A light plural fold (``measures`` → ``measure``; ``glass`` stays) for the BM25 scan."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def query_terms(query: str) -> list[str]:
    """The distinct words of ``query`` that ``bm25_search`` matches: lower-cased, stop words dropped,
    plurals folded."""
    words = (_fold(w) for w in re.findall(r"\w+", query.lower()) if w not in STOP_WORDS)
    return list(dict.fromkeys(w for w in words if w))


def bm25_search(
    scan: Callable[[list[str]], Iterable[pa.RecordBatch]], query: str, k: int
) -> list[tuple[str, float]]:
    """BM25 over the ``text`` of every row ``scan`` yields; returns the ``k`` best ``(id, score)``.

    Two streamed passes, so memory stays bounded whatever the table size: the first counts rows,
    words and each term's document frequency, the second scores rows and keeps a running top-k.
    Matching is vectorized in Arrow (``count_substring_regex``): a term matches a whole word, case
    folded, plural or not.

    Args:
        scan: ``columns -> record batches`` of the (filtered) rows; called twice.
        query: The query text (see ``query_terms``).
        k: Number of results.
    """
    terms = query_terms(query)
    if not terms or k <= 0:
        return []
    patterns = [rf"\b{re.escape(t)}(?:s|es)?\b" for t in terms]

    def term_counts(text: pa.Array) -> list[np.ndarray]:
        return [
            pc.fill_null(pc.count_substring_regex(text, p, ignore_case=True), 0).to_numpy(zero_copy_only=False)
            for p in patterns
        ]

    def word_counts(text: pa.Array) -> np.ndarray:
        return pc.fill_null(pc.count_substring_regex(text, r"\w+"), 0).to_numpy(zero_copy_only=False)

    rows, words = 0, 0
    df = np.zeros(len(terms), dtype=np.float64)
    for batch in scan(["text"]):
        text = batch.column("text")
        rows += batch.num_rows
        words += int(word_counts(text).sum())
        df += [np.count_nonzero(c) for c in term_counts(text)]
    if rows == 0 or not df.any():
        return []
    idf = np.log1p((rows - df + 0.5) / (df + 0.5))
    average = max(words / rows, 1.0)
    best_ids: list[str] = []
    best = np.empty(0, dtype=np.float64)
    for batch in scan(["id", "text"]):
        text = batch.column("text")
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * word_counts(text) / average)
        scores = np.zeros(batch.num_rows, dtype=np.float64)
        for weight, tf in zip(idf, term_counts(text)):
            scores += weight * tf * (BM25_K1 + 1.0) / (tf + norm)
        matched = np.flatnonzero(scores > 0)
        if not len(matched):
            continue
        keep = matched[_top(scores[matched], k)]
        best_ids += batch.column("id").take(pa.array(keep)).to_pylist()
        best = np.concatenate([best, scores[keep]])
        if len(best_ids) > k:
            keep = _top(best, k)
            best_ids, best = [best_ids[i] for i in keep], best[keep]
    return sorted(zip(best_ids, best.tolist()), key=lambda pair: (-pair[1], pair[0]))


READ_ATTEMPTS = 4
"""Reads of a Lance table whose version was cleaned away meanwhile: the first and three retries."""

READ_BACKOFF_S = 0.05
"""Sleep before the first retry; each later one waits 4 times longer (0.05, 0.2, 0.8 s)."""


def version_cleaned(err: BaseException, table: str) -> bool:
    """Whether ``err`` is Lance's "not found" for a file of ``table``'s own dataset (a data file,
    manifest, index or deletion file of a version that a cleanup removed), and nothing else.

    Lance words it ``lance error: ... Not found: <db>/<table>.lance/data/<file>.lance`` for a data
    file and ``Dataset at path <db>/<table>.lance/_versions/<n>.manifest was not found`` for a
    manifest; object stores say ``Object at location <...>/<table>.lance/data/... not found``.
    """
    return bool(
        re.search(r"not found", str(err), re.IGNORECASE)
        and re.search(rf"(?:^|[/\s:]){re.escape(table)}\.lance/(?:data|_versions|_indices|_deletions)/", str(err))
    )


_LANCE_NO_FIELD = re.compile(r'No field named "?([^".,\s]+)"?')
"""DataFusion's schema error for a column the table lacks (``No field named nosuch.``)."""


def _one_line(message: str) -> str:
    """A library error on one line: no Rust source locations, no repeated ``Invalid input`` prefixes."""
    message = re.sub(r",?\s*/\S+\.rs:\d+:\d+", "", message)
    message = re.sub(r"^(?:Invalid (?:user )?input[,:]?\s*)+", "", message.strip())
    return " ".join(message.split())


def _id_in(ids: list[str]) -> str:
    """A Lance SQL predicate selecting rows by id."""
    return f"id IN ({', '.join(sql_string(i) for i in ids)})"


def _matrix(vectors: pa.FixedSizeListArray, width: int) -> np.ndarray:
    """The stored vectors as a ``[n, width]`` array of their own type (zero rows for null vectors)."""
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if vectors.null_count:
        # flatten() drops null lists; put zero rows back where they were.
        full = np.zeros((len(vectors), width), dtype=matrix.dtype)
        full[vectors.is_valid().to_numpy(zero_copy_only=False)] = matrix
        matrix = full
    return matrix


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores (any order)."""
    if len(scores) <= k:
        return np.arange(len(scores))
    return np.argpartition(-scores, k - 1)[:k]


def _encoder_query_embedder(provenance: Mapping[str, Any]) -> QueryEmbedder:
    """Embeds queries with the model that wrote the index; the model loads on the first query (and
    is shared with ``embedder.embed``'s cache: ``embedder.api.encoder_for``). ``embed_many``
    embeds a list of queries in packed batches."""
    model = provenance.get("model")

    def embed_many(queries: list[str]) -> np.ndarray:
        if not model:
            raise SearchError("the index records no model in its provenance; pass embed_query= to open_index")
        from embedder.api import encoder_for

        encoder = encoder_for(model, device="cpu", truncate_dim=provenance.get("truncate_dim"))
        return np.asarray(encoder.encode_queries(queries), dtype=np.float32)

    def embed(query: str) -> np.ndarray:
        return embed_many([query])[0]

    embed.embed_many = embed_many  # type: ignore[attr-defined]
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
