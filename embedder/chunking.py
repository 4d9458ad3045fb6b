"""Token-aware chunking: documents → token windows, tokenized exactly once.

Each document is tokenized once (no special tokens, with offsets and word ids) in a batched call to
the fast tokenizer. Windows of at most ``max_tokens`` tokens end on word boundaries, so the chunk
text — recovered from the token offsets — re-tokenizes to the same ids; those ids are what gets
embedded, with no second tokenization. Optionally each chunk carries a context prefix (the title,
or "Title — Section" from the document's ``_sections``), tokenized once per distinct prefix.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.records import Chunk, Document

if TYPE_CHECKING:
    import tokenizers

    from embedder.config import ChunkingConfig
    from embedder.models.encoder import Encoder

CONTEXT_SEPARATOR = " — "


def chunk_settings(max_seq_length: int, overhead: int, config: ChunkingConfig) -> dict[str, Any]:
    """What decides the chunks (``Chunker.settings``, stored in the output's provenance) for a model
    limit of ``max_seq_length`` tokens, ``overhead`` of them taken by special tokens and the prompt.

    Pure arithmetic on the job's ``chunking`` section, so a run can tell from the stored provenance
    alone, before the model loads, whether the job would chunk differently.

    Raises:
        ValueError: the limit leaves fewer than 4 tokens of text.
    """
    limit = max_seq_length if config.max_tokens is None else min(config.max_tokens, max_seq_length)
    max_tokens = limit - overhead
    if max_tokens < 4:
        raise ValueError(
            f"chunking.max_tokens={limit} leaves {max_tokens} tokens after the model's special tokens "
            f"and prompt ({overhead}); raise chunking.max_tokens"
        )
    return {
        "max_tokens": max_tokens,
        "overlap_tokens": min(config.overlap_tokens, max_tokens // 2 - 1),
        "context": config.context,
        "max_document_chars": config.max_document_chars,
    }


def content_hash(text: str) -> str:
    """Hex hash of a chunk's text (what incremental runs compare)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def trim_text(text: str, max_chars: int) -> str:
    """Cuts ``text`` to at most ``max_chars``, at the last whitespace before the limit if one is near."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", max(0, max_chars - 1000), max_chars)
    return text[: cut if cut > 0 else max_chars]


@dataclass(slots=True)
class ChunkStats:
    """Counts of one ``Chunker.chunk`` call, for the run record."""

    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    trimmed_documents: int = 0


def _word_start_rules(tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray | None, bool]:
    """How a window may start on this tokenizer, so its text re-tokenizes to the same ids.

    WordPiece and byte-level BPE (Qwen, GPT-2) split text into words before the model runs, and
    their word ids mark where windows may start. SentencePiece-style tokenizers (Llama, Mistral:
    spaces become ``▁``, with or without a pre-tokenizer) often see the whole text as one "word";
    there a window may start at any token beginning with ``▁``. Returns that per-id table (None
    when word ids suffice) and whether a window's text drops its leading space because the tokenizer
    prepends the ``▁`` itself (the legacy ``Prepend("▁")`` normalizer), found with a probe.
    """
    vocab = tokenizer.get_vocab()
    starts = np.zeros(max(vocab.values(), default=-1) + 1, dtype=bool)
    for token, i in vocab.items():
        starts[i] = token.startswith("\u2581")
    probe = "hello world and more words"
    enc = tokenizer.encode(probe, add_special_tokens=False)
    if not starts.any() or len(set(enc.word_ids)) > 1:
        return None, False
    ids = enc.ids
    k = next((i for i in range(1, len(ids)) if starts[ids[i]]), None)
    if k is None:
        return starts, False
    rest = probe[enc.offsets[k][0] :]
    as_is = tokenizer.encode(rest, add_special_tokens=False).ids == ids[k:]
    stripped = tokenizer.encode(rest[1:], add_special_tokens=False).ids == ids[k:] if rest.startswith(" ") else False
    return starts, (not as_is) and stripped


class Chunker:
    """Cuts documents into token windows.

    Args:
        tokenizer: A fast tokenizer (``tokenizers.Tokenizer``) with truncation and padding off.
        max_tokens: Max tokens of a chunk's own text (the model limit minus specials and prompt).
        overlap_tokens: Tokens shared by consecutive windows of a document (aligned to words).
        context: ``"none"``, ``"title"`` (prefix ``"Title\\n"``) or ``"section"`` (prefix
            ``"Title — Section\\n"``, from ``metadata["_sections"]``); prefix tokens count
            against ``max_tokens``.
        max_document_chars: Longer documents are trimmed before tokenizing (and counted).

    Example:
        >>> chunker = Chunker.for_encoder(encoder, job.chunking)
        >>> chunks = chunker.chunk(documents, shard_id="part-0")
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        max_tokens: int,
        overlap_tokens: int = 0,
        context: str = "none",
        max_document_chars: int = 2_000_000,
    ) -> None:
        if max_tokens < 4:
            raise ValueError(f"max_tokens must be at least 4, got {max_tokens}")
        if overlap_tokens >= max_tokens // 2:
            raise ValueError(f"overlap_tokens ({overlap_tokens}) must be below half of max_tokens ({max_tokens})")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.context = context
        self.max_document_chars = max_document_chars
        self.stats = ChunkStats()
        self._prefix_cache: dict[str, np.ndarray] = {}
        self._word_start, self._drop_leading_space = _word_start_rules(tokenizer)

    @classmethod
    def for_encoder(cls, encoder: Encoder, config: ChunkingConfig) -> Chunker:
        """A chunker whose windows fit the encoder's sequence limit with its specials and prompt."""
        return cls.from_settings(encoder.tokenizer, encoder.max_seq_length, encoder.layout.overhead, config)

    @classmethod
    def from_settings(
        cls, tokenizer: tokenizers.Tokenizer, max_seq_length: int, overhead: int, config: ChunkingConfig
    ) -> Chunker:
        """A chunker for a model limit of ``max_seq_length`` tokens, ``overhead`` of them taken by
        special tokens and the prompt."""
        return cls(tokenizer, **chunk_settings(max_seq_length, overhead, config))

    def settings(self) -> dict[str, Any]:
        """What decides the chunks (stored in the output's provenance)."""
        return {
            "max_tokens": self.max_tokens,
            "overlap_tokens": self.overlap_tokens,
            "context": self.context,
            "max_document_chars": self.max_document_chars,
        }

    # --- chunking ---------------------------------------------------------------------------

    def chunk(self, documents: Sequence[Document], shard_id: str = "") -> list[Chunk]:
        """Chunks documents (one batched tokenizer call); chunk order follows document order."""
        if not documents:
            return []
        texts = []
        for doc in documents:
            text = doc.text
            if len(text) > self.max_document_chars:
                text = trim_text(text, self.max_document_chars)
                self.stats.trimmed_documents += 1
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        out: list[Chunk] = []
        for doc, text, enc in zip(documents, texts, encodings):
            out.extend(self._chunk_one(doc, text, enc, shard_id))
        self.stats.documents += len(documents)
        self.stats.chunks += len(out)
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out

    def _prefix_ids(self, prefix: str) -> np.ndarray:
        ids = self._prefix_cache.get(prefix)
        if ids is None:
            ids = np.asarray(self.tokenizer.encode(prefix, add_special_tokens=False).ids, dtype=np.int32)
            if len(self._prefix_cache) > 4096:
                self._prefix_cache.clear()
            self._prefix_cache[prefix] = ids
        return ids

    def _prefix_for(self, doc: Document, char_offset: int, sections: list[Any], section_starts: list[int]) -> str:
        if self.context == "none":
            return ""
        title = (doc.title or "").strip()
        heading = ""
        if self.context == "section" and sections:
            i = bisect_right(section_starts, char_offset) - 1
            if i >= 0:
                heading = str(sections[i][1]).strip()
        parts = [p for p in (title, heading) if p]
        return CONTEXT_SEPARATOR.join(parts) + "\n" if parts else ""

    def _chunk_one(self, doc: Document, text: str, enc: Any, shard_id: str) -> list[Chunk]:
        ids = np.asarray(enc.ids, dtype=np.int32)
        n = len(ids)
        if n == 0:
            return []
        # No special tokens were added, so every token has a word id (the conversion runs in C).
        # Offsets are fetched per window edge (token_to_chars), never converted for every token.
        word_ids = np.array(enc.word_ids, dtype=np.int64)
        char_span = enc.token_to_chars
        # Token i starts a word when its word id differs from token i-1's; windows start and end there.
        starts_word = np.empty(n + 1, dtype=bool)
        starts_word[0] = True
        starts_word[1:n] = word_ids[1:] != word_ids[:-1]
        if self._word_start is not None:  # SentencePiece-style: no pre-tokenizer words, "▁" starts one
            starts_word[1:n] |= self._word_start[np.minimum(ids[1:], len(self._word_start) - 1)]
        starts_word[n] = True
        boundaries = np.flatnonzero(starts_word)  # sorted token indices where a cut is allowed, incl. n

        sections = (doc.metadata.get("_sections") or []) if self.context == "section" else []
        section_starts = [int(s[0]) for s in sections]
        chunks: list[Chunk] = []
        start = 0
        index = 0
        while start < n:
            prefix = self._prefix_for(doc, char_span(start)[0], sections, section_starts)
            prefix_ids = self._prefix_ids(prefix) if prefix else None
            budget = self.max_tokens - (len(prefix_ids) if prefix_ids is not None else 0)
            if budget < 4:  # an absurdly long title/heading: drop the prefix rather than the text
                prefix, prefix_ids, budget = "", None, self.max_tokens
            hard_end = min(start + budget, n)
            if hard_end < n:
                # the last word boundary in (start, hard_end]; a single word longer than the
                # window is cut inside (the only case where re-tokenization may differ).
                j = int(np.searchsorted(boundaries, hard_end, side="right")) - 1
                end = int(boundaries[j]) if boundaries[j] > start else hard_end
            else:
                end = n
            char_start, char_end = char_span(start)[0], char_span(end - 1)[1]
            if self._drop_leading_space and start > 0 and text[char_start] == " " and char_end - char_start > 1:
                char_start += 1  # the tokenizer puts this space back itself (a prepended "▁")
            window_text = text[char_start:char_end]
            window_ids = ids[start:end]
            if prefix_ids is not None:
                chunk_text = prefix + window_text
                token_ids = np.concatenate([prefix_ids, window_ids])
            else:
                chunk_text, token_ids = window_text, window_ids
            chunks.append(
                Chunk(
                    doc_id=doc.id,
                    chunk_index=index,
                    text=chunk_text,
                    token_ids=token_ids,
                    content_hash=content_hash(chunk_text),
                    shard_id=shard_id,
                    title=doc.title,
                    metadata=doc.metadata,
                )
            )
            index += 1
            if end >= n:
                break
            next_start = end
            if self.overlap_tokens:
                want = end - self.overlap_tokens
                k = int(np.searchsorted(boundaries, want, side="left"))
                candidate = int(boundaries[k])
                if start < candidate < end:
                    next_start = candidate
            start = next_start
        return chunks
