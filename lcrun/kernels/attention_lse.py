"""Attention that also returns its log-sum-exp, and the merge of partial results.

Chunked prefill over a tiered KV store attends to the past in blocks streamed from the host; each
block gives a partial output and its log-sum-exp, and the partials merge exactly (RunningAttention, one block at a time). On CUDA the
partials come from PyTorch's flash kernel (which returns the LSE); elsewhere from plain torch.
"""
from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (H, Tq, D); k, v: (H, Tk, D), same H (fold GQA groups into rows first). ``causal``
    aligns query i with key i (only used when Tq == Tk). Returns out (H, Tq, D) in q's dtype and
    lse (H, Tq) fp32 (natural log)."""
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == k.shape[0] and k.shape == v.shape
    assert not causal or q.shape[1] == k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q[None], k[None], v[None], 0.0, causal, False, scale=sm_scale)[:2]
        return out[0], lse[0]
    scores = torch.matmul(q.float(), k.float().transpose(1, 2)) * sm_scale
    if causal:
        t = q.shape[1]
        scores.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


class RunningAttention:
    """Softmax attention merged block by block (online log-sum-exp), so the memory of a prefill
    over a long past stays one partial, however many blocks stream in."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor):
        self.out, self.lse = out.float(), lse

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        total = torch.logaddexp(self.lse, lse)
        self.out.mul_(torch.exp(self.lse - total)[..., None]).add_(out.float() * torch.exp(lse - total)[..., None])
        self.lse = total

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out.to(dtype)
