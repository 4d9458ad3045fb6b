"""Records that flow between the stages of a job.

Every stage hands the next one small slotted dataclasses, never dicts-of-anything:
``Shard`` (a unit of input) → ``Document`` → ``Chunk`` (token ids included) → ``PackedBatch``,
and ``ShardEnd`` closing each shard's stream of chunks.
``BadRecord`` is what a stage emits instead of raising when the input is bad; the runner writes
it to the quarantine with the shard's commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True, frozen=True)
class Shard:
    """A unit of input with an id that is stable across runs of the same source.

    Attributes:
        id: Stable, unique id (e.g. ``"docs.jsonl@0-67108864"``); used in completion records and
            as the ``shard_id`` column of the output.
        path: The file (local path or fsspec URL) the shard reads.
        start: Connector-defined start (byte offset, row group index, stream offset...).
        end: Connector-defined exclusive end, or -1 for "to the end of the file".
        size_bytes: Approximate input size, used for progress and scheduling.
        extra: Connector-defined settings needed to read the shard (kept JSON-serialisable).
    """

    id: str
    path: str
    start: int = 0
    end: int = -1
    size_bytes: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """Returns one value of ``extra``."""
        for k, v in self.extra:
            if k == key:
                return v
        return default


@dataclass(slots=True)
class Document:
    """One source document.

    Attributes:
        id: Stable id, unique within the source.
        text: The document's plain text.
        title: Optional title.
        metadata: Passthrough fields. Keys starting with ``_`` are for the pipeline itself
            (e.g. ``_sections``: a list of ``(char_offset, heading)`` pairs) and are never
            written as columns.
        location: Where in its shard it was read (``"byte 17"``, ``"row 3"``), for quarantine
            records that point back at it (a later duplicate of its id); not part of equality.
    """

    id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    location: str = field(default="", compare=False, repr=False)


@dataclass(slots=True, frozen=True)
class UnchangedDocument:
    """A document a connector skipped because its version (e.g. a Wikipedia revision id) equals the
    one already embedded: incremental runs keep its rows without reading its text."""

    id: str


@dataclass(slots=True)
class BadRecord:
    """Input that could not be used, with where it was and why. Written to the quarantine.

    Attributes:
        shard_id: The shard it came from.
        location: Where in the shard (``"line 17"``, ``"byte 1048576"``, ``"page 12345"``...).
        reason: Why it was rejected, in words a user can act on.
        doc_id: The document id, where one was known.
        snippet: A short excerpt of the bad input (at most a few hundred characters).
        fields: The record's field names, where a missing field was the reason (the run's hint
            names them: "records have fields doc_id, heading, body").
    """

    shard_id: str
    location: str
    reason: str
    doc_id: str | None = None
    snippet: str | None = None
    fields: list[str] | None = None


@dataclass(slots=True)
class Chunk:
    """One window of a document, tokenized once: ``token_ids`` are exactly what gets embedded.

    ``token_ids`` hold the chunk's own tokens only: no special tokens and no prompt (the encoder
    adds both). ``text`` re-tokenizes to ``token_ids``.
    """

    doc_id: str
    chunk_index: int
    text: str
    token_ids: np.ndarray  # int32, 1-D
    content_hash: str
    shard_id: str = ""
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc_id}#{self.chunk_index}"


@dataclass(slots=True)
class PackedBatch:
    """Sequences packed end to end with no padding, ready for a varlen forward.

    Attributes:
        input_ids: int64 ``[total_tokens]``, each sequence with its special tokens and prompt.
        position_ids: int64 ``[total_tokens]``, restarting at each sequence (plus the model
            family's offset, e.g. ``padding_idx + 1`` for XLM-RoBERTa).
        cu_seqlens: int32 ``[n + 1]``, cumulative sequence lengths starting at 0.
        max_seqlen: Longest sequence in the batch.
        chunk_ids: ``doc_id#chunk_index`` of each sequence, in order.
        prompt_lengths: int32 ``[n]``, tokens of prompt in each sequence (after the leading special
            token), for models whose pooling excludes the prompt.
        chunks: The packed chunks themselves (host side only, for the runner to build output rows;
            never sent to the device).
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    chunk_ids: list[str]
    prompt_lengths: np.ndarray | None = None
    chunks: list[Chunk] | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])


@dataclass(slots=True)
class ShardEnd:
    """The last message of a shard's read+chunk stage: its counts and bad records."""

    shard_id: str
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    trimmed_documents: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)
    unchanged_doc_ids: list[str] = field(default_factory=list)  # skipped by version (incremental)
    changes: dict[str, Any] | None = None  # incremental: what the pass saw and replaced (see embedder.incremental)
