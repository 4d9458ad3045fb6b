"""The FP8 path (``model.dtype: float8``) on CPU: its numerics in emulation against a reference, the
Triton quantize kernels in Triton's interpreter, the fidelity gate through the real CLI, and exit 2
where FP8 tensor cores are missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import hf_config, randomize  # noqa: E402

from embedder.models.fp8 import E4M3_MAX, Fp8Weight, fp8_linear_reference, quantize_rows  # noqa: E402
from embedder.models.packed_bert import PackedBertEncoder, build_attention  # noqa: E402
from embedder.models.pooling import pool, token_segments  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_FINITE = torch.unique(E4M3_VALUES[torch.isfinite(E4M3_VALUES)])


def _nearest_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3 by search over all finite values (ties: the even code)."""
    grid = E4M3_FINITE.double()
    d = (v.double().reshape(-1, 1) - grid.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    candidates = d <= best * (1 + 1e-12)
    codes = torch.tensor([int(torch.tensor([float(g)]).to(torch.float8_e4m3fn).view(torch.uint8)) for g in grid])
    pick = torch.where(candidates, (codes.reshape(1, -1) % 2 == 0).double() + 1.0, 0.0).argmax(dim=1)
    return grid[pick].reshape(v.shape).float()


def test_rowwise_scales_map_each_row_maximum_to_448_and_round_to_nearest_e4m3() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of any magnitude
    x[3] = 0.0  # an all-zero row
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    amax = x.abs().amax(1, keepdim=True)
    torch.testing.assert_close(scale[amax > 0], (amax / E4M3_MAX)[amax > 0], rtol=1e-7, atol=0)
    assert torch.equal(q.float().abs().amax(1)[amax[:, 0] > 0], torch.full((63,), E4M3_MAX))
    assert torch.isfinite(scale).all() and (q[3].float() == 0).all()
    # Exactly the nearest e4m3 of x / scale, and so within half a step (relative 2^-4) of x.
    inv = torch.full_like(amax, E4M3_MAX) / amax.clamp_min(1e-12)
    assert torch.equal(q.float(), _nearest_e4m3((x * inv).clamp(-E4M3_MAX, E4M3_MAX)))
    err = (q.float() * scale - x).abs()
    assert (err <= x.abs() * 2**-4 + scale * 2**-10 + 1e-30).all()


def test_e4m3_saturates_instead_of_overflowing_to_nan() -> None:
    """e4m3fn has no infinity: a cast past 448 is NaN on some backends, so values are clamped first."""
    x = torch.tensor([[1.0, -1.0, 0.5]])
    q, scale = quantize_rows(x, amax_floor=1e-12)
    scale_small = scale / 4  # values 4x past the range: clamped to ±448, never NaN
    q_over = (x / scale_small).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert torch.isfinite(q_over.float()).all() and q_over.float().abs().max() == E4M3_MAX


def test_per_channel_weight_quantization_and_the_emulated_gemm() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 32, generator=gen) * torch.logspace(-2, 2, 48).unsqueeze(1)  # channels of any size
    bias = torch.randn(48, generator=gen)
    w = Fp8Weight.from_dense(weight, bias, torch.device("cpu"))
    assert w.data.shape == (48, 32) and w.scale.shape == (1, 48) and w.scale.is_contiguous()
    assert w.data.t().stride() == (1, 32)  # the column-major mat2 torch._scaled_mm wants
    torch.testing.assert_close(w.scale[0], weight.abs().amax(1) / E4M3_MAX)
    assert torch.equal(w.data.float().abs().amax(1), torch.full((48,), E4M3_MAX))  # every channel uses the range
    x = torch.randn(20, 32, generator=gen)
    xq, xs = quantize_rows(x)
    got = fp8_linear_reference(xq, xs, w, out_dtype=torch.float32)
    # The reference of the reference: (a_fp8 * sa) @ (b_fp8 * sb)ᵀ + b
    expected = (xq.float() * xs) @ (w.data.float() * w.scale.t()).t() + bias.bfloat16().float()
    torch.testing.assert_close(got, expected)
    cos = F.cosine_similarity(got, x @ weight.t() + bias, dim=1)
    assert cos.min() > 0.995, cos.min()


def _hf_model(hidden: int = 64, act: str = "gelu", seed: int = 0):
    import transformers

    model = transformers.AutoModel.from_config(hf_config("bert", hidden, 2, 4, 96, act))
    randomize(model, seed, spread=0.05)
    return model.eval()


def _batch(lengths: list[int], seed: int = 4):
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(1000, 30000, size=sum(lengths)))
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    positions = torch.cat([torch.arange(n) for n in lengths])
    segments = token_segments(cu, int(cu[-1]))
    return ids, positions, cu, segments, build_attention(cu, segments, max(lengths), int(cu[-1]), varlen=False)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_emulated_fp8_forward_is_close_to_fp32_and_keeps_the_rest_in_bf16(act: str) -> None:
    model = _hf_model(act=act)
    fp32 = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.float32)
    fp8 = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.bfloat16, fp8="emulate", fused_add_norm=False)
    # Which parts are FP8: the four GEMMs of each layer; embeddings and LayerNorms stay bf16.
    assert all(t.dtype == torch.bfloat16 for t in fp8.embeddings)
    for layer in fp8.layers:
        assert [type(t).__name__ for t in layer] == ["Fp8Weight", "Fp8Weight", "Tensor", "Tensor"] * 2
        assert all(t.dtype == torch.bfloat16 for t in (layer[2], layer[3], layer[6], layer[7]))
        assert all(layer[i].data.dtype == torch.float8_e4m3fn for i in (0, 1, 4, 5))
    assert fp8.fp8_activation == ("gelu" if act == "gelu" else "gelu_tanh")  # erf stays erf in FP8
    ids, positions, cu, segments, meta = _batch([3, 64, 1, 29, 96])
    with torch.inference_mode():
        states = fp8(ids, positions, meta)
        assert states.dtype == torch.bfloat16
        got = pool(states, cu, segments, "mean")
        want = pool(fp32(ids, positions, meta), cu, segments, "mean")
    cos = F.cosine_similarity(got, want, dim=1)
    assert cos.min() > 0.999, cos
    # and FP8 is really in the loop: a broken weight scale moves the vectors
    fp8.layers[0][0].scale.mul_(8)
    with torch.inference_mode():
        broken = pool(fp8(ids, positions, meta), cu, segments, "mean")
    assert F.cosine_similarity(broken, want, dim=1).min() < 0.99


_KERNEL_CHECK = """
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from embedder.models.kernels import add_layer_norm, add_layer_norm_quantize, activation_quantize
from embedder.models.fp8 import quantize_rows
g = torch.Generator().manual_seed(0)
def codes(q):
    return q.view(torch.uint8)
for n in (64, 96, 1024):  # powers of two and masked columns; 37 rows: a partly empty last program
    h = torch.randn(37, n, generator=g).bfloat16()
    x = torch.randn(37, n, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(n, generator=g)).bfloat16()
    b = (0.1 * torch.randn(n, generator=g)).bfloat16()
    y, q, s = add_layer_norm_quantize(h, x, w, b, 1e-12)
    assert torch.equal(y, add_layer_norm(h, x, w, b, 1e-12)), "the bf16 output is the plain kernel's"
    torch.testing.assert_close(y.float(), F.layer_norm(h.float() + x.float(), (n,), w.float(), b.float(), 1e-12),
                               atol=2e-2, rtol=1e-2)
    rq, rs = quantize_rows(y)
    assert torch.equal(codes(q), codes(rq)) and torch.equal(s, rs), "the FP8 copy is quantize_rows(y), bit for bit"
    f = (3 * torch.randn(37, n, generator=g)).bfloat16()
    f[0] = 0
    f[1, :4] = torch.tensor([1e-4, -1e-4, 300.0, -2e-3])
    for act in ("none", "relu"):
        q, s = activation_quantize(f, act)
        rq, rs = quantize_rows(F.relu(f.float()) if act == "relu" else f)
        assert torch.equal(codes(q), codes(rq)) and torch.equal(s, rs), act
    for act, ref in (("gelu", F.gelu(f.double()).float()), ("gelu_tanh", F.gelu(f.double(), approximate="tanh").float())):
        q, s = activation_quantize(f, act)
        rq, rs = quantize_rows(ref)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        # libm erf/tanh vs torch's differ in the last bits: a value at a rounding tie may take the
        # other neighbour, never more than one e4m3 step away
        step = (rq.float().abs() * 2**-3).clamp_min(2**-9) * rs
        assert ((q.float() * s - rq.float() * rs).abs() <= step * 1.001).all(), act
        assert (codes(q) != codes(rq)).float().mean() < 0.05, act
sweep = torch.cat([torch.linspace(-448, 448, 100001), torch.linspace(-0.03, 0.03, 10001)]).reshape(1, -1)
q, s = activation_quantize(sweep.contiguous(), "none")
assert torch.equal(codes(q), codes(quantize_rows(sweep)[0])), "round to nearest even over the whole e4m3 range"
print("kernels match")
"""


def test_fused_quantize_kernels_match_the_reference_in_the_triton_interpreter() -> None:
    """add+LayerNorm+quantize and activation+quantize (Triton's interpreter on CPU) against
    ``quantize_rows``; Triton reads TRITON_INTERPRET when first imported, hence a fresh interpreter."""
    if sys.platform != "linux":
        pytest.skip("Triton ships for Linux only")
    import triton  # noqa: F401  (a test dependency on Linux: missing it fails, never skips)

    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = _KERNEL_CHECK.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels match" in done.stdout


_FUSED_FORWARD = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_fp8 as t
from embedder.models.packed_bert import PackedBertEncoder
model = t._hf_model(hidden=96)
plain = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.bfloat16, fp8="emulate", fused_add_norm=False)
fused = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.bfloat16, fp8="emulate", fused_add_norm=True)
assert fused.fp8.fused and not plain.fp8.fused
ids, positions, cu, segments, meta = t._batch([3, 64, 1, 29])
with torch.inference_mode():
    a, b = fused(ids, positions, meta).float(), plain(ids, positions, meta).float()
cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
assert cos.min() > 0.999, cos.min()
print("fused forward ok")
"""


def test_fp8_forward_with_the_fused_kernels_equals_the_pytorch_ops() -> None:
    if sys.platform != "linux":
        pytest.skip("Triton ships for Linux only")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = _FUSED_FORWARD.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused forward ok" in done.stdout


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "embedder.cli", "run", "-s", str(REPO / "examples/quickstart/docs.jsonl"),
         "--output", str(tmp_path / "out"), "--sink", "parquet", "--no-progress", *args],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("spelling", ["float8", "fp8"])
def test_float8_without_fp8_tensor_cores_exits_2_naming_the_requirement(tmp_path: Path, spelling: str) -> None:
    proc = _cli(tmp_path, "--device", "cpu", "--dtype", spelling)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "compute capability >= 8.9" in lines[0] and "FP8 tensor cores" in lines[0], lines
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_broken_fp8_scale_trips_the_fidelity_gate_before_anything_is_written(tmp_path: Path) -> None:
    """The gate through the real runner: FP8 emulated on CPU (test hook), QKV scales x8."""
    proc = _cli(tmp_path, "--dtype", "float8", EMBEDDER_TEST_FP8_EMULATE="1", EMBEDDER_TEST_FP8_SCALE="8")
    assert proc.returncode == 1, proc.stderr
    assert "FP8 fidelity gate failed" in proc.stderr and "validation.min_cosine 0.999" in proc.stderr
    assert "nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert not list((tmp_path / "out" / "_embedder").glob("shards/*")), "no shard recorded as done"


def test_an_fp8_run_that_passes_the_gate_writes_vectors_close_to_fp32(tmp_path: Path) -> None:
    """The same run without the broken scale (the bound lowered to what e4m3 gives the real MiniLM
    on these texts, ~0.994-0.996 in emulation): it passes the gate and the fp32 canaries."""
    import pyarrow.dataset as ds

    proc = _cli(tmp_path, "--dtype", "fp8", "--set", "validation.min_cosine=0.99", EMBEDDER_TEST_FP8_EMULATE="1")
    assert proc.returncode == 0, proc.stderr
    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.num_rows > 0
    import json

    run = json.loads(next((tmp_path / "out" / "_embedder" / "runs").glob("*.json")).read_text())
    assert run["dtype"] == "float8_e4m3fn" and run["canary"]["min_cosine"] >= 0.99
