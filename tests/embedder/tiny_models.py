"""Tiny random-weight sentence-transformers models, built in seconds, for fidelity tests.

Each model reuses the bundled MiniLM's WordPiece tokenizer (vocab 30522) and is saved as a real
sentence-transformers directory (modules.json, pooling config, prompts), so tests load it exactly as
users load a hub model. Weights are drawn with a spread large enough that attention is far from
uniform: a packing, position or masking mistake shows up as a low cosine, not as noise.

Example:
    >>> path = save_tiny_model(tmp_path / "e5", minilm_path, family="xlm-roberta",
    ...                        prompts={"query": "query: ", "passage": "passage: "})
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def hf_config(
    family: str,
    hidden: int,
    layers: int,
    heads: int,
    max_positions: int,
    hidden_act: str,
    intermediate: int | None = None,
    **overrides: Any,
) -> Any:
    """A transformers config of ``family`` (bert, xlm-roberta, distilbert or modernbert) and the given
    shape; ``overrides`` are further config fields (ModernBERT: ``local_attention``,
    ``global_attn_every_n_layers``, biases ...)."""
    import transformers

    intermediate = intermediate or 4 * hidden
    if family == "modernbert":
        # The MiniLM tokenizer's specials ([CLS] 101, [SEP] 102, [PAD] 0) in ModernBERT's config; its
        # own defaults otherwise: no biases, global attention every 3rd layer, RoPE theta 160k/10k.
        fields: dict[str, Any] = dict(
            vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=max_positions, hidden_activation=hidden_act,
            pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
            global_attn_every_n_layers=3, local_attention=32, global_rope_theta=160000.0, local_rope_theta=10000.0,
            reference_compile=False,  # transformers versions that torch.compile parts of ModernBERT: keep the reference eager
        )
        fields.update(overrides)
        return transformers.ModernBertConfig(**fields)
    if overrides:
        raise ValueError(f"config overrides are for modernbert, not {family!r}")
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=max_positions, hidden_act=hidden_act,
            pad_token_id=0,
        )
    if family == "xlm-roberta":
        # Positions start at padding_idx + 1 = 1, like the real XLM-R (there pad is 1 and they start at 2).
        return transformers.XLMRobertaConfig(
            vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, max_position_embeddings=max_positions + 1, hidden_act=hidden_act,
            pad_token_id=0, bos_token_id=101, eos_token_id=102, type_vocab_size=1,
        )
    if family == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=30522, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
            max_position_embeddings=max_positions, pad_token_id=0,
        )
    raise ValueError(f"unknown family {family!r}")


def randomize(model: Any, seed: int, spread: float = 0.3) -> None:
    """Redraws every weight: LayerNorm scales around 1, everything else around 0 with ``spread``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.lower().endswith("norm.weight"):  # LayerNorm, layer_norm, ModernBERT's *_norm
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(spread * noise)


def save_tiny_model(
    dest: Path,
    minilm_path: str,
    family: str = "bert",
    pooling: str = "mean",
    normalize: bool = True,
    include_prompt: bool = True,
    prompts: dict[str, str] | None = None,
    max_seq_length: int = 128,
    hidden: int = 48,
    layers: int = 2,
    heads: int = 4,
    hidden_act: str = "gelu",
    seed: int = 0,
    spread: float | None = 0.3,
    intermediate: int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> str:
    """Builds and saves a random sentence-transformers model; returns its directory.

    ``spread`` is the weights' standard deviation (None keeps transformers' own initialisation);
    ``intermediate`` the FFN width (default ``4 * hidden``); ``config_overrides`` go to ``hf_config``.
    """
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models

    dest = Path(dest)
    hf_dir = dest.parent / f"{dest.name}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = Path(minilm_path) / name
        if src.exists():
            shutil.copy(src, hf_dir / name)
    if family == "modernbert":  # as ModernBERT's own tokenizers: no token_type_ids (the model takes none)
        config_path = hf_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
        config_path.write_text(json.dumps(tokenizer_config, indent=2))
    config = hf_config(family, hidden, layers, heads, max_seq_length, hidden_act, intermediate, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    if spread is not None:
        randomize(model, seed, spread)
    model.save_pretrained(hf_dir)

    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules: list[Any] = [transformer, models.Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt)]
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu")
    st.save(str(dest))
    shutil.rmtree(hf_dir)
    return str(dest)


def single_token_words(tokenizer: Any, limit: int = 4000) -> list[str]:
    """Lower-case alphabetic vocabulary entries that tokenize to exactly one id on their own."""
    vocab = tokenizer.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and w.islower() and len(w) > 2)
    out = []
    for w in words:
        if len(tokenizer.encode(w, add_special_tokens=False).ids) == 1:
            out.append(w)
        if len(out) >= limit:
            break
    return out


def texts_of_lengths(tokenizer: Any, lengths: list[int], seed: int = 0) -> list[str]:
    """Texts whose own tokenization is exactly ``lengths[i]`` ids (words joined by spaces)."""
    rng = np.random.default_rng(seed)
    words = single_token_words(tokenizer)
    texts = [" ".join(rng.choice(words, size=n)) for n in lengths]
    for text, n in zip(texts, lengths):
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) == n
    return texts


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
