"""The padding-free forward and segment pooling, checked token by token against unpacked references."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import hf_config, randomize  # noqa: E402

from embedder.models.packed_bert import (  # noqa: E402
    PackedBertEncoder,
    build_attention,
    packed_support,
    position_offset,
)
from embedder.models.pooling import pool, token_segments  # noqa: E402


def _hf_model(family: str, seed: int = 0):
    import transformers

    model = transformers.AutoModel.from_config(hf_config(family, 64, 2, 4, 96, "gelu"))
    randomize(model, seed)
    return model.eval()


def _packed_inputs(lengths: list[int], offset: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(1000, 30000, size=sum(lengths)))
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    positions = torch.cat([torch.arange(n) for n in lengths]) + offset
    return ids, positions, cu


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_packed_token_states_equal_each_sequence_run_alone(family: str) -> None:
    """No token attends across a sequence boundary; positions restart per sequence (with XLM-R's offset)."""
    model = _hf_model(family)
    assert packed_support(model) is None
    offset = position_offset(model)
    assert offset == (1 if family == "xlm-roberta" else 0)
    packed = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.float32)
    lengths = [1, 96, 7, 50, 2, 96, 33]
    ids, positions, cu = _packed_inputs(lengths, offset)
    segments = token_segments(cu, int(cu[-1]))
    meta = build_attention(cu, segments, max(lengths), int(cu[-1]), varlen=False)
    with torch.inference_mode():
        states = packed(ids, positions, meta)
        for i, n in enumerate(lengths):
            start = int(cu[i])
            alone = model(input_ids=ids[start : start + n].unsqueeze(0)).last_hidden_state[0]
            torch.testing.assert_close(states[start : start + n], alone, atol=2e-5, rtol=1e-4)


_FUSED_CHECK = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from tiny_models import hf_config, randomize
from embedder.models.packed_bert import PackedBertEncoder, build_attention
from embedder.models.pooling import token_segments
import numpy as np
for hidden in (64, 96):  # a power of two, and one with masked columns
    model = transformers.AutoModel.from_config(hf_config("bert", hidden, 2, 4, 2 * hidden, "gelu"))
    randomize(model, 3)
    model.eval()
    plain = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.float32, fused_add_norm=False)
    fused = PackedBertEncoder.from_hf(model, torch.device("cpu"), torch.float32, fused_add_norm=True)
    assert fused.add_norm_fused and not plain.add_norm_fused
    lengths = [3, 64, 1, 29]  # 97 rows: the last program is partly empty
    rng = np.random.default_rng(4)
    ids = torch.from_numpy(rng.integers(1000, 30000, size=sum(lengths)))
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    positions = torch.cat([torch.arange(n) for n in lengths])
    meta = build_attention(cu, token_segments(cu, int(cu[-1])), max(lengths), int(cu[-1]), varlen=False)
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids, positions, meta), plain(ids, positions, meta), atol=2e-5, rtol=1e-4)
print("same states")
"""


def test_fused_add_layer_norm_gives_the_packed_states_of_pytorch() -> None:
    """The Triton add+LayerNorm kernel (run by Triton's interpreter on CPU) changes nothing in the
    packed forward: the token states of PyTorch's add then LayerNorm. Triton reads TRITON_INTERPRET
    when it is first imported, hence a fresh interpreter."""
    import os
    import subprocess

    if sys.platform != "linux":
        pytest.skip("Triton ships for Linux only")
    import triton  # noqa: F401  (a test dependency on Linux: missing it fails, never skips)

    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    code = _FUSED_CHECK.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same states" in done.stdout


def test_architectures_without_the_bert_layout_are_not_packed() -> None:
    import transformers

    distil = transformers.AutoModel.from_config(hf_config("distilbert", 32, 1, 2, 64, "gelu"))
    assert "distilbert" in packed_support(distil)
    relative = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    relative.position_embedding_type = "relative_key"
    model = transformers.BertModel(relative)
    assert packed_support(model) is not None


def _naive_pool(hidden: torch.Tensor, lengths: list[int], mode: str, skip: list[int]) -> torch.Tensor:
    rows, start = [], 0
    for n, s in zip(lengths, skip):
        seq = hidden[start : start + n]
        if mode == "mean":
            rows.append(seq[s:].mean(0))
        elif mode == "cls":
            rows.append(seq[s if n > s else 0])
        else:
            rows.append(seq[-1])
        start += n
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken"])
@pytest.mark.parametrize("with_skip", [False, True])
def test_segment_pooling_equals_per_sequence_pooling(mode: str, with_skip: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 12, 3, 40, 7]
    skip = [3, 0, 4, 0, 4, 3] if with_skip else [0] * len(lengths)
    hidden = torch.randn(sum(lengths), 16, generator=gen)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    segments = token_segments(cu, sum(lengths))
    assert segments.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    got = pool(hidden, cu, segments, mode, torch.tensor(skip) if with_skip else None)
    torch.testing.assert_close(got, _naive_pool(hidden, lengths, mode, skip))


def test_pooling_half_precision_accumulates_in_float32() -> None:
    lengths = [512, 3]
    hidden = torch.full((sum(lengths), 8), 1.001, dtype=torch.bfloat16)
    cu = torch.tensor([0, 512, 515], dtype=torch.int32)
    got = pool(hidden, cu, token_segments(cu, 515), "mean")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((2, 8), float(hidden[0, 0])), atol=1e-6, rtol=0)


def test_unknown_pooling_mode_names_the_valid_ones() -> None:
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="Valid: cls, mean, lasttoken"):
        pool(torch.zeros(2, 4), cu, token_segments(cu, 2), "max")
