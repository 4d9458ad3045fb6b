"""The packed ModernBERT forward against transformers and sentence-transformers (CPU, fp32).

Tiny random-weight ModernBERTs (6 layers: global attention in layers 0 and 3, a sliding window of
±16 tokens elsewhere, RoPE 160k/10k, no biases, GeGLU) with sequences up to 160 tokens, five times
the window: packing, per-sequence RoPE positions, the window and the layer types all show up as a
low cosine when wrong.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import cosines, hf_config, randomize, save_tiny_model, texts_of_lengths  # noqa: E402

from embedder.config import ConfigError, ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder  # noqa: E402
from embedder.models.packed_bert import build_attention  # noqa: E402
from embedder.models.packed_modernbert import (  # noqa: E402
    PackedModernBertEncoder,
    layer_plan,
    modernbert_support,
)
from embedder.models.pooling import token_segments  # noqa: E402

FP32_MIN_COS = 0.9999
MAX_LEN = 160
WINDOW = 32  # local_attention: each token sees ±16
SHAPE = dict(hidden=64, layers=6, heads=4, intermediate=96)

MODELS = {
    # gte-modernbert-base: CLS pooling, no prompts.
    "gte-modernbert-like-cls": dict(pooling="cls"),
    # modernbert-embed: mean pooling, search_query / search_document prompts.
    "modernbert-embed-like-mean": dict(
        pooling="mean", prompts={"query": "search_query: ", "document": "search_document: "}
    ),
}


@pytest.fixture(scope="module")
def modernbert_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-modernbert")
    return {
        name: save_tiny_model(
            root / name, minilm_path, family="modernbert", max_seq_length=MAX_LEN, seed=10 + i,
            config_overrides={"local_attention": WINDOW}, **SHAPE, **kw,
        )
        for i, (name, kw) in enumerate(MODELS.items())
    }


def _hf_model(seed: int = 0, **overrides):
    import transformers

    config = hf_config("modernbert", 64, 6, 4, MAX_LEN, "gelu", 96, local_attention=WINDOW, **overrides)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    randomize(model, seed)
    return model.eval()


def _mixed_lengths(encoder: Encoder, prompt: str) -> list[int]:
    """Own-token lengths from 1 (3 with the specials) to the exact limit, most longer than the window."""
    room = encoder.max_seq_length - encoder.layout_for(prompt).overhead
    rng = np.random.default_rng(7)
    return sorted({1, 2, 5, WINDOW // 2, WINDOW, room - 1, room, *rng.integers(1, room, size=14).tolist()})


def test_layer_plan_and_support_of_a_modernbert() -> None:
    model = _hf_model(global_attn_every_n_layers=3)
    assert modernbert_support(model) is None
    assert layer_plan(model.config) == [
        (False, 160000.0), (True, 10000.0), (True, 10000.0), (False, 160000.0), (True, 10000.0), (True, 10000.0),
    ]
    every_other = _hf_model(global_attn_every_n_layers=2, global_rope_theta=80000.0, local_rope_theta=5000.0)
    assert [local for local, _ in layer_plan(every_other.config)] == [False, True] * 3
    assert {theta for _, theta in layer_plan(every_other.config)} == {80000.0, 5000.0}
    # Older transformers' config fields (no layer_types / rope_parameters); local theta None: the global one.
    old_style = SimpleNamespace(num_hidden_layers=4, global_attn_every_n_layers=2, global_rope_theta=1e5, local_rope_theta=None)
    assert layer_plan(old_style) == [(False, 1e5), (True, 1e5), (False, 1e5), (True, 1e5)]


@pytest.mark.parametrize("attention", ["padded", "flex"])
@pytest.mark.parametrize("biases", [False, True])
def test_packed_token_states_equal_each_sequence_run_alone(attention: str, biases: bool) -> None:
    """No token attends across a sequence boundary or outside its window; RoPE restarts per sequence."""
    overrides = dict(attention_bias=True, mlp_bias=True, norm_bias=True) if biases else {}
    model = _hf_model(seed=1, **overrides)
    packed = PackedModernBertEncoder.from_hf(model, torch.device("cpu"), torch.float32, attention=attention)
    assert packed.attention_backend == attention and not packed.compiled
    lengths = [1, MAX_LEN, 7, 50, 2, 130, WINDOW // 2 + 1, 33]
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 30000, size=sum(lengths)))
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    positions = torch.cat([torch.arange(n) for n in lengths])
    meta = build_attention(cu, token_segments(cu, int(cu[-1])), max(lengths), int(cu[-1]), packed.varlen)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flex_attention on CPU without compile
        states = packed(ids, positions, meta)
        for i, n in enumerate(lengths):
            start = int(cu[i])
            alone = model(input_ids=ids[start : start + n].unsqueeze(0)).last_hidden_state[0]
            torch.testing.assert_close(states[start : start + n], alone, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_modernbert_models_match_sentence_transformers_packed(
    modernbert_dirs: dict[str, str], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sentence_transformers import SentenceTransformer

    path = modernbert_dirs[name]
    with caplog.at_level(logging.INFO, logger="embedder.models.encoder"):
        encoder = Encoder.load(ModelConfig(name=path, token_budget=1024))
    assert not [r for r in caplog.records if "padded Hugging Face forward" in r.getMessage()]
    assert encoder.packed and isinstance(encoder._packed_model, PackedModernBertEncoder)
    assert encoder.architecture == "ModernBertModel" and encoder.max_seq_length == MAX_LEN
    assert encoder.pooling == MODELS[name]["pooling"]
    prompts = MODELS[name].get("prompts", {})
    assert (encoder.document_prompt, encoder.query_prompt) == (prompts.get("document", ""), prompts.get("query", ""))

    reference = SentenceTransformer(path, device="cpu")
    lengths = _mixed_lengths(encoder, encoder.document_prompt)
    assert max(lengths) + encoder.layout.overhead == MAX_LEN and min(lengths) + encoder.layout.overhead <= 3 + len(
        encoder.layout.prompt_ids
    )
    texts = texts_of_lengths(encoder.tokenizer, lengths, seed=2)
    ours = encoder.encode_texts(texts, encoder.document_prompt)
    theirs = reference.encode(texts, prompt=encoder.document_prompt or None, batch_size=8)
    assert cosines(ours, theirs).min() >= FP32_MIN_COS

    queries = texts_of_lengths(encoder.tokenizer, _mixed_lengths(encoder, encoder.query_prompt), seed=3)
    ours_q = encoder.encode_queries(queries)
    theirs_q = reference.encode(queries, prompt=encoder.query_prompt or None, batch_size=8)
    assert cosines(ours_q, theirs_q).min() >= FP32_MIN_COS


def test_modernbert_asked_for_a_bert_only_attention_is_a_config_error(modernbert_dirs: dict[str, str]) -> None:
    path = modernbert_dirs["gte-modernbert-like-cls"]
    with pytest.raises(ConfigError, match="ModernBERT runs with attention auto, varlen, flex, padded"):
        Encoder.load(ModelConfig(name=path, attention="flash4"))
    with pytest.raises(ConfigError, match="varlen attention needs CUDA"):
        Encoder.load(ModelConfig(name=path, attention="varlen"))


def test_modernbert_through_the_pipeline(modernbert_dirs: dict[str, str], tmp_path: Path, minilm_path: str) -> None:
    """``embedder.run``: JSONL in, Parquet out; every chunk's id present once, vectors as ST's."""
    import tokenizers
    from sentence_transformers import SentenceTransformer

    from embedder import run
    from embedder.config import build_job
    from tests.embedder.outputs import read_output

    path = modernbert_dirs["modernbert-embed-like-mean"]
    tok = tokenizers.Tokenizer.from_file(f"{minilm_path}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    lengths = [3, 40, 120, 157, 400, 9]  # 400: chunked in several windows-long chunks
    source = tmp_path / "docs.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts_of_lengths(tok, lengths, seed=4)):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    out = str(tmp_path / "out")
    result = run(build_job({
        "source": {"uri": str(source), "format": "jsonl"},
        "output": {"uri": out, "sink": "parquet"},
        "model": {"name": path, "device": "cpu"},
        "chunking": {"max_tokens": 150},
        "runner": {"workers": 1, "show_progress": False},
    }))
    table = read_output(out, "parquet").sort_by("id")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == result.chunks
    assert {i.split("#")[0] for i in ids} == {f"doc{i}" for i in range(len(lengths))}
    assert sum(i.startswith("doc4#") for i in ids) >= 3
    reference = SentenceTransformer(path, device="cpu").encode(
        table.column("text").to_pylist(), prompt="search_document: ", batch_size=8
    )
    assert cosines(np.asarray(table.column("vector").to_pylist()), reference).min() >= FP32_MIN_COS


_FUSED_KERNELS = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from tiny_models import hf_config, randomize
from embedder.models.packed_bert import build_attention
from embedder.models.packed_modernbert import PackedModernBertEncoder, _attend_window_kernel
from embedder.models.pooling import token_segments
lengths = [1, {max_len}, 7, 50, 2, 130, {window} // 2 + 1, 33]
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
ids = torch.randint(1000, 30000, (int(cu[-1]),), generator=torch.Generator().manual_seed(0))
positions = torch.cat([torch.arange(n) for n in lengths])
for seed, biases in enumerate([False, True]):
    extra = dict(attention_bias=True, mlp_bias=True, norm_bias=True) if biases else {{}}
    config = hf_config("modernbert", 64, 6, 4, {max_len}, "gelu", 96, local_attention={window}, **extra)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    randomize(model, seed)
    model.eval()
    cpu = torch.device("cpu")
    plain = PackedModernBertEncoder.from_hf(model, cpu, torch.float32, attention="padded", fused=False, compile=False)
    fused = PackedModernBertEncoder.from_hf(model, cpu, torch.float32, attention="padded", fused=True)
    # (fused with padded attention: rope_in_window is on by default, yet its local layers take q
    # and k rotated by the RoPE pass, as padded attention needs)
    assert fused.fused and not plain.fused and not fused.compiled and fused.rope_in_window and not fused.local_takes_rope
    meta = build_attention(cu, token_segments(cu, int(cu[-1])), max(lengths), int(cu[-1]), plain.varlen)
    with torch.inference_mode():
        a, b = plain(ids, positions, meta), fused(ids, positions, meta)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # the residual stream in the run's dtype: the adds in the GEMMs (addmm), the norm passes reading it
    fused.residual_fp32 = False
    with torch.inference_mode():
        d = fused(ids, positions, meta)
    torch.testing.assert_close(d, a, rtol=1e-4, atol=1e-4)
    # local layers as the GPU runs them (varlen+triton-window): RoPE by qk_norm_rope before the
    # kernel, then inside it; calls counted (with whether the kernel got RoPE tables) so they surely
    # ran; last with the GeGLU in Wi's GEMM (kernels.linear_glu)
    for rope_in_window, glu_in_gemm in ((False, False), (True, False), (True, True)):
        windowed = PackedModernBertEncoder.from_hf(model, cpu, torch.float32, attention="padded", fused=True)
        calls = []
        windowed._local = lambda *args: calls.append(len(args) == 6) or _attend_window_kernel(*args)
        windowed.local_takes_rope = True  # as with varlen attention on a GPU
        windowed.rope_in_window, windowed.glu_in_gemm = rope_in_window, glu_in_gemm
        with torch.inference_mode():
            c = windowed(ids, positions, meta)
        assert calls == [rope_in_window] * sum(local for local, _ in windowed.plan) and calls, calls
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
# the window kernel alone, blocks smaller than the window and than the sequences (many key blocks,
# ranges clipped at both ends of a sequence), on strided views, against masked SDPA per sequence
from embedder.models import kernels
lengths, heads, half = [200, 1, 65, 64, 130, 7, 17], 3, 20
qkv = torch.randn(sum(lengths), 3, heads, 16, generator=torch.Generator().manual_seed(3))
q, k, v = qkv.unbind(1)
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
for block_m, block_n in ((16, 16), (32, 16), (16, 64)):
    got = kernels.local_attention(q, k, v, cu, max(lengths), half, block_m=block_m, block_n=block_n)
    want = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(end - start)
        mask = (i[:, None] - i[None, :]).abs() <= half
        one = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        want.append(torch.nn.functional.scaled_dot_product_attention(*one, attn_mask=mask).transpose(0, 1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    # RoPE inside the kernel: unrotated q and k, against the kernel on q and k rotated beforehand
    positions = torch.cat([torch.arange(n) for n in lengths]) + 3  # any positions, from the table
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    cos, sin = kernels.rope_tables(positions, inv_freq, q.dtype)
    def rotate(t):
        a, b = t.float().chunk(2, dim=-1)
        c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(t.dtype)
    rotated = kernels.local_attention(rotate(q), rotate(k), v, cu, max(lengths), half, block_m=block_m, block_n=block_n)
    got = kernels.local_attention(q, k, v, cu, max(lengths), half, block_m=block_m, block_n=block_n, rope=(cos, sin))
    torch.testing.assert_close(got, rotated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, kernels.local_attention(q, k, v, cu, max(lengths), half), atol=1e-3)
# the GeGLU in the GEMM's epilogue, alone: with and without bias, edges of both output dimensions
# (wrapped loads, masked stores), and a K that the block does not divide (the two-pass form runs)
for rows, k, inter, bias in ((100, 64, 40, True), (7, 96, 24, False), (70, 48, 24, True)):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    w = torch.randn(2 * inter, k, generator=torch.Generator().manual_seed(k)) / k**0.5
    b = torch.randn(2 * inter) if bias else None
    got = kernels.linear_glu(x, w, b, "gelu", block_m=32, block_n=16, block_k=32, group_m=2)
    torch.testing.assert_close(got, kernels.glu(torch.nn.functional.linear(x, w, b), "gelu"), rtol=1e-5, atol=1e-5)
print("fused kernels match")
"""


def test_fused_modernbert_kernels_equal_the_pytorch_ops_in_the_triton_interpreter(tmp_path: Path) -> None:
    """The float32-residual add + LayerNorm (with and without biases; and the residual added in the
    GEMMs, the norm pass reading it alone), RoPE of each layer's theta (in
    place), the GeGLU (alone and in Wi's GEMM) and the sliding-window attention kernel of local layers
    (RoPE before it and inside it), as the GPU runs them (Triton kernels, here in Triton's interpreter), against the
    eager forward in fp32 on sequences longer and shorter than the window; Triton reads
    TRITON_INTERPRET when first imported, hence a fresh interpreter."""
    import os
    import subprocess

    if sys.platform != "linux":
        pytest.skip("Triton ships for Linux only")
    import triton  # noqa: F401  (a test dependency on Linux: missing it fails, never skips)

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    code = _FUSED_KERNELS.format(tests=str(Path(__file__).parent), max_len=MAX_LEN, window=WINDOW)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused kernels match" in done.stdout
