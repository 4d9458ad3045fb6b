"""Decoder embedding models (Qwen3, Qwen2, Mistral, Llama) through the packed forward against
sentence-transformers: tiny random models with last-token pooling and small trained BPE tokenizers,
same vectors (cos ≥ 0.9999 in fp32) on batches mixing very different lengths up to the limit, with
and without the query prompt, and no fallback in the log; their chunks re-tokenize to the ids
embedded; the job-level task instruction; a whole run into Parquet."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import bpe_tokenizer, cosines, save_tiny_decoder, training_texts  # noqa: E402

from embedder.chunking import Chunker  # noqa: E402
from embedder.config import ChunkingConfig, ModelConfig  # noqa: E402
from embedder.models.encoder import Encoder, activation_bytes_per_token, auto_token_budget, packed_family  # noqa: E402
from embedder.models.loader import task_query_prompt  # noqa: E402
from embedder.models.packed_decoder import PackedDecoderEncoder, decoder_support  # noqa: E402
from embedder.records import Document  # noqa: E402

FP32_MIN_COS = 0.9999
QWEN3_QUERY = "Instruct: Given a question, retrieve passages that answer it\nQuery:"
E5_QUERY = "Instruct: Given a question, retrieve passages that answer it\nQuery: "

DECODERS = {
    # Qwen3-Embedding-like: q/k norms, head_dim larger than hidden/heads, GQA, EOS appended, left padding.
    "qwen3-eos": dict(family="qwen3", head_dim=32, prompts={"query": QWEN3_QUERY, "document": ""}),
    # e5-mistral-like: <s> ... </s>, a sliding window no shorter than the limit, prompt with a trailing space.
    "mistral-e5": dict(family="mistral", sliding_window=4096, prompts={"query": E5_QUERY}),
    # Llama with biases, llama3 RoPE scaling and the older SentencePiece conversion (BOS only).
    "llama-legacy": dict(
        family="llama",
        tokenizer_style="llama-legacy",
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    # gte-Qwen2-like: bidirectional (is_causal: false), q/k/v biases, no special tokens at all.
    "qwen2-bidirectional": dict(family="qwen2", is_causal=False, rope_theta=1_000_000.0, prompts={"query": E5_QUERY}),
}


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-decoders")
    return {name: save_tiny_decoder(root / name, seed=i, **kw) for i, (name, kw) in enumerate(DECODERS.items())}


def _reference(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _texts_up_to(encoder: Encoder, count: int, seed: int = 0) -> list[str]:
    """Texts of 1 token to past the limit (truncated there), mixed, cut from the training corpus."""
    corpus = " ".join(training_texts())
    enc = encoder.tokenizer.encode(corpus, add_special_tokens=False)
    room = encoder.max_seq_length - encoder.layout.overhead
    rng = np.random.default_rng(seed)
    lengths = [1, 2, room - 1, room, room + 40, *rng.integers(3, room, size=count - 5).tolist()]
    texts = []
    for n in lengths:
        start = int(rng.integers(0, len(enc.ids) - n - 1))
        a, b = enc.offsets[start][0], enc.offsets[start + n - 1][1]
        texts.append(corpus[a:b].strip() or "x")
    return texts


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoders_run_packed_and_match_sentence_transformers(
    decoder_dirs: dict[str, str], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="embedder.models.encoder"):
        encoder = Encoder.load(ModelConfig(name=decoder_dirs[name], token_budget=1024))
    assert encoder.packed and encoder.pooling == "lasttoken"
    assert not [r for r in caplog.records if "padded Hugging Face forward" in r.getMessage()]
    assert any("packed decoder" in r.getMessage() for r in caplog.records)
    reference = _reference(decoder_dirs[name])
    texts = _texts_up_to(encoder, 24, seed=len(name))
    for prompt in {encoder.document_prompt, encoder.query_prompt}:
        ours = encoder.encode_texts(texts, prompt)
        theirs = reference.encode(texts, prompt=prompt, batch_size=7, convert_to_numpy=True)
        cos = cosines(ours, theirs)
        assert cos.min() >= FP32_MIN_COS, (prompt, cos.min(), int(cos.argmin()))


def test_special_tokens_follow_each_tokenizer(decoder_dirs: dict[str, str]) -> None:
    """Qwen3: EOS appended; e5-mistral: <s> and </s>; Llama: <s> only; gte-Qwen2-like: none."""
    expected = {
        "qwen3-eos": ([], ["<|endoftext|>"]),
        "mistral-e5": (["<s>"], ["</s>"]),
        "llama-legacy": (["<s>"], []),
        "qwen2-bidirectional": ([], []),
    }
    for name, (prefix, suffix) in expected.items():
        encoder = Encoder.load(ModelConfig(name=decoder_dirs[name]))
        tok = encoder.tokenizer
        assert [tok.id_to_token(int(i)) for i in encoder.layout.prefix_ids] == prefix, name
        assert [tok.id_to_token(int(i)) for i in encoder.layout.suffix_ids] == suffix, name


def test_packed_states_equal_each_sequence_run_alone_and_bidirectional_sees_the_future(
    decoder_dirs: dict[str, str],
) -> None:
    """Token by token against the HF model run on each sequence alone; a causal model's first
    token ignores what follows, the bidirectional one's does not."""
    from sentence_transformers import SentenceTransformer

    from embedder.models.packed_bert import build_attention
    from embedder.models.pooling import token_segments

    for name in ("qwen3-eos", "qwen2-bidirectional"):
        model = SentenceTransformer(decoder_dirs[name], device="cpu")[0].auto_model.eval()
        packed = PackedDecoderEncoder.from_hf(model, torch.device("cpu"), torch.float32)
        assert packed.causal == (name != "qwen2-bidirectional")
        lengths = [1, 200, 7, 64, 2]
        rng = np.random.default_rng(3)
        ids = torch.from_numpy(rng.integers(5, model.config.vocab_size, size=sum(lengths)))
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        positions = torch.cat([torch.arange(n) for n in lengths])
        meta = build_attention(cu, token_segments(cu, int(cu[-1])), max(lengths), int(cu[-1]), varlen=False)
        with torch.inference_mode():
            states = packed(ids, positions, meta)
            for i, n in enumerate(lengths):
                start = int(cu[i])
                alone = model(input_ids=ids[start : start + n].unsqueeze(0)).last_hidden_state[0]
                torch.testing.assert_close(states[start : start + n], alone, atol=3e-5, rtol=1e-4)
            seq = ids[cu[1] : cu[2]]
            first_full = model(input_ids=seq.unsqueeze(0)).last_hidden_state[0, 0]
            first_alone = model(input_ids=seq[:1].unsqueeze(0)).last_hidden_state[0, 0]
        assert torch.allclose(first_full, first_alone, atol=1e-5) == packed.causal, name


def test_families_dispatch_to_one_packed_implementation_or_say_why(decoder_dirs: dict[str, str]) -> None:
    import transformers
    from tiny_models import decoder_config

    model = transformers.AutoModel.from_config(decoder_config("qwen3", 32, 1, 2, 64, 100))
    assert packed_family(model, 64) == ("decoder", None)
    dynamic = transformers.AutoModel.from_config(
        decoder_config("llama", 32, 1, 2, 64, 100, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    )
    family, reason = packed_family(dynamic, 64)
    assert family is None and "RoPE scaling 'dynamic'" in reason
    window = transformers.AutoModel.from_config(decoder_config("mistral", 32, 1, 2, 256, 100, sliding_window=128))
    assert "sliding-window attention of 128 tokens" in decoder_support(window, 256)
    assert decoder_support(window, 128) is None


def test_prompt_that_merges_with_the_text_is_tokenized_with_it(decoder_dirs: dict[str, str]) -> None:
    """Byte-level BPE merges Qwen3's "Query:" with the query's first word: the query is
    tokenized as one string, as sentence-transformers does, and the ids are exactly its ids."""
    encoder = Encoder.load(ModelConfig(name=decoder_dirs["qwen3-eos"]))
    from embedder.models.loader import ModelError

    with pytest.raises(ModelError):
        encoder.layout_for(QWEN3_QUERY)
    reference = _reference(decoder_dirs["qwen3-eos"])
    queries = ["how do I feed a sourdough starter?", "What is compost?", "42 reasons"]
    ours = encoder.encode_queries(queries)
    theirs = reference.encode(queries, prompt=QWEN3_QUERY, convert_to_numpy=True)
    assert cosines(ours, theirs).min() >= FP32_MIN_COS


def test_task_instruction_builds_the_query_prompt(decoder_dirs: dict[str, str]) -> None:
    assert task_query_prompt(QWEN3_QUERY, "Find recipes") == "Instruct: Find recipes\nQuery:"
    assert task_query_prompt(E5_QUERY, "Find recipes") == "Instruct: Find recipes\nQuery: "
    assert task_query_prompt("Task: {task} | q: ", "Find recipes") == "Task: Find recipes | q: "
    assert task_query_prompt("", "Find recipes") == "Instruct: Find recipes\nQuery:"
    encoder = Encoder.load(ModelConfig(name=decoder_dirs["qwen3-eos"], task="Find bread recipes"))
    assert encoder.query_prompt == "Instruct: Find bread recipes\nQuery:"
    assert encoder.document_prompt == ""
    reference = _reference(decoder_dirs["qwen3-eos"])
    queries = ["sourdough starter", "rye loaf"]
    theirs = reference.encode(queries, prompt="Instruct: Find bread recipes\nQuery:", convert_to_numpy=True)
    assert cosines(encoder.encode_queries(queries), theirs).min() >= FP32_MIN_COS


@pytest.mark.parametrize("style", ["qwen3", "mistral", "llama-legacy"])
def test_bpe_chunks_retokenize_to_the_ids_embedded(style: str) -> None:
    """Chunk text recovered from offsets re-tokenizes to exactly the chunk's ids, for byte-level BPE
    and both SentencePiece-style conversions (the whole text one "word", a prepended ``▁``)."""
    import tokenizers

    hf = bpe_tokenizer(style, training_texts())
    tok = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    text = "  ".join(training_texts()[:8]) + " Ünïcödé wörds — naïve café, 2024-12-02.\n\nThe end"
    for max_tokens in (16, 40, 100):
        chunker = Chunker.from_settings(tok, max_tokens + 2, 2, ChunkingConfig(max_tokens=max_tokens + 2, overlap_tokens=4))
        chunks = chunker.chunk([Document(id="d", text=text)])
        assert len(chunks) > 2
        for chunk in chunks:
            assert len(chunk.token_ids) <= max_tokens
            assert tok.encode(chunk.text, add_special_tokens=False).ids == chunk.token_ids.tolist(), chunk.text
        covered = "".join(c.text for c in chunks)
        assert covered.split() == text.split() or chunker.overlap_tokens  # overlapping windows repeat words


def test_long_chunks_get_a_budget_of_at_least_one_chunk() -> None:
    """A 32k-token chunk always fits a batch, on CPU too; on CUDA the budget follows free memory."""
    assert auto_token_budget(torch.device("cpu"), torch.float32, 4096, 32, 14336, 32768, glu=True) >= 32768


def test_the_float32_residual_of_the_fused_forwards_is_counted_in_the_budget() -> None:
    """The fused decoder/ModernBERT forwards keep a float32 residual stream beside the bf16 normed
    copy: 4 bytes a hidden value more than a bf16 stream, so the auto budget per token is larger."""
    plain = activation_bytes_per_token(torch.bfloat16, 4096, 14336, glu=True)
    fused = activation_bytes_per_token(torch.bfloat16, 4096, 14336, glu=True, f32_residual=True)
    assert plain == 2 * (8 * 4096 + 3 * 14336) + 8 * 4096 + 16 * 128
    assert fused - plain == 4 * 4096


def test_decoder_through_the_whole_pipeline_into_parquet(decoder_dirs: dict[str, str], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from embedder import Job, run

    source = tmp_path / "docs.jsonl"
    texts = training_texts()[:12]
    with source.open("w") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"doc{i}", "text": " ".join([text] * (1 + i % 4))}) + "\n")
    out = tmp_path / "out"
    job = Job.model_validate({
        "source": {"uri": str(source), "format": "jsonl"},
        "output": {"uri": str(out), "sink": "parquet"},
        "model": {"name": decoder_dirs["qwen3-eos"]},
        "chunking": {"max_tokens": 128},
        "runner": {"workers": 1},
        "validation": {"canary_samples": 4},
    })
    run(job)
    table = pq.read_table(str(out), columns=["id", "doc_id", "text", "vector"]).to_pylist()
    assert {r["doc_id"] for r in table} == {f"doc{i}" for i in range(len(texts))}
    assert len({r["id"] for r in table}) == len(table)
    reference = _reference(decoder_dirs["qwen3-eos"])
    theirs = reference.encode([r["text"] for r in table], convert_to_numpy=True)
    ours = np.asarray([r["vector"] for r in table], dtype=np.float32)
    assert cosines(ours, theirs).min() >= FP32_MIN_COS


_FUSED_KERNELS = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiny_models import save_tiny_decoder
from transformers import AutoModel
from embedder.models.packed_bert import build_attention
from embedder.models.packed_decoder import PackedDecoderEncoder
lengths = [5, 17, 1, 30, 12]
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
ids = torch.randint(3, 200, (int(cu[-1]),), generator=torch.Generator().manual_seed(0))
positions = torch.cat([torch.arange(n) for n in lengths])
segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
for i, (family, kw) in enumerate([("qwen3", dict(head_dim=32)), ("qwen2", dict(is_causal=False))]):
    model = AutoModel.from_pretrained(save_tiny_decoder({root!r} + "/" + family, seed=i, family=family, **kw)).eval()
    plain = PackedDecoderEncoder.from_hf(model, torch.device("cpu"), torch.float32, fused=False, compile=False)
    fused = PackedDecoderEncoder.from_hf(model, torch.device("cpu"), torch.float32, fused=True)
    fp32_out = PackedDecoderEncoder.from_hf(model, torch.device("cpu"), torch.float32, fused=True, fp32_gemm_out=True)
    assert fused.fused and not plain.fused and fp32_out.fp32_gemm_out and not fused.fp32_gemm_out
    meta = build_attention(cu, segments, max(lengths), int(cu[-1]), plain.varlen)
    with torch.inference_mode():
        a, b, c = plain(ids, positions, meta), fused(ids, positions, meta), fp32_out(ids, positions, meta)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
# float32 GEMM outputs into bf16 kernels: one rounding, to the output dtype (the interpreter's bf16
# cast truncates where the GPU's rounds to nearest, hence a tolerance of one bf16 step)
from embedder.models import kernels
one_step = dict(rtol=2**-7, atol=1e-6)
heads, kv, d, t = 4, 2, 32, 9
qkv = torch.randn(t, (heads + 2 * kv) * d, generator=torch.Generator().manual_seed(1))
inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
q, k, v = kernels.qk_norm_rope(qkv, torch.arange(t), inv, 1.0, heads, kv, None, None, 1e-6, dtype=torch.bfloat16)
assert q.dtype == k.dtype == v.dtype == torch.bfloat16
f = torch.arange(t).float()[:, None] * inv[None]
cos, sin = f.cos().bfloat16().float()[:, None], f.sin().bfloat16().float()[:, None]
x1, x2 = qkv.view(t, heads + 2 * kv, d)[:, :heads].chunk(2, -1)
# (the interpreter also truncates cos/sin to bf16: one step of them times |x| ~ 4, absolutely)
rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
torch.testing.assert_close(q.float(), rotated, rtol=2**-7, atol=0.05)
torch.testing.assert_close(v.float(), qkv.view(t, heads + 2 * kv, d)[:, heads + kv:], **one_step)
# in place: the same rotation written over q and k inside qkv, returned as views; v untouched
copied = kernels.qk_norm_rope(qkv, torch.arange(t), inv, 1.0, heads, kv, None, None, 1e-6)
inside = qkv.clone()
views = kernels.qk_norm_rope(inside, torch.arange(t), inv, 1.0, heads, kv, None, None, 1e-6, in_place=True, tokens=4)
for a, b in zip(copied, views):
    assert b.untyped_storage().data_ptr() == inside.untyped_storage().data_ptr()  # views of qkv, no copy
    assert not b.is_contiguous() and b.stride(-1) == 1
    torch.testing.assert_close(b, a, rtol=0, atol=0)
torch.testing.assert_close(inside.view(t, heads + 2 * kv, d)[:, heads + kv:], qkv.view(t, heads + 2 * kv, d)[:, heads + kv:], rtol=0, atol=0)
gu = torch.randn(t, 64, generator=torch.Generator().manual_seed(2))
out = kernels.glu(gu, "silu", dtype=torch.bfloat16)
assert out.dtype == torch.bfloat16
torch.testing.assert_close(out.float(), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:], **one_step)
print("fused kernels match")
"""


def test_fused_decoder_kernels_equal_the_pytorch_ops_in_the_triton_interpreter(tmp_path: Path) -> None:
    """RMSNorm with the residual add, q/k norm + RoPE (with and without Qwen3's norms), and the GLU, as
    the GPU runs them (Triton kernels, here in Triton's interpreter), against the eager forward in
    fp32; Triton reads TRITON_INTERPRET when first imported, hence a fresh interpreter."""
    import os
    import subprocess

    if sys.platform != "linux":
        pytest.skip("Triton ships for Linux only")
    import triton  # noqa: F401  (a test dependency on Linux: missing it fails, never skips)

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    code = _FUSED_KERNELS.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused kernels match" in done.stdout



def test_fallback_cast_keeps_rope_frequencies_in_float32(decoder_dirs: dict[str, str]) -> None:
    """The padded fallback casts the model to the run's dtype (``cast_keeping_rotary_frequencies``)
    but keeps RoPE's ``inv_freq`` in float32, as ``from_pretrained(dtype=...)`` leaves it; a bf16
    ``inv_freq`` (what a plain ``Module.to(bf16)`` gives) puts tokens at the wrong positions, the
    further the worse. bf16 runs on GPUs only; the forward here is transformers' own, on CPU."""
    import copy

    from embedder.models.encoder import cast_keeping_rotary_frequencies

    fp32 = _reference(decoder_dirs["mistral-e5"])[0].auto_model.eval()
    kept = cast_keeping_rotary_frequencies(copy.deepcopy(fp32), torch.device("cpu"), torch.bfloat16)
    cast = copy.deepcopy(fp32).to(dtype=torch.bfloat16)
    assert next(kept.parameters()).dtype == torch.bfloat16
    assert kept.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(kept.rotary_emb.inv_freq, fp32.rotary_emb.inv_freq)
    assert cast.rotary_emb.inv_freq.dtype == torch.bfloat16  # the damage the helper avoids
    vocab, positions = fp32.config.vocab_size, min(fp32.config.max_position_embeddings, 512)
    ids = torch.randint(3, vocab, (4, positions), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = fp32(input_ids=ids).last_hidden_state
        errors = [
            (1 - F.cosine_similarity(m(input_ids=ids).last_hidden_state.float(), reference, dim=-1))[:, positions // 2 :].mean()
            for m in (kept, cast)
        ]
    assert errors[0] < errors[1], errors
