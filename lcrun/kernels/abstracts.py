"""Page abstracts: per-channel min/max of a page's post-RoPE keys (Quest), kept by logical page."""
from __future__ import annotations

import torch

from lcrun.kernels.triton_support import jit, next_pow2, tl


@jit
def _update_abstracts_kernel(
    k_pool, page_table, kmin, kmax, pages, seq_len,
    stride_slot, stride_tok, stride_table_h, stride_abs_h, stride_abs_p,
    HAS_SEQ_LEN: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    page = tl.load(pages + i)
    slot = tl.load(page_table + head * stride_table_h + page).to(tl.int64)
    offs_t = tl.arange(0, P)
    offs_d = tl.arange(0, BLOCK_D)
    valid_t = offs_t < P
    if HAS_SEQ_LEN:
        # A page still filling: only its written tokens count.
        valid_t = page * P + offs_t < tl.load(seq_len)
    mask = valid_t[:, None] & (offs_d < D)[None, :]
    keys = tl.load(k_pool + slot * stride_slot + offs_t[:, None] * stride_tok + offs_d[None, :],
                   mask=mask, other=0.0)
    low = tl.min(tl.where(mask, keys, float("inf")), axis=0)
    high = tl.max(tl.where(mask, keys, float("-inf")), axis=0)
    dst = head * stride_abs_h + page.to(tl.int64) * stride_abs_p + offs_d
    tl.store(kmin + dst, low.to(kmin.dtype.element_ty), mask=offs_d < D)
    tl.store(kmax + dst, high.to(kmax.dtype.element_ty), mask=offs_d < D)


def update_abstracts(k_pool: torch.Tensor, page_table: torch.Tensor, kmin: torch.Tensor,
                     kmax: torch.Tensor, pages: torch.Tensor, seq_len: torch.Tensor | None = None) -> None:
    """kmin/kmax[h, p] = per-channel min/max over the P tokens of slot page_table[h, p], for every
    KV head h and every logical page p in ``pages``.

    k_pool: (num_slots, P, D) contiguous fp16/bf16/fp32; page_table: (Hkv, max_pages) int32;
    kmin, kmax: (Hkv, max_pages, D) contiguous, k_pool's dtype; pages: (n,) int32, same device;
    seq_len: optional 1-element int32 device tensor: tokens at positions >= seq_len are left out,
    so the page being filled during decode can be refreshed every step with no host branch.
    """
    _check(k_pool, page_table, kmin, kmax, pages, seq_len)
    n = pages.numel()
    if n == 0:
        return
    hkv = page_table.shape[0]
    num_slots, page_size, d = k_pool.shape
    _update_abstracts_kernel[(n, hkv)](
        k_pool, page_table, kmin, kmax, pages, seq_len if seq_len is not None else pages,
        k_pool.stride(0), k_pool.stride(1), page_table.stride(0), kmin.stride(0), kmin.stride(1),
        HAS_SEQ_LEN=seq_len is not None, P=page_size, D=d, BLOCK_D=next_pow2(d),
        num_warps=4 if page_size * d <= 4096 else 8,
    )


def _check(k_pool, page_table, kmin, kmax, pages, seq_len) -> None:
    assert k_pool.dim() == 3 and k_pool.is_contiguous(), "k_pool must be contiguous (num_slots, P, D)"
    page_size, d = k_pool.shape[1:]
    assert page_size & (page_size - 1) == 0, f"page size {page_size} must be a power of two"
    assert page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.stride(1) == 1
    hkv, max_pages = page_table.shape
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        assert t.shape == (hkv, max_pages, d), f"{name} {tuple(t.shape)} != {(hkv, max_pages, d)}"
        assert t.dtype == k_pool.dtype and t.stride(2) == 1, f"{name}: k_pool's dtype, last dim contiguous"
    assert kmin.stride() == kmax.stride()
    assert pages.dim() == 1 and pages.dtype == torch.int32 and pages.is_contiguous()
    devices = {k_pool.device, page_table.device, kmin.device, kmax.device, pages.device}
    if seq_len is not None:
        assert seq_len.numel() == 1 and seq_len.dtype == torch.int32
        devices.add(seq_len.device)
    assert len(devices) == 1, f"tensors on several devices: {devices}"
