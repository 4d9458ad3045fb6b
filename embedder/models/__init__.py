"""Models: loading a sentence-transformers model and embedding packed batches with it.

``Encoder`` (in ``embedder.models.encoder``) is the one entry point; the other modules are its
parts: ``loader`` (finding the model, reading its config), ``layout`` (specials and prompt ids),
``packed_bert`` and ``packed_modernbert`` (the padding-free forwards), ``pooling`` (segment pooling on packed states).
Imported lazily so ``import embedder.models`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EncodeHandle", "Encoder", "ModelError"]


def __getattr__(name: str) -> Any:
    if name in ("Encoder", "EncodeHandle"):
        from embedder.models import encoder

        return getattr(encoder, name)
    if name == "ModelError":
        from embedder.models.loader import ModelError

        return ModelError
    raise AttributeError(f"module 'embedder.models' has no attribute {name!r}")
