"""``embedder.embed``: one vector per text, equal to ``SentenceTransformer.encode`` with the same prompt,
the encoder loaded once per settings; ``open_index(...).embed`` of a list of queries."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import embedder
from embedder.api import EmbedError, encoder_for
from embedder.config import ConfigError
from tests.embedder.models.tiny_models import cosines, save_tiny_model

FP32_MIN_COS = 0.9999
TOPICS = ["rivers", "mountains", "bread", "stars", "bees", "chess", "tides", "volcanoes", "coffee", "sleep"]
PROMPTS = {"query": "Represent the question: ", "document": "Represent the document: "}


def _texts(n: int = 50) -> list[str]:
    rng = np.random.default_rng(3)
    words = ["the", "a", "of", "water", "light", "time", "people", "small", "old", "river", "Ünïcödé", "漢字", "—"]
    return [f"A note about {TOPICS[i % 10]}. " + " ".join(rng.choice(words, size=int(rng.integers(1, 60))))
            for i in range(n)]


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory, minilm_path: str) -> str:
    """A tiny random BERT whose saved prompts differ for documents and queries."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "prompted", minilm_path, prompts=PROMPTS, seed=5)


def test_embed_of_50_texts_equals_sentence_transformers(minilm) -> None:
    texts = _texts(50)
    vectors = embedder.embed(texts, model="all-MiniLM-L6-v2", device="cpu")
    reference = minilm.encode(texts, convert_to_numpy=True)  # MiniLM's document prompt is empty
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.shape == (50, 384)
    assert cosines(vectors, reference).min() >= FP32_MIN_COS
    assert cosines(embedder.embed(texts, kind="query", device="cpu"), reference).min() >= FP32_MIN_COS


def test_embed_uses_the_document_prompt_and_the_query_prompt_on_request(prompted_model: str) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(prompted_model, device="cpu")
    texts = _texts(20)
    documents = embedder.embed(texts, model=prompted_model, device="cpu")
    queries = embedder.embed(texts, model=prompted_model, device="cpu", kind="query")
    own = embedder.embed(texts, model=prompted_model, device="cpu", prompt="")
    assert cosines(documents, st.encode(texts, prompt=PROMPTS["document"])).min() >= FP32_MIN_COS
    assert cosines(queries, st.encode(texts, prompt=PROMPTS["query"])).min() >= FP32_MIN_COS
    assert cosines(own, st.encode(texts)).min() >= FP32_MIN_COS
    assert cosines(documents, queries).min() < 0.999  # the prompts do change the vectors


def test_arrow_output_single_text_and_other_iterables(minilm) -> None:
    texts = _texts(5)
    arrow = embedder.embed(texts, device="cpu", output="arrow")
    assert arrow.type == pa.list_(pa.float32(), 384) and len(arrow) == 5
    numpy = embedder.embed(texts, device="cpu")
    np.testing.assert_array_equal(np.asarray(arrow.values).reshape(5, 384), numpy)
    one = embedder.embed(texts[0], device="cpu")
    assert one.shape == (384,) and cosines(one[None], numpy[:1]).min() >= FP32_MIN_COS
    from_arrow = embedder.embed(pa.array(texts), device="cpu")
    import pandas as pd

    from_series = embedder.embed(pd.Series(texts), device="cpu")
    assert cosines(from_arrow, numpy).min() >= FP32_MIN_COS and cosines(from_series, numpy).min() >= FP32_MIN_COS
    assert embedder.embed([], device="cpu").shape == (0, 384)


def test_the_encoder_is_loaded_once_per_settings() -> None:
    first = encoder_for("all-MiniLM-L6-v2", device="cpu")
    assert encoder_for("all-MiniLM-L6-v2", device="cpu") is first
    assert encoder_for("all-MiniLM-L6-v2", device="cpu", max_seq_length=64) is not first


def test_long_texts_are_truncated_with_a_warning(minilm) -> None:
    texts = ["short text", "word " * 400]
    with pytest.warns(UserWarning, match=r"1 of 2 text\(s\).*256 tokens and were truncated"):
        vectors = embedder.embed(texts, device="cpu")
    assert cosines(vectors, minilm.encode(texts)).min() >= FP32_MIN_COS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder.embed(["short text"], device="cpu")  # nothing truncated: no warning


def test_bad_input_names_the_fix() -> None:
    with pytest.raises(EmbedError, match=r"texts\[1\] is int, not a string"):
        embedder.embed(["fine", 3], device="cpu")
    with pytest.raises(EmbedError, match="Valid: document, query"):
        embedder.embed(["x"], kind="passage")
    with pytest.raises(EmbedError, match="Valid: numpy, arrow"):
        embedder.embed(["x"], output="list")
    with pytest.raises(ConfigError, match="unknown key 'max_seq_lenght'"):
        embedder.embed(["x"], max_seq_lenght=64)


def test_open_index_embeds_a_list_of_queries(tmp_path: Path, minilm) -> None:
    output = str(tmp_path / "db")
    documents = [f"A short note about {topic}." for topic in TOPICS]
    result = embedder.run(
        {"source": {"uri": documents}, "output": {"uri": output}, "model": {"device": "cpu"},
         "runner": {"workers": 1, "show_progress": False}, "validation": {"canary_samples": 0}}
    )
    assert result.state == "done"
    index = embedder.open_index(output)
    queries = ["where do bees live?", "how are volcanoes formed?", "chess openings"]
    vectors = index.embed(queries)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert cosines(vectors, minilm.encode(queries)).min() >= FP32_MIN_COS  # MiniLM's query prompt is empty
    assert cosines(index.embed(queries[0])[None], vectors[:1]).min() >= FP32_MIN_COS  # one string: [dim]
    assert index.embed(queries[0]).shape == (384,)
    assert index.embed([]).shape == (0, 384)
    assert [index.search_vector(v, k=1)[0].doc_id for v in vectors] == ["4", "7", "5"]  # bees, volcanoes, chess


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "min_cos"), [("bfloat16", 0.999), ("float16", 0.999), ("float32", FP32_MIN_COS)])
def test_embed_on_cuda_matches_sentence_transformers_fp32(minilm, dtype: str, min_cos: float) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    texts = _texts(50) + ["word " * 400]  # one past the limit: truncated like sentence-transformers
    with pytest.warns(UserWarning, match="truncated"):
        vectors = embedder.embed(texts, device="cuda", dtype=dtype)
    assert vectors.dtype == np.float32 and vectors.shape == (51, 384)
    assert cosines(vectors, minilm.encode(texts, convert_to_numpy=True)).min() >= min_cos
    encoder = encoder_for("all-MiniLM-L6-v2", device="cuda", dtype=dtype)
    assert encoder.device.type == "cuda"
