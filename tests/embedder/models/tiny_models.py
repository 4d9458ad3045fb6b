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
DECODER_FAMILIES = ("qwen3", "qwen2", "mistral", "llama")
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer pattern (its tokenizer.json), so ``Query:`` + a word merges as in the real model."""


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


def decoder_config(
    family: str,
    hidden: int,
    layers: int,
    heads: int,
    max_positions: int,
    vocab_size: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    head_dim: int | None = None,
    **extra: Any,
) -> Any:
    """A transformers config of a decoder ``family`` (qwen3, qwen2, mistral, llama); ``extra`` keys
    (``is_causal``, ``rope_theta``, ``sliding_window``...) go into the config as they would in a
    ``config.json``."""
    import transformers

    classes = {
        "qwen3": transformers.Qwen3Config,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "llama": transformers.LlamaConfig,
    }
    if family not in classes:
        raise ValueError(f"unknown decoder family {family!r}")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 3 * hidden,
        max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=None,
        bos_token_id=None, eos_token_id=None,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    kwargs.update(extra)
    return classes[family](**kwargs)


def bpe_tokenizer(style: str, texts: list[str], vocab_size: int = 600) -> Any:
    """A small BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer.

    ``style``:

    * ``qwen3`` — byte-level BPE with Qwen2's split pattern; the post-processor appends
      ``<|endoftext|>`` as Qwen3-Embedding's does.
    * ``qwen2`` — the same byte-level BPE, no special tokens added at all.
    * ``mistral`` — SentencePiece-style BPE (``▁`` for spaces, one prepended to the text, byte
      fallback), ``<s>`` before and ``</s>`` after the text as e5-mistral's.
    * ``llama`` — the same, ``<s>`` before the text only; ``llama-legacy``: the older conversion
      (a ``Prepend("▁")`` + ``Replace`` normalizer, no pre-tokenizer).
    """
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style in ("qwen3", "qwen2"):
        specials = ["<|endoftext|>"]
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        eos = tok.token_to_id("<|endoftext|>")
        if style == "qwen3":
            tok.post_processor = processors.TemplateProcessing(
                single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
            )
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if style in ("mistral", "llama", "llama-legacy"):
        specials = ["<unk>", "<s>", "</s>"]
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        # Trained on words (SentencePiece never merges across a space), used on whole texts like Mistral's.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        if style == "llama-legacy":  # the older conversion: a normalizer prepends "▁" and replaces spaces
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
            tok.pre_tokenizer = None
            tok.decoder = decoders.Sequence([
                decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
            ])
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        single = "<s> $A </s>" if style == "mistral" else "<s> $A"  # llama, llama-legacy: BOS only
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    raise ValueError(f"unknown tokenizer style {style!r}")


def training_texts() -> list[str]:
    """The quickstart corpus's texts and titles (a few thousand words of plain English)."""
    import json

    path = Path(__file__).resolve().parents[3] / "examples" / "quickstart" / "docs.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the corpus keeps a malformed line on purpose (quarantine demo)
            continue
    rows = [r for r in rows if isinstance(r.get("text"), str)]
    # Queries after Qwen3-Embedding's "Query:" often enough that byte-level BPE learns ":how", ":he"...
    queries = [f"Query:{w}" for w in ("how", "hello", "what", "The", "he") for _ in range(40)]
    return [r["text"] for r in rows] + [r["title"] for r in rows] + ["0123456789 .,;:!?'\"()-", *queries]


def save_tiny_decoder(
    dest: Path,
    family: str = "qwen3",
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    max_seq_length: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    seed: int = 0,
    spread: float = 0.3,
    tokenizer_style: str | None = None,
    **config_extra: Any,
) -> str:
    """Builds and saves a random decoder embedding model with last-token pooling; returns its directory.

    The tokenizer is ``bpe_tokenizer(tokenizer_style or family, training_texts())``, saved with the
    model; ``config_extra`` goes into the transformers config (e.g. ``is_causal=False``).
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
    tokenizer = bpe_tokenizer(tokenizer_style or family, training_texts())
    tokenizer.model_max_length = max_seq_length
    if family == "qwen3":
        tokenizer.padding_side = "left"  # as Qwen3-Embedding's: the packed path has no padding at all
    tokenizer.save_pretrained(hf_dir)
    config = decoder_config(
        family, hidden, layers, heads, max_seq_length, len(tokenizer), kv_heads=kv_heads, head_dim=head_dim,
        **config_extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    randomize(model, seed, spread)
    model.save_pretrained(hf_dir)

    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules: list[Any] = [transformer, models.Pooling(hidden, pooling_mode="lasttoken")]
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu")
    st.save(str(dest))
    shutil.rmtree(hf_dir)
    return str(dest)


def randomize(model: Any, seed: int, spread: float = 0.3) -> None:
    """Redraws every weight: LayerNorm scales around 1, everything else around 0 with ``spread``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if "LayerNorm.weight" in name or name.lower().endswith("norm.weight"):  # LayerNorm, *_norm, RMSNorm
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
