"""A Ray Data stage: embed a text column of your own Ray pipeline with embedder's padding-free encoder.

For users who already have a ``ray.data.Dataset`` and want vectors in it, not a whole embedder job
(for a corpus on disk, ``embedder run --runner ray`` adds shards, checkpoints and resume: see
docs/ray.md). ``Embed`` is a callable class: Ray Data builds one per actor (the model loads once
per actor, on the GPU Ray gives it) and calls it on every batch.

Example:
    >>> import ray
    >>> from embedder.ray_data import Embed
    >>> ds = ray.data.from_items([{"id": i, "text": f"document {i}"} for i in range(1000)])
    >>> ds = ds.map_batches(
    ...     Embed,
    ...     fn_constructor_kwargs={"model": "BAAI/bge-base-en-v1.5", "text_column": "text"},
    ...     compute=ray.data.ActorPoolStrategy(size=2),   # two encoder actors
    ...     num_gpus=1,                                   # one GPU each
    ...     batch_size=1024,
    ...     batch_format="pyarrow",                       # or "pandas" / "numpy"
    ... )  # doctest: +SKIP
    >>> ds.take(1)[0]["vector"].shape  # doctest: +SKIP
    (768,)

In the Ray version this repo tests (2.60), ``map_batches`` takes the actor pool as
``compute=ray.data.ActorPoolStrategy(size=N)``; its ``concurrency=`` argument is deprecated.
"""

from __future__ import annotations

from typing import Any

from embedder.api import EmbedError, EmbedKind, embed, encoder_for
from embedder.config import ModelConfig


class Embed:
    """Adds a vector column to each batch: one float32 vector per row of ``text_column``.

    The vectors are ``embedder.embed``'s (the packed encoder, the model's document prompt unless
    ``kind="query"`` or ``prompt=`` says otherwise), so they equal what an embedder job stores for
    one-chunk documents. Texts past the model's limit are truncated (with a warning), never chunked.

    Args:
        model: A bundled alias, local directory or hub id, or a ``ModelConfig`` / dict of its keys.
        text_column: The column holding the texts (strings; a null or other value is an error).
        vector_column: The column added (an existing column of that name is replaced).
        kind: ``document`` or ``query`` prompt.
        prompt: A prompt of your own instead (``""`` for none).
        device: ``auto`` (the GPU Ray assigns with ``num_gpus=1``), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        **model_settings: Other ``ModelConfig`` keys (``max_seq_length``, ``token_budget``...).

    Batches: a ``pyarrow.Table`` (``batch_format="pyarrow"``) gets a ``fixed_size_list<float32>``
    column; a pandas DataFrame a column of float32 arrays; a dict of numpy arrays (``"numpy"``) a
    ``[n, dim]`` float32 array.
    """

    def __init__(
        self,
        model: str | ModelConfig | dict[str, Any] = "all-MiniLM-L6-v2",
        text_column: str = "text",
        vector_column: str = "vector",
        kind: EmbedKind = "document",
        prompt: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **model_settings: Any,
    ) -> None:
        self.text_column = text_column
        self.vector_column = vector_column
        self.kind: EmbedKind = kind
        self.prompt = prompt
        self.settings = {"device": device, "dtype": dtype, **model_settings}
        self.model = model
        self.encoder = encoder_for(model, **self.settings)  # loaded here: once per actor

    @property
    def dim(self) -> int:
        """Size of the vectors."""
        return self.encoder.dim

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        texts = self._texts(batch)
        output = "arrow" if isinstance(batch, pa.Table) else "numpy"
        vectors = embed(
            texts, self.model, kind=self.kind, prompt=self.prompt, output=output, **self.settings
        )
        if isinstance(batch, pa.Table):
            if self.vector_column in batch.column_names:
                batch = batch.drop_columns([self.vector_column])
            return batch.append_column(self.vector_column, vectors)
        if isinstance(batch, dict):
            return {**batch, self.vector_column: np.asarray(vectors, dtype=np.float32)}
        batch = batch.copy()  # a pandas DataFrame: Ray may hand a zero-copy view
        batch[self.vector_column] = list(np.asarray(vectors, dtype=np.float32))
        return batch

    def _texts(self, batch: Any) -> list[str]:
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            names = batch.column_names
        elif isinstance(batch, dict):
            names = list(batch)
        else:
            names = [str(c) for c in batch.columns]
        if self.text_column not in names:
            raise EmbedError(
                f"the batch has no column {self.text_column!r}; its columns are: {', '.join(map(str, names))}. "
                "Pass text_column= in fn_constructor_kwargs"
            )
        column = batch[self.text_column]
        values = column.to_pylist() if hasattr(column, "to_pylist") else column.tolist()
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise EmbedError(
                    f"row {i} of the batch has a {type(value).__name__} in {self.text_column!r}, not a string: "
                    "filter or fill those rows first (e.g. ds.filter(expr=...))"
                )
        return values
