"""The Python API: build a ``Job``, ``run`` it, ``open_index`` the output and search it; ``embed``
a few texts directly.

Example:
    >>> from embedder import Job, embed, run, open_index
    >>> result = run(Job.model_validate({"source": {"uri": "docs/"}, "output": {"uri": "out/db"}}))
    >>> hits = open_index("out/db").search("how do I reset my password?", k=5)
    >>> embed(["a first text", "a second one"]).shape       # the bundled all-MiniLM-L6-v2
    (2, 384)
    >>> run(Job(source=dataframe, output={"uri": "out/df-db"}))  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from embedder.config import ConfigError, Job, ModelConfig, SourceConfig, build_job, load_job_dict
from embedder.errors import UsageError
from embedder.execution.result import RunResult

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from embedder.models.encoder import Encoder

EmbedKind = Literal["document", "query"]
EmbedOutput = Literal["numpy", "arrow"]
MAX_CACHED_ENCODERS = 4
"""Loaded encoders ``embed`` keeps (one per distinct model settings), least recently used dropped."""


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Loads a YAML job file, applying ``section.key=value`` overrides."""
    return build_job(load_job_dict(path), overrides)


def run(
    job: Job | dict[str, Any],
    on_progress: Callable[[RunResult, int], None] | None = None,
    force_unlock: bool = False,
    source: Any = None,
) -> RunResult:
    """Runs a job to completion and returns its counts and timings.

    A run stopped by SIGTERM/SIGINT or a spot notice returns with ``state == "interrupted"``;
    running the same job again resumes it.

    The source may be an object in memory — a list of strings or dicts, a pandas DataFrame, a
    pyarrow Table or RecordBatchReader, a ``datasets.Dataset`` — given as ``Job(source=obj)``,
    ``{"source": {"uri": obj, "text_field": "body"}}`` or ``run(job, source=obj)`` (which keeps the
    job's field mapping). It is spooled to an Arrow file the readers memory-map, read in shards of
    ``source.options.shard_rows`` rows (see ``embedder.in_memory``); the saved job records
    ``memory://<kind>/<fingerprint>``, never the data. Rerunning with the same data resumes.

    Args:
        job: A ``Job`` or a dict with its sections.
        on_progress: Optional callback ``(result_so_far, sequences_just_encoded)``.
        force_unlock: Take the output's lease even if another job holds it (it must be dead).
        source: Replaces the job's ``source.uri``: a path or URL, or an in-memory object.

    Raises:
        embedder.lease.LeaseHeld: another live job writes the same output.
        ConfigError: the job, or an in-memory source it cannot read (a missing text field...).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"id": ["a", "b"], "text": ["first document", "second document"]})
        >>> result = run(Job(source=frame, output={"uri": "out/frame-db"}))  # doctest: +SKIP
    """
    job = _with_source(job, source)
    with spooled(job) as job:
        if job.runner.kind == "ray":
            from embedder.runners.ray import run_ray  # type: ignore[import-not-found]

            return run_ray(job, on_progress=on_progress, force_unlock=force_unlock)
        from embedder.runners.local import run_local

        return run_local(job, on_progress=on_progress, force_unlock=force_unlock)


def plan(job: Job | dict[str, Any], source: Any = None) -> dict[str, Any]:
    """What ``run(job)`` would do, writing nothing: shards (done, to embed), the shard size, and
    whether the job's vector fingerprint matches the rows the output holds (``refused`` holds the
    error the run would stop with). The runner is the job's (``runner.kind``): a Ray job's plan
    counts the readers of the cluster it would run on. See ``embedder.execution.skeleton.Run.plan``."""
    job = _with_source(job, source)
    with spooled(job) as job:
        if job.runner.kind == "ray":
            from embedder.runners.ray import RayRunner  # type: ignore[import-not-found]

            return RayRunner(job).plan()
        from embedder.runners.local import LocalRunner

        return LocalRunner(job).plan()


def _with_source(job: Job | dict[str, Any], source: Any) -> Job:
    """``job`` validated, its ``source.uri`` replaced by ``source`` when given (the field mapping,
    options and storage options kept; the format detected anew)."""
    if source is None:
        return build_job(job) if isinstance(job, dict) else job
    if isinstance(job, dict):
        data = dict(job)
        current = data.get("source") or {}
        fields = current.model_dump() if isinstance(current, SourceConfig) else dict(current)
        data["source"] = {**{k: v for k, v in fields.items() if k != "format"}, "uri": source}
        return build_job(data)
    fields = job.source.model_dump(exclude={"uri", "format"})
    try:
        return job.model_copy(update={"source": SourceConfig.model_validate({**fields, "uri": source})})
    except ValueError as err:
        raise ConfigError(f"invalid source: {err}") from None


@contextlib.contextmanager
def spooled(job: Job) -> Iterator[Job]:
    """``job`` itself for a path or URL source; for an in-memory one, the job whose source is the
    object's spool file (``embedder.in_memory.spool``), removed again when the block ends."""
    if job.source.data is None:
        yield job
        return
    from embedder.in_memory import spool

    written = spool(job.source)
    with _spool_lock:
        _spool_users[written.path] += 1  # two runs of this process over the same data share one file
    source = job.source.model_copy(update={"uri": written.uri})
    source._data = None  # the runners (and their deep copies of the job) never carry the object
    try:
        yield job.model_copy(update={"source": source})
    finally:
        with _spool_lock:
            _spool_users[written.path] -= 1
            if not _spool_users[written.path]:
                del _spool_users[written.path]
                with contextlib.suppress(OSError):
                    os.unlink(written.path)


_spool_users: collections.Counter[str] = collections.Counter()
_spool_lock = threading.Lock()


# --- embed: vectors for a few texts, in this process ----------------------------------------


class EmbedError(UsageError, ValueError):
    """``embed`` called with input it cannot embed (a non-string text, an unknown option)."""


_encoders: collections.OrderedDict[str, Encoder] = collections.OrderedDict()
_encoders_lock = threading.Lock()


def encoder_for(model: str | ModelConfig | dict[str, Any] = "all-MiniLM-L6-v2", **settings: Any) -> Encoder:
    """The loaded ``Encoder`` of ``model`` with ``settings`` (``ModelConfig`` keys: ``device``,
    ``dtype``, ``max_seq_length``...), loaded once per distinct settings and kept (at most
    ``MAX_CACHED_ENCODERS``), so repeated ``embed`` calls and searches do not reload the model.

    Raises:
        ConfigError: an unknown setting or an invalid value (the message names the valid ones).
    """
    from pydantic import ValidationError

    from embedder.config import _format_validation_error

    if isinstance(model, ModelConfig):
        base = model.model_dump()
    elif isinstance(model, dict):
        base = dict(model)
    else:
        base = {"name": model}
    try:
        config = ModelConfig.model_validate({**base, **{k: v for k, v in settings.items() if v is not None}})
    except ValidationError as err:
        raise ConfigError(f"invalid model settings: {_format_validation_error(err)}") from None
    key = config.model_dump_json()
    with _encoders_lock:
        encoder = _encoders.get(key)
        if encoder is None:
            from embedder.models.encoder import Encoder

            encoder = Encoder.load(config)
            _encoders[key] = encoder
            while len(_encoders) > MAX_CACHED_ENCODERS:
                _encoders.popitem(last=False)
        _encoders.move_to_end(key)
        return encoder


def clear_encoders() -> None:
    """Forgets the encoders ``encoder_for`` keeps (frees their memory once nothing else holds them)."""
    with _encoders_lock:
        _encoders.clear()


def embed(
    texts: str | Iterable[str],
    model: str | ModelConfig | dict[str, Any] = "all-MiniLM-L6-v2",
    *,
    kind: EmbedKind = "document",
    prompt: str | None = None,
    output: EmbedOutput = "numpy",
    device: str | None = None,
    dtype: str | None = None,
    **model_settings: Any,
) -> np.ndarray | pa.FixedSizeListArray:
    """One vector per text, embedded in this process with the pipeline's padding-free encoder.

    For notebooks and small jobs: no chunking, no output, no checkpoint. The vectors are those a
    ``run`` of the same model would store for one-chunk documents, and equal
    ``SentenceTransformer.encode(texts, prompt=...)`` (cos >= 0.9999 in fp32). The model is loaded
    on the first call and kept for the next ones with the same settings (``encoder_for``).

    Texts longer than the model's limit (``max_seq_length`` tokens, prompt and special tokens
    included) are truncated, as ``SentenceTransformer.encode`` does, with a warning saying how many:
    use ``run`` to chunk long documents instead.

    Args:
        texts: One string (gives one vector, ``[dim]``) or an iterable of strings (``[n, dim]``):
            a list, a pandas Series, a pyarrow string array.
        model: A bundled alias, a local directory or a hub id, or a ``ModelConfig`` / dict of its keys.
        kind: ``document`` (the model's document prompt: its saved ``document``/``passage``/``corpus``
            prompt, or ``model.document_prompt``) or ``query`` (its ``query`` prompt).
        prompt: A prompt to put before every text instead (``""`` for none); overrides ``kind``.
        output: ``numpy`` (``float32`` array) or ``arrow`` (a ``FixedSizeListArray`` of float32,
            the type of the output's ``vector`` column).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; default: the model config's.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        **model_settings: Other ``ModelConfig`` keys (``max_seq_length``, ``token_budget``,
            ``packed``, ``trust_remote_code``...).

    Raises:
        EmbedError: a text that is not a string, an unknown ``kind`` or ``output``.
        ConfigError: an invalid model setting; ModelError: a model that cannot be loaded.

    Example:
        >>> vectors = embed(["how do I reset my password?", "refunds take five days"])
        >>> vectors.shape, vectors.dtype
        ((2, 384), dtype('float32'))
        >>> query = embed("password reset", kind="query")       # one text: one vector
    """
    import numpy as np

    if kind not in ("document", "query"):
        raise EmbedError(f"Invalid kind {kind!r}. Valid: document, query")
    if output not in ("numpy", "arrow"):
        raise EmbedError(f"Invalid output {output!r}. Valid: numpy, arrow")
    single = isinstance(texts, str)
    items = _text_list(texts)
    encoder = encoder_for(model, device=device, dtype=dtype, **model_settings)
    if prompt is None:
        prompt = encoder.document_prompt if kind == "document" else encoder.query_prompt
    truncated: list[int] = []
    vectors = np.ascontiguousarray(encoder.encode_texts(items, prompt, truncated=truncated), dtype=np.float32)
    if truncated:
        warnings.warn(
            f"{len(truncated)} of {len(items)} text(s) (the first: #{truncated[0]}) are longer than "
            f"{encoder.name!r}'s limit of {encoder.max_seq_length} tokens and were truncated, as "
            "SentenceTransformer.encode does; embedder.run chunks long documents instead",
            UserWarning,
            stacklevel=2,
        )
    if output == "arrow":
        import pyarrow as pa

        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        if single:
            return flat
        return pa.FixedSizeListArray.from_arrays(flat, encoder.dim)
    return vectors[0] if single else vectors


def _text_list(texts: Any) -> list[str]:
    """``texts`` as a list of strings (a string, a list, a pandas Series, an Arrow array...).

    Raises:
        EmbedError: naming the first item that is not a string.
    """
    if isinstance(texts, str):
        return [texts]
    if hasattr(texts, "to_pylist"):  # pyarrow Array / ChunkedArray
        items = texts.to_pylist()
    elif hasattr(texts, "tolist"):  # numpy array, pandas Series
        items = texts.tolist()
    elif isinstance(texts, Iterable):
        items = list(texts)
    else:
        raise EmbedError(f"texts must be a string or an iterable of strings, got {type(texts).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise EmbedError(f"texts[{i}] is {type(item).__name__}, not a string: embed takes strings only")
    return items


def open_index(uri: str, storage_options: dict[str, Any] | None = None, table: str = "chunks", **kwargs: Any):  # noqa: ANN201
    """Opens an output (LanceDB or Parquet) for search; see ``indexes.search.open_index``."""
    from indexes.search import open_index as _open_index

    return _open_index(uri, storage_options=storage_options, table=table, **kwargs)
