"""Where the special tokens and the prompt go around a chunk's own token ids.

The chunker tokenizes chunk text alone (no specials, no prompt); the model was trained on
``tokenizer(prompt + text)`` with its special tokens. This module finds, once per model and prompt,
the ids that turn the first into the second: the leading specials (``[CLS]``/``<s>``), the prompt's
ids (exactly ``ids(prompt + text)`` minus ``ids(text)``) and the trailing specials
(``[SEP]``/``</s>``). It refuses a tokenizer for which that difference depends on the text, so
what is embedded is always what ``SentenceTransformer.encode(text, prompt=...)`` would embed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedder.models.loader import ModelError
from embedder.packing import SequenceLayout

if TYPE_CHECKING:
    import tokenizers

# Probes cover a plain word, a capitalised phrase, digits and punctuation at the join.
PROBES = ("hello world", "The quick brown fox jumps.", "42 is an answer, isn't it?")


def special_token_ids(tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer puts before and after a single sequence (its post-processor)."""
    prefix: list[int] | None = None
    suffix: list[int] | None = None
    for probe in PROBES:
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        at = _find(full, plain)
        if at < 0:
            raise ModelError(
                "the tokenizer's special tokens wrap a text in a way this encoder cannot reproduce "
                f"({full!r} does not contain {plain!r}); this model's tokenizer is not supported"
            )
        pre, post = full[:at], full[at + len(plain) :]
        if prefix is None:
            prefix, suffix = pre, post
        elif (pre, post) != (prefix, suffix):
            raise ModelError("the tokenizer's special tokens depend on the text; this model is not supported")
    return np.asarray(prefix, dtype=np.int64), np.asarray(suffix, dtype=np.int64)


def prompt_token_ids(tokenizer: tokenizers.Tokenizer, prompt: str) -> np.ndarray:
    """``ids(prompt + text) - ids(text)``, the same for every probe text.

    Raises:
        ModelError: when the prompt's tokens depend on the text after it (e.g. a prompt without a
            trailing space in front of a SentencePiece tokenizer), naming the fix.
    """
    if not prompt:
        return np.zeros(0, dtype=np.int64)
    found: list[int] | None = None
    for probe in PROBES:
        joint = tokenizer.encode(prompt + probe, add_special_tokens=False).ids
        alone = tokenizer.encode(probe, add_special_tokens=False).ids
        if len(joint) < len(alone) or joint[len(joint) - len(alone) :] != alone:
            raise ModelError(
                f"prompt {prompt!r} does not tokenize apart from the text after it with this tokenizer "
                f"(ids of prompt+{probe!r} do not end with the ids of {probe!r}); end the prompt with a "
                "space or a separator, or set model.document_prompt/query_prompt to one that does"
            )
        ids = joint[: len(joint) - len(alone)]
        if found is None:
            found = ids
        elif ids != found:
            raise ModelError(f"prompt {prompt!r} tokenizes differently depending on the text after it; change the prompt")
    return np.asarray(found, dtype=np.int64)


def sequence_layout(tokenizer: tokenizers.Tokenizer, prompt: str, position_offset: int) -> SequenceLayout:
    """The layout the packer uses: specials, the prompt's ids and the model's position offset."""
    prefix, suffix = special_token_ids(tokenizer)
    return SequenceLayout(
        prefix_ids=prefix,
        prompt_ids=prompt_token_ids(tokenizer, prompt),
        suffix_ids=suffix,
        position_offset=position_offset,
    )


def _find(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1
