"""The encoder against sentence-transformers: same vectors (cos ≥ 0.9999 in fp32) for the bundled
MiniLM and tiny random models of each supported layout (BERT+mean, BGE-like BERT+CLS with a query
instruction, E5-like XLM-R+mean with query/passage prompts, INSTRUCTOR-like pooling without the
prompt), through the packed path and the padded fallback; plus the errors users hit."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import cosines, save_tiny_model, texts_of_lengths  # noqa: E402

from embedder.config import ConfigError, ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder, ModelError, split_batch  # noqa: E402
from embedder.packing import TokenBudgetPacker, build_batch  # noqa: E402
from embedder.records import Chunk  # noqa: E402

FP32_MIN_COS = 0.9999

TINY_MODELS = {
    "bert-mean": dict(family="bert", pooling="mean"),
    "bge-like-bert-cls": dict(
        family="bert", pooling="cls", prompts={"query": "Represent this sentence for searching relevant passages: "}
    ),
    "e5-like-xlmr-mean": dict(family="xlm-roberta", pooling="mean", prompts={"query": "query: ", "passage": "passage: "}),
    "instructor-like-no-prompt-pooling": dict(
        family="bert",
        pooling="mean",
        include_prompt=False,
        prompts={"query": "Represent the question: ", "document": "Represent the document: "},
    ),
    "bert-lasttoken-unnormalized": dict(family="bert", pooling="lasttoken", normalize=False, hidden_act="gelu_new"),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {name: save_tiny_model(root / name, minilm_path, seed=i, **kw) for i, (name, kw) in enumerate(TINY_MODELS.items())}
    dirs["distilbert"] = save_tiny_model(root / "distilbert", minilm_path, family="distilbert")
    return dirs


def _reference(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _mixed_lengths(encoder: Encoder, prompt: str) -> list[int]:
    """Own-token lengths from 1 to the exact limit (specials + prompt + text == max_seq_length)."""
    room = encoder.max_seq_length - encoder.layout_for(prompt).overhead
    rng = np.random.default_rng(7)
    return sorted({1, 2, 3, room - 1, room, *rng.integers(1, room, size=12).tolist()})


def _chunks(encoder: Encoder, texts: list[str]) -> list[Chunk]:
    return [
        Chunk(doc_id=f"d{i}", chunk_index=0, text=t, content_hash="",
              token_ids=np.asarray(encoder.tokenizer.encode(t, add_special_tokens=False).ids, dtype=np.int32))
        for i, t in enumerate(texts)
    ]


def test_bundled_minilm_matches_sentence_transformers(minilm, minilm_path: str) -> None:
    encoder = Encoder.load(ModelConfig(name="all-MiniLM-L6-v2"))
    assert encoder.source == minilm_path
    assert (encoder.architecture, encoder.pooling, encoder.normalize, encoder.dim) == ("BertModel", "mean", True, 384)
    assert encoder.packed and encoder.max_seq_length == 256
    lengths = _mixed_lengths(encoder, encoder.document_prompt)
    assert encoder.max_seq_length - encoder.layout.overhead in lengths  # a sequence at the exact limit
    texts = texts_of_lengths(encoder.tokenizer, lengths, seed=1)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    reference = minilm.encode(texts, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    assert cosines(ours, reference).min() >= FP32_MIN_COS
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_real_text_with_punctuation_and_unicode(minilm) -> None:
    encoder = Encoder.load(ModelConfig())
    texts = [
        "Anarchism is a political philosophy and movement that is sceptical of authority.",
        "Ünïcödé — “quotes”, emoji 🙂 and CJK 漢字 mixed in.",
        "x",
        "",
        "word " * 400,  # longer than the limit: truncated like sentence-transformers does
    ]
    assert cosines(encoder.encode_texts(texts, ""), minilm.encode(texts)).min() >= FP32_MIN_COS


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_models_match_sentence_transformers(tiny_dirs: dict[str, str], name: str) -> None:
    path = tiny_dirs[name]
    reference = _reference(path)
    encoder = Encoder.load(ModelConfig(name=path))
    assert encoder.packed
    spec = TINY_MODELS[name]
    assert encoder.pooling == spec["pooling"]
    assert encoder.normalize == spec.get("normalize", True)
    prompts = spec.get("prompts", {})
    expected_doc = prompts.get("document") or prompts.get("passage") or ""
    assert encoder.document_prompt == expected_doc
    assert encoder.query_prompt == prompts.get("query", "")
    if spec["family"] == "xlm-roberta":
        assert encoder.layout.position_offset == 1  # padding_idx + 1

    texts = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, encoder.document_prompt), seed=2)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    theirs = reference.encode(texts, prompt=encoder.document_prompt or None)
    assert cosines(ours, theirs).min() >= FP32_MIN_COS

    query_texts = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, encoder.query_prompt), seed=3)
    ours_q = encoder.encode_queries(query_texts)
    theirs_q = reference.encode(query_texts, prompt=encoder.query_prompt or None)
    assert cosines(ours_q, theirs_q).min() >= FP32_MIN_COS


def test_packed_batches_keep_chunk_order(tiny_dirs: dict[str, str]) -> None:
    """Chunks go through a length-sorting packer in several batches; vectors follow each batch's order."""
    path = tiny_dirs["e5-like-xlmr-mean"]
    encoder = Encoder.load(ModelConfig(name=path, token_budget=512))
    reference = _reference(path)
    texts = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, encoder.document_prompt) * 3, seed=4)
    chunks = _chunks(encoder, texts)
    packer = TokenBudgetPacker(encoder.layout, encoder.token_budget, window_batches=2)
    batches = [*packer.add(chunks), *packer.flush()]
    assert len(batches) > 3 and all(b.num_tokens <= 512 for b in batches)
    got = {}
    for batch in batches:
        for chunk_id, vector in zip(batch.chunk_ids, encoder.encode(batch)):
            got[chunk_id] = vector
    ours = np.stack([got[c.id] for c in chunks])
    assert cosines(ours, reference.encode(texts, prompt=encoder.document_prompt)).min() >= FP32_MIN_COS


def test_split_batch_halves_give_the_same_vectors(tiny_dirs: dict[str, str]) -> None:
    """What the out-of-memory back-off does: the two halves' vectors, in order, equal the batch's."""
    encoder = Encoder.load(ModelConfig(name=tiny_dirs["instructor-like-no-prompt-pooling"]))
    texts = texts_of_lengths(encoder.tokenizer, [5, 40, 1, 70, 9, 33, 2], seed=5)
    batch = build_batch(_chunks(encoder, texts), encoder.layout)
    first, second = split_batch(batch)
    assert first.chunk_ids + second.chunk_ids == batch.chunk_ids
    assert first.num_tokens + second.num_tokens == batch.num_tokens
    assert abs(first.num_tokens - second.num_tokens) <= int(np.diff(batch.cu_seqlens).max())
    whole = encoder.encode(batch)
    halves = np.concatenate([encoder.encode(first), encoder.encode(second)])
    np.testing.assert_allclose(halves, whole, atol=1e-5)


@pytest.mark.parametrize("name", ["instructor-like-no-prompt-pooling", "distilbert"])
def test_filler_sequences_topping_up_a_batch_change_no_vector(tiny_dirs: dict[str, str], name: str) -> None:
    """On CUDA batches are topped up to a token granule with filler sequences; they must not leak."""
    encoder = Encoder.load(ModelConfig(name=tiny_dirs[name]))
    texts = texts_of_lengths(encoder.tokenizer, [5, 40, 1, 70, 9], seed=9)
    batch = build_batch(_chunks(encoder, texts), encoder.layout)
    plain = encoder.encode(batch)
    encoder.token_granule = 97  # forces 1-3 filler sequences of odd lengths
    assert encoder._filler_lengths(batch)
    np.testing.assert_allclose(encoder.encode(batch), plain, atol=1e-5)


def test_architecture_without_packed_forward_uses_the_fallback(
    tiny_dirs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tiny_dirs["distilbert"]
    with caplog.at_level(logging.WARNING, logger="embedder.models.encoder"):
        encoder = Encoder.load(ModelConfig(name=path))
    assert not encoder.packed
    fallback_lines = [r for r in caplog.records if "padded Hugging Face forward" in r.getMessage()]
    assert len(fallback_lines) == 1 and "distilbert" in fallback_lines[0].getMessage()
    texts = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, ""), seed=6)
    assert cosines(encoder.encode_texts(texts, ""), _reference(path).encode(texts)).min() >= FP32_MIN_COS


def test_packed_false_forces_the_fallback_with_the_same_vectors(tiny_dirs: dict[str, str]) -> None:
    path = tiny_dirs["e5-like-xlmr-mean"]
    packed = Encoder.load(ModelConfig(name=path))
    padded = Encoder.load(ModelConfig(name=path, packed=False))
    assert packed.packed and not padded.packed
    texts = texts_of_lengths(packed.tokenizer, [1, 17, 60, 126], seed=8)
    np.testing.assert_allclose(
        padded.encode_texts(texts, "passage: "), packed.encode_texts(texts, "passage: "), atol=1e-5
    )


def test_prompt_overrides_and_query_prompt(tiny_dirs: dict[str, str]) -> None:
    path = tiny_dirs["bge-like-bert-cls"]
    encoder = Encoder.load(ModelConfig(name=path, document_prompt="passage: ", query_prompt="question: "))
    assert encoder.document_prompt == "passage: " and encoder.query_prompt == "question: "
    # the prompt's ids are exactly ids(prompt + text) - ids(text)
    assert encoder.tokenizer.encode("passage: ", add_special_tokens=False).ids == encoder.layout.prompt_ids.tolist()
    texts = ["what is a tiny model", "packing without padding"]
    theirs = _reference(path).encode(texts, prompt="question: ")
    assert cosines(encoder.encode_queries(texts), theirs).min() >= FP32_MIN_COS


def test_tokenizer_json_rebuilds_the_same_tokenizer(minilm) -> None:
    import tokenizers

    encoder = Encoder.load(ModelConfig())
    rebuilt = tokenizers.Tokenizer.from_str(encoder.tokenizer_json)
    text = "Rebuilt in a worker process, the tokenizer must give the same ids."
    assert rebuilt.encode(text, add_special_tokens=False).ids == encoder.tokenizer.encode(text, add_special_tokens=False).ids
    full = minilm.tokenizer(text)["input_ids"]
    assert [*encoder.layout.prefix_ids, *rebuilt.encode(text, add_special_tokens=False).ids, *encoder.layout.suffix_ids] == full
    assert encoder.tokenizer.truncation is None and encoder.tokenizer.padding is None


def test_provenance_names_model_and_weights(minilm_path: str) -> None:
    encoder = Encoder.load(ModelConfig())
    prov = encoder.provenance()
    digest = hashlib.sha256(b"model.safetensors\0" + (Path(minilm_path) / "model.safetensors").read_bytes()).hexdigest()
    assert prov["weights_sha256"] == digest
    assert prov == {
        "model": "all-MiniLM-L6-v2",
        "source": minilm_path,
        "weights_sha256": digest,
        "architecture": "BertModel",
        "pooling": "mean",
        "normalize": True,
        "document_prompt": "",
        "query_prompt": "",
        "max_seq_length": 256,
        "dim": 384,
        "dtype": "float32",
        "embedder_version": prov["embedder_version"],
    }


def test_max_seq_length_can_only_be_lowered(minilm) -> None:
    encoder = Encoder.load(ModelConfig(max_seq_length=64))
    assert encoder.max_seq_length == 64
    with pytest.raises(ConfigError, match="at most 256"):
        Encoder.load(ModelConfig(max_seq_length=1024))


def test_truncate_dim_equals_sentence_transformers_truncated_then_normalized(minilm_path: str) -> None:
    """Matryoshka: ``truncate_dim=128`` is ``SentenceTransformer(..., truncate_dim=128)`` then
    normalized (documents and queries), the vectors are 128 wide and the provenance says so."""
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.load(ModelConfig(truncate_dim=128))
    assert (encoder.dim, encoder.full_dim, encoder.truncate_dim) == (128, 384, 128)
    texts = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, encoder.document_prompt), seed=4)
    reference = SentenceTransformer(minilm_path, device="cpu", truncate_dim=128)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    theirs = reference.encode(texts, normalize_embeddings=True)
    assert ours.shape == theirs.shape == (len(texts), 128)
    assert cosines(ours, theirs).min() >= FP32_MIN_COS
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert cosines(encoder.encode_queries(texts[:3]), reference.encode(texts[:3], normalize_embeddings=True)).min() >= FP32_MIN_COS
    provenance = encoder.provenance()
    assert provenance["dim"] == 128 and provenance["truncate_dim"] == 128
    assert "truncate_dim" not in Encoder.load(ModelConfig(truncate_dim=384)).provenance()  # the full width


def test_truncate_dim_of_an_unnormalized_model_is_cut_but_not_rescaled(tiny_dirs: dict[str, str]) -> None:
    from sentence_transformers import SentenceTransformer

    path = tiny_dirs["bert-lasttoken-unnormalized"]
    encoder = Encoder.load(ModelConfig(name=path, truncate_dim=8))
    texts = ["a short text", "another text that is a little longer than the first one"]
    theirs = SentenceTransformer(path, device="cpu", truncate_dim=8).encode(texts)
    np.testing.assert_allclose(encoder.encode_texts(texts, ""), theirs, rtol=1e-4, atol=1e-5)


def test_truncate_dim_above_the_model_dimension_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.truncate_dim 512 is above the dimension .* \(384\); use at most 384"):
        Encoder.load(ModelConfig(truncate_dim=512))


def test_batch_longer_than_the_limit_is_refused() -> None:
    encoder = Encoder.load(ModelConfig(max_seq_length=16))
    chunk = Chunk(doc_id="d", chunk_index=0, text="", content_hash="", token_ids=np.full(30, 2000, np.int32))
    with pytest.raises(ValueError, match="max_seq_length 16"):
        encoder.encode(build_batch([chunk], encoder.layout))


def test_empty_batch_gives_no_vectors() -> None:
    encoder = Encoder.load(ModelConfig())
    assert encoder.encode(build_batch([], encoder.layout)).shape == (0, 384)
    assert encoder.encode_texts([], "").shape == (0, 384)


def test_half_precision_on_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="float32"):
        Encoder.load(ModelConfig(device="cpu", dtype="float16"))


def test_attention_auto_on_cpu_is_padded_and_gpu_kernels_asked_for_on_cpu_are_config_errors() -> None:
    assert Encoder.load(ModelConfig(device="cpu"))._packed_model.attention_backend == "padded"
    for kernel in ("varlen", "flash4"):
        with pytest.raises(ConfigError, match=f"model.attention={kernel}: .*needs CUDA in float16/bfloat16"):
            Encoder.load(ModelConfig(device="cpu", attention=kernel))


def test_missing_directory_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Encoder.load(ModelConfig(name=str(tmp_path / "no-such-model")))


def test_uncached_hub_id_offline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        Encoder.load(ModelConfig(name="embedder-tests/certainly-not-a-cached-model"))
    message = str(info.value)
    assert "\n" not in message
    assert "local model directory" in message and "network" in message


def test_a_cached_hub_model_loads_at_once_with_the_hub_unreachable(tmp_path: Path, minilm_path: str) -> None:
    """The probe's other answer: no hub, but the model is in the Hugging Face cache: it loads from
    there (local_files_only), without the hub client's minute of retries."""
    import os
    import shutil
    import subprocess
    import time

    repo = tmp_path / "hf" / "hub" / "models--embedder-tests--cached-minilm"
    shutil.copytree(minilm_path, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    env["PYTHONPATH"] = str(Path(__file__).parents[3])
    code = (
        "from embedder.models.loader import load_sentence_transformer\n"
        "model, _, local_dir = load_sentence_transformer('embedder-tests/cached-minilm', 'cpu', False)\n"
        "print(model.get_embedding_dimension() if hasattr(model, 'get_embedding_dimension') "
        "else model.get_sentence_embedding_dimension(), local_dir)"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["384", str(repo / "snapshots" / ("0" * 40))]
    assert "Retry" not in proc.stderr and elapsed < 20, (elapsed, proc.stderr)


def test_prompt_that_does_not_tokenize_apart_is_refused() -> None:
    with pytest.raises(ModelError, match="end the prompt with a space"):
        Encoder.load(ModelConfig(document_prompt="prefix"))  # "prefix" + "hello" → "prefixhello"


def test_token_budget_below_the_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="token_budget"):
        Encoder.load(ModelConfig(token_budget=100))
