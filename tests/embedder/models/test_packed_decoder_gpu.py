"""GPU fidelity of the packed decoder forward (varlen causal/bidirectional attention with grouped-query
heads, bf16) against sentence-transformers fp32, for each tiny decoder family, on batches mixing
very different lengths up to a long limit. Run on a CUDA machine with
``python -m pytest -m gpu tests/embedder/models/test_packed_decoder_gpu.py``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

from test_packed_decoder import DECODERS, _texts_up_to  # noqa: E402
from tiny_models import cosines, save_tiny_decoder  # noqa: E402

from embedder.config import ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HALF_MIN_COS = 0.999


@pytest.fixture(scope="module")
def gpu_decoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpu-decoders")
    # Realistic scales (spread 0.05 instead of 0.3): bf16 rounding then behaves as in trained models.
    return {
        name: save_tiny_decoder(root / name, seed=i, max_seq_length=1024, hidden=128, heads=4, kv_heads=2,
                                spread=0.05, **kw)
        for i, (name, kw) in enumerate(DECODERS.items())
    }


@pytest.mark.parametrize("name", list(DECODERS))
def test_bf16_varlen_decoder_matches_sentence_transformers_fp32(
    gpu_decoder_dirs: dict[str, str], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sentence_transformers import SentenceTransformer

    with caplog.at_level(logging.INFO, logger="embedder.models.encoder"):
        encoder = Encoder.load(ModelConfig(name=gpu_decoder_dirs[name], device="cuda", dtype="bfloat16"))
    assert encoder.packed and encoder._packed_model.attention_backend == "varlen"
    assert not [r for r in caplog.records if "padded Hugging Face forward" in r.getMessage()]
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = SentenceTransformer(gpu_decoder_dirs[name], device="cuda").float()
    texts = _texts_up_to(encoder, 40, seed=3)
    for prompt in {encoder.document_prompt, encoder.query_prompt}:
        ours = encoder.encode_texts(texts, prompt)
        theirs = reference.encode(texts, prompt=prompt, batch_size=8, convert_to_numpy=True)
        cos = cosines(ours, theirs)
        assert cos.min() >= HALF_MIN_COS, (name, prompt, float(cos.min()), int(np.argmin(cos)))


def test_fp32_padded_on_cuda_matches_too(gpu_decoder_dirs: dict[str, str]) -> None:
    """The padded backend (fp32 on CUDA) gives the fp32 vectors: the same code path as CPU."""
    from sentence_transformers import SentenceTransformer

    path = gpu_decoder_dirs["qwen3-eos"]
    encoder = Encoder.load(ModelConfig(name=path, device="cuda", dtype="float32"))
    assert encoder._packed_model.attention_backend == "padded"
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = SentenceTransformer(path, device="cuda").float()
    texts = _texts_up_to(encoder, 16, seed=5)
    cos = cosines(encoder.encode_texts(texts, ""), reference.encode(texts, batch_size=8, convert_to_numpy=True))
    assert cos.min() >= 0.9999


@pytest.mark.parametrize("name", list(DECODERS))
def test_fp32_gemm_outputs_are_no_further_from_fp32(gpu_decoder_dirs: dict[str, str], name: str) -> None:
    """``fp32_gemm_out`` (cuBLAS writes float32, one rounding less per GEMM) passes the same bound,
    with a mean error no larger than the default fused forward's on the same texts."""
    from sentence_transformers import SentenceTransformer

    from embedder.models.packed_decoder import PackedDecoderEncoder

    path = gpu_decoder_dirs[name]
    encoder = Encoder.load(ModelConfig(name=path, device="cuda", dtype="bfloat16"))
    assert encoder._packed_model.fused
    torch.backends.cuda.matmul.allow_tf32 = False
    texts = _texts_up_to(encoder, 40, seed=4)
    reference = SentenceTransformer(path, device="cuda").float()
    theirs = reference.encode(texts, prompt=encoder.document_prompt or None, batch_size=8, convert_to_numpy=True)
    default = cosines(encoder.encode_texts(texts, encoder.document_prompt), theirs)
    hf = reference[0].auto_model
    encoder._packed_model = PackedDecoderEncoder.from_hf(hf, encoder.device, encoder.dtype, fp32_gemm_out=True)
    assert encoder._packed_model.fp32_gemm_out
    fp32_out = cosines(encoder.encode_texts(texts, encoder.document_prompt), theirs)
    assert fp32_out.min() >= HALF_MIN_COS, (name, float(fp32_out.min()))
    assert (1 - fp32_out).mean() <= (1 - default).mean(), (name, float(fp32_out.mean()), float(default.mean()))
