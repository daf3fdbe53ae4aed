"""Scatter new tokens' K/V into their pages (plain torch indexing: a few tensors per call)."""
from __future__ import annotations

import torch


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> None:
    """Write tokens at positions ``start .. start+T-1`` of every KV head into their pages.

    k_pool, v_pool: (num_slots, P, D), one layer's pools; page_table: (Hkv, max_pages) int32
    mapping logical page -> slot; k, v: (T, Hkv, D) in the pools' dtype (keys post-RoPE);
    start: a host int (prefill) or a 1-element integer tensor on the pools' device (decode: no
    host synchronisation). Positions must lie below max_pages * P (the caller checks capacity).
    """
    t, hkv, d = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k_pool.shape == v_pool.shape and k_pool.dim() == 3 and k_pool.shape[2] == d
    assert page_table.dim() == 2 and page_table.shape[0] == hkv and page_table.dtype == torch.int32
    assert k.dtype == k_pool.dtype and v.dtype == v_pool.dtype
    page_size = k_pool.shape[1]
    steps = torch.arange(t, device=k_pool.device)
    if isinstance(start, torch.Tensor):
        assert start.numel() == 1 and start.device == k_pool.device
        positions = start.reshape(1).long() + steps
    else:
        positions = steps + int(start)
    slots = page_table.index_select(1, positions // page_size).long()  # (Hkv, T)
    offsets = (positions % page_size).expand(hkv, t)
    k_pool.index_put_((slots, offsets), k.transpose(0, 1))
    v_pool.index_put_((slots, offsets), v.transpose(0, 1))
