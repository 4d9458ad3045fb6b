"""The chunk stage as a worker builds it: the model's fast tokenizer rebuilt from its JSON and the
chunker of ``Chunker.for_encoder``, without loading the model (reader processes, Ray read tasks,
the encoder itself and the estimate all take their tokenizer from here)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

    from embedder.chunking import Chunker


@lru_cache(maxsize=4)
def tokenizer_from_json(tokenizer_json: str) -> tokenizers.Tokenizer:
    """The fast tokenizer serialized in ``tokenizer_json``, truncation and padding off (cached:
    rebuilding one costs ~0.1 s). Shared: use it from one thread at a time, or ``copy`` it."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@lru_cache(maxsize=4)
def chunker_for(tokenizer_json: str, max_seq_length: int, overhead: int, chunking_json: str) -> Chunker:
    """The chunker ``Chunker.for_encoder`` builds, from the encoder's facts (``chunking_json``: the
    job's ``ChunkingConfig`` as JSON, so the arguments stay hashable)."""
    from embedder.chunking import Chunker
    from embedder.config import ChunkingConfig

    config = ChunkingConfig.model_validate_json(chunking_json)
    return Chunker.from_settings(tokenizer_from_json(tokenizer_json), max_seq_length, overhead, config)
