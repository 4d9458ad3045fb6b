"""GPU fidelity of the packed forward (varlen attention, fp16/bf16) against sentence-transformers
fp32, the asynchronous pipeline, and the out-of-memory back-off. Run on a CUDA machine with
``python -m pytest -m gpu tests/embedder/models/test_encoder_gpu.py``. The FlashAttention-4 tests run
where the optional ``flash-attn-4`` package is installed on a Hopper/Blackwell GPU."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import cosines, save_tiny_model, texts_of_lengths  # noqa: E402

from embedder.config import ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder  # noqa: E402
from embedder.packing import TokenBudgetPacker, build_batch  # noqa: E402
from embedder.records import Chunk  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HALF_MIN_COS = 0.999

FAMILIES = {
    "bert-mean": dict(family="bert", pooling="mean"),
    "bge-like-bert-cls": dict(family="bert", pooling="cls", prompts={"query": "Represent this sentence: "}),
    "e5-like-xlmr-mean": dict(family="xlm-roberta", pooling="mean", prompts={"query": "query: ", "passage": "passage: "}),
    "instructor-like-no-prompt-pooling": dict(
        family="bert", pooling="mean", include_prompt=False, prompts={"document": "Represent the document: "}
    ),
}


@pytest.fixture(scope="module")
def gpu_tiny_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-gpu")
    # Moderate weights (spread 0.05 at hidden 64): random models with huge activations are chaotic in
    # half precision, unlike trained ones; this keeps the test about the kernels, not the weights.
    return {
        name: save_tiny_model(root / name, minilm_path, hidden=64, max_seq_length=256, spread=0.05, seed=i, **kw)
        for i, (name, kw) in enumerate(FAMILIES.items())
    }


def _fp32_reference(path: str, texts: list[str], prompt: str) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cuda")
    return model.encode(texts, prompt=prompt or None, batch_size=64, convert_to_numpy=True)


def _lengths(encoder: Encoder) -> list[int]:
    room = encoder.max_seq_length - encoder.layout.overhead
    rng = np.random.default_rng(0)
    return sorted({1, 2, room - 1, room, *rng.integers(1, room, size=60).tolist()})


def _flash4_problem() -> str | None:
    from embedder.models.packed_bert import attention_problem

    return attention_problem("flash4", torch.device("cuda"), torch.bfloat16, 64)


needs_flash4 = pytest.mark.skipif(
    not torch.cuda.is_available() or _flash4_problem() is not None,
    reason="flash-attn-4 not usable here (optional extra, Hopper/Blackwell)",
)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_minilm_half_precision_varlen_matches_fp32(minilm_path: str, dtype: str) -> None:
    encoder = Encoder.load(ModelConfig(name=minilm_path, device="cuda", dtype=dtype, attention="varlen"))
    assert encoder.packed and encoder._packed_model.attention_backend == "varlen"
    texts = texts_of_lengths(encoder.tokenizer, _lengths(encoder), seed=1)
    ours = encoder.encode_texts(texts, "")
    assert cosines(ours, _fp32_reference(minilm_path, texts, "")).min() >= HALF_MIN_COS


@needs_flash4
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash4_attention_matches_fp32_and_the_varlen_kernel(minilm_path: str, dtype: str) -> None:
    """FlashAttention-4 on packed batches mixing lengths 1..limit: the fidelity bar against
    sentence-transformers fp32, and the same vectors as torch's varlen FlashAttention-2."""
    flash4 = Encoder.load(ModelConfig(name=minilm_path, device="cuda", dtype=dtype, attention="flash4"))
    assert flash4._packed_model.attention_backend == "flash4"
    assert Encoder.load(ModelConfig(name=minilm_path, device="cuda"))._packed_model.attention_backend == "varlen"
    varlen = Encoder.load(ModelConfig(name=minilm_path, device="cuda", dtype=dtype, attention="varlen"))
    texts = texts_of_lengths(flash4.tokenizer, _lengths(flash4) * 3, seed=7)
    ours = flash4.encode_texts(texts, "")
    assert cosines(ours, _fp32_reference(minilm_path, texts, "")).min() >= HALF_MIN_COS
    assert cosines(ours, varlen.encode_texts(texts, "")).min() >= 0.9999


@needs_flash4
@pytest.mark.parametrize("name", list(FAMILIES))
def test_flash4_tiny_families_match_fp32(gpu_tiny_dirs: dict[str, str], name: str) -> None:
    path = gpu_tiny_dirs[name]
    encoder = Encoder.load(ModelConfig(name=path, device="cuda", attention="flash4"))
    texts = texts_of_lengths(encoder.tokenizer, _lengths(encoder), seed=8)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    assert cosines(ours, _fp32_reference(path, texts, encoder.document_prompt)).min() >= HALF_MIN_COS


def test_minilm_defaults_fuse_gelu_and_add_norm_and_exact_gelu_stays_available(minilm_path: str) -> None:
    """Default on CUDA half precision: tanh-GELU in the matmul epilogue and the Triton add+LayerNorm;
    ``approximate_gelu: false`` keeps erf exact. Both meet the fidelity bar."""
    fused = Encoder.load(ModelConfig(name=minilm_path, device="cuda"))
    assert fused._packed_model.gelu_fused and fused._packed_model.add_norm_fused
    exact = Encoder.load(ModelConfig(name=minilm_path, device="cuda", approximate_gelu=False))
    assert not exact._packed_model.gelu_fused
    texts = texts_of_lengths(fused.tokenizer, _lengths(fused), seed=5)
    reference = _fp32_reference(minilm_path, texts, "")
    assert cosines(fused.encode_texts(texts, ""), reference).min() >= HALF_MIN_COS
    assert cosines(exact.encode_texts(texts, ""), reference).min() >= HALF_MIN_COS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [384, 768, 1024])
def test_fused_add_layer_norm_kernel_matches_pytorch(dtype: torch.dtype, hidden: int) -> None:
    from embedder.models.kernels import add_layer_norm

    gen = torch.Generator(device="cuda").manual_seed(hidden)
    rows = 4099  # not a multiple of the rows a program takes
    h = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen)
    x = 3 * torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen) + 1
    w = torch.randn(hidden, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(hidden, device="cuda", dtype=dtype, generator=gen)
    expected = torch.nn.functional.layer_norm(h.float() + x.float(), (hidden,), w.float(), b.float(), 1e-12)
    torch.testing.assert_close(add_layer_norm(h, x, w, b, 1e-12).float(), expected, atol=3e-2, rtol=2e-2)


def test_token_granule_tops_batches_up_on_cuda(minilm_path: str) -> None:
    encoder = Encoder.load(ModelConfig(name=minilm_path, device="cuda"))
    assert encoder.token_granule == 512
    texts = texts_of_lengths(encoder.tokenizer, [3, 100, 254, 17], seed=6)  # 382 tokens: 130 filler
    ours = encoder.encode_texts(texts, "")
    assert cosines(ours, _fp32_reference(minilm_path, texts, "")).min() >= HALF_MIN_COS


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_families_half_precision_match_fp32(gpu_tiny_dirs: dict[str, str], name: str, dtype: str) -> None:
    path = gpu_tiny_dirs[name]
    encoder = Encoder.load(ModelConfig(name=path, device="cuda", dtype=dtype, attention="varlen"))
    assert encoder._packed_model.attention_backend == "varlen"
    texts = texts_of_lengths(encoder.tokenizer, _lengths(encoder), seed=2)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    assert cosines(ours, _fp32_reference(path, texts, encoder.document_prompt)).min() >= HALF_MIN_COS
    queries = encoder.encode_queries(texts[:16])
    assert cosines(queries, _fp32_reference(path, texts[:16], encoder.query_prompt)).min() >= HALF_MIN_COS


def test_async_batches_in_flight_give_the_sync_vectors(minilm_path: str) -> None:
    encoder = Encoder.load(ModelConfig(name=minilm_path, device="cuda", token_budget=2048))
    texts = texts_of_lengths(encoder.tokenizer, _lengths(encoder) * 4, seed=3)
    chunks = [
        Chunk(doc_id=f"d{i}", chunk_index=0, text=t, content_hash="",
              token_ids=np.asarray(encoder.tokenizer.encode(t, add_special_tokens=False).ids, np.int32))
        for i, t in enumerate(texts)
    ]
    packer = TokenBudgetPacker(encoder.layout, encoder.token_budget)
    batches = [*packer.add(chunks), *packer.flush()]
    assert len(batches) > 6  # more batches than pinned slots: slots get reused while in flight
    handles = [encoder.encode_async(b) for b in batches]
    for batch, handle in zip(batches, handles):
        np.testing.assert_allclose(handle.result(), encoder.encode(batch), atol=2e-3)


def test_out_of_memory_halves_the_budget_and_still_embeds(minilm_path: str, caplog: pytest.LogCaptureFixture) -> None:
    encoder = Encoder.load(ModelConfig(name=minilm_path, device="cuda", token_budget=1 << 20))
    room = encoder.max_seq_length - encoder.layout.overhead
    rng = np.random.default_rng(4)
    chunks = [
        Chunk(doc_id=f"d{i}", chunk_index=0, text="", content_hash="", token_ids=rng.integers(2000, 29000, room).astype(np.int32))
        for i in range(3000)
    ]
    batch = build_batch(chunks, encoder.layout)  # 768k tokens in one batch
    small = build_batch(chunks[:64], encoder.layout)
    expected_small = encoder.encode(small)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total)  # a 3 GiB card
    try:
        with caplog.at_level(logging.WARNING, logger="embedder.models.encoder"):
            vectors = encoder.encode(batch)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    assert encoder.token_budget < batch.num_tokens
    assert vectors.shape == (3000, 384)
    assert cosines(vectors[:64], expected_small).min() >= HALF_MIN_COS
