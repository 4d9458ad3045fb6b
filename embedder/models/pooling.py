"""Pooling on packed token states: one vector per sequence, with segment ops and no Python loops.

Token states arrive flat (``[total_tokens, hidden]``) with ``cu_seqlens`` marking where each
sequence starts. These functions reproduce sentence-transformers' ``Pooling`` modes on that layout,
including ``include_prompt=False`` (leading prompt tokens left out of the pooled tokens), and never
read a value back to the host, so they add no device sync to the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_segments(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sequence index of every token (``[0, 0, 1, 1, 1, 2, ...]``), int64 ``[num_tokens]``.

    ``num_tokens`` is passed from the host so ``repeat_interleave`` needs no sync to size its output.
    """
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq = torch.arange(lengths.numel(), device=cu.device)
    return torch.repeat_interleave(seq, lengths, output_size=num_tokens)


def pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    segments: torch.Tensor,
    mode: str,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pools packed token states into one float32 vector per sequence.

    Args:
        hidden: ``[total_tokens, hidden]`` token states, any float dtype.
        cu_seqlens: ``[n + 1]`` cumulative sequence lengths (any integer dtype, on ``hidden``'s device).
        segments: ``token_segments(cu_seqlens, total_tokens)``.
        mode: ``"mean"`` (average over each sequence's tokens), ``"cls"`` (its first token) or
            ``"lasttoken"`` (its last token).
        skip: Optional ``[n]`` count of leading tokens each sequence leaves out of pooling (the
            special token and prompt when the model's pooling excludes the prompt; 0 = none).

    Returns:
        ``[n, hidden]`` float32, in sequence order.
    """
    cu = cu_seqlens.long()
    starts, ends = cu[:-1], cu[1:]
    lengths = ends - starts
    if mode == "cls":
        first = starts if skip is None else starts + torch.where(lengths > skip, skip, torch.zeros_like(skip))
        return hidden[first].float()
    if mode == "lasttoken":
        return hidden[ends - 1].float()
    if mode != "mean":
        raise ValueError(f"Invalid pooling mode {mode!r}. Valid: cls, mean, lasttoken")
    values = hidden.float()
    counts = lengths
    if skip is not None:
        position = torch.arange(hidden.shape[0], device=hidden.device) - starts[segments]
        keep = position >= skip[segments]
        values = values * keep.unsqueeze(1)
        counts = lengths - skip
    sums = torch.zeros(lengths.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segments, values)
    return sums / counts.clamp(min=1).unsqueeze(1).float()


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalizes each row, as sentence-transformers' ``Normalize`` module does."""
    return F.normalize(vectors, p=2, dim=1)
