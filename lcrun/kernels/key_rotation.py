"""Window positions for the page kernels: keys of selected pages re-placed at other positions.

The KV pools hold keys after RoPE at their true positions (HF rotate_half layout). Rotations
compose, R(a) R(b) = R(a + b), so a key moves from position t to t + delta by being rotated once
more by delta. A decode step's window layout (InfLLM-style, see lcrun.runtime.window_cache) gives
every selected entry one delta, by its logical page p (page size P, first token p*P):

    p*P <  S            sink page    delta = 0
    p*P >= ls           local page   delta = -shift      (the sink rule wins where both hold)
    otherwise           far page     delta = S - p*P     (its tokens sit at S .. S+P-1)

``layout`` = [S, ls, shift] stays on the device (no host sync: graph capturable).
``sparse_decode_attention(..., rotation=KeyRotation(...))`` applies it (Triton and torch).

Page abstracts for window positions are page-relative: the pre-RoPE key of token t rotated by
t % P, so a page's min/max does not depend on where the page will be placed.
``update_relative_abstract`` keeps them for one decode token (one launch; Triton, with a torch
reference beside it), ``update_relative_abstracts`` for a prefill chunk (torch).

This module imports without Triton (its kernel is decorated on first use).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcrun.kernels.triton_support import lazy_jit, next_pow2, tl


@dataclass(frozen=True)
class KeyRotation:
    """Re-place keys of selected pages at window positions (see module doc)."""
    inv_freq: torch.Tensor   # (D // 2,) float32, the model's RoPE inverse frequencies (after rope scaling)
    pages: torch.Tensor      # (Hkv, Kmax) int32: for entry e of KV head h, page = pages[h, e] - h * page_base
    page_base: int           # 0 when `pages` holds logical page ids; max_pages when it holds identity-table slots
    layout: torch.Tensor     # (3,) int32 on the device: [sink_end S (tokens), local_start ls (tokens), shift]

    def check(self, sel_slots: torch.Tensor, head_dim: int) -> None:
        """Shape/dtype/device asserts against a selection (Hkv, Kmax) of keys of ``head_dim``."""
        device = sel_slots.device
        assert head_dim % 2 == 0, f"rotate_half needs an even head dim, got {head_dim}"
        assert self.inv_freq.shape == (head_dim // 2,) and self.inv_freq.dtype == torch.float32, \
            f"inv_freq {tuple(self.inv_freq.shape)} {self.inv_freq.dtype}, want ({head_dim // 2},) float32"
        assert self.inv_freq.is_contiguous() and self.inv_freq.device == device
        assert self.pages.shape == sel_slots.shape and self.pages.dtype == torch.int32, \
            f"pages {tuple(self.pages.shape)} {self.pages.dtype} vs selection {tuple(sel_slots.shape)}"
        assert self.pages.is_contiguous() and self.pages.device == device
        assert self.layout.shape == (3,) and self.layout.dtype == torch.int32 and self.layout.device == device
        assert isinstance(self.page_base, int) and self.page_base >= 0


# -- torch: the reference math -------------------------------------------------------------------

def window_deltas(rotation: KeyRotation, page_size: int) -> torch.Tensor:
    """(Hkv, Kmax) int64: the position delta of each selected entry (module doc)."""
    hkv = rotation.pages.shape[0]
    heads = torch.arange(hkv, device=rotation.pages.device)[:, None]
    start = (rotation.pages.long() - heads * rotation.page_base) * page_size
    sink_end, local_start, shift = rotation.layout.long().unbind()
    return torch.where(start < sink_end, 0, torch.where(start >= local_start, -shift, sink_end - start))


def rotate_half_by(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """x (..., D) float32 rotated by ``angle`` (..., D // 2) float32 (broadcastable; HF rotate_half
    layout: channel i pairs with i + D/2). float32 result."""
    half = x.shape[-1] // 2
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_selected_keys(keys: torch.Tensor, rotation: KeyRotation) -> torch.Tensor:
    """keys (Hkv, Kmax, P, D) float32, the selected pages' post-RoPE keys, moved to their window
    positions: one angle per (entry, channel)."""
    deltas = window_deltas(rotation, keys.shape[2]).float()  # (Hkv, Kmax)
    angle = deltas[:, :, None, None] * rotation.inv_freq      # (Hkv, Kmax, 1, D/2), fp32 as the kernel
    return rotate_half_by(keys, angle)


def relative_keys(k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, page_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """k (T, Hkv, D) pre-RoPE keys at ``positions`` (T,) rotated by their offsets in their pages
    (fp32 math), in ``dtype``: (T, Hkv, D)."""
    angle = (positions.long() % page_size).float()[:, None, None] * inv_freq  # (T, 1, D/2)
    return rotate_half_by(k.float(), angle).to(dtype)


def update_relative_abstracts(k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                              kmin: torch.Tensor, kmax: torch.Tensor, page_size: int) -> None:
    """Running page-relative min/max of the pages that a chunk of tokens lands in.

    k: (T, Hkv, D) pre-RoPE keys (model dtype; strided views are fine); positions: (T,) consecutive
    integer positions on k's device; inv_freq (D // 2,) float32; kmin, kmax: (Hkv, max_pages, D),
    updated in place. A page whose first token is in the chunk restarts its min/max; the one page
    that can begin before the chunk (the first) continues its running values. No host sync.
    """
    t, hkv, d = k.shape
    assert positions.shape == (t,) and not positions.dtype.is_floating_point and positions.device == k.device
    assert kmin.shape == kmax.shape and kmin.shape[0] == hkv and kmin.shape[2] == d and kmin.dtype == kmax.dtype
    assert inv_freq.shape == (d // 2,) and inv_freq.dtype == torch.float32
    if t == 0:
        return
    pos = positions.long()
    rotated = relative_keys(k, pos, inv_freq, page_size, kmin.dtype).transpose(0, 1)  # (Hkv, T, D)
    pages = pos // page_size
    first = pages[:1]
    # include_self=False restarts every touched page from this chunk's keys alone; the first page,
    # when it began before the chunk, gets its running value back as one more source row.
    continuing = (pos[:1] % page_size != 0).view(1, 1, 1)
    index = torch.cat((pages, first)).view(1, t + 1, 1).expand(hkv, t + 1, d)
    for table, reduce, neutral in ((kmin, "amin", float("inf")), (kmax, "amax", float("-inf"))):
        carried = table.index_select(1, first).masked_fill(~continuing, neutral)  # (Hkv, 1, D)
        table.scatter_reduce_(1, index, torch.cat((rotated, carried), dim=1), reduce, include_self=False)


def update_relative_abstract_reference(k: torch.Tensor, inv_freq: torch.Tensor, kmin: torch.Tensor,
                                       kmax: torch.Tensor, position: torch.Tensor, page_size: int) -> None:
    """``update_relative_abstract`` in torch (same arguments and result)."""
    update_relative_abstracts(k[None], position.reshape(1), inv_freq, kmin, kmax, page_size)


# -- Triton: one decode token ----------------------------------------------------------------------

def _relative_abstract_kernel(k, inv_freq, kmin, kmax, position,
                              stride_k_h, stride_abs_h, stride_abs_p,
                              P: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per KV head: the key's two halves, rotated by the token's offset in its page.
    head = tl.program_id(0).to(tl.int64)
    pos = tl.load(position).to(tl.int64)
    page = pos // P
    offset = pos % P
    d = tl.arange(0, BLOCK_HALF)
    ok = d < HALF
    x1 = tl.load(k + head * stride_k_h + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(k + head * stride_k_h + HALF + d, mask=ok, other=0.0).to(tl.float32)
    angle = offset.to(tl.float32) * tl.load(inv_freq + d, mask=ok, other=0.0)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    # Rounded to the abstracts' dtype, then compared in fp32 (exact; the interpreter compares bf16
    # as raw bits otherwise).
    ty = kmin.dtype.element_ty
    r1 = r1.to(ty).to(tl.float32)
    r2 = r2.to(ty).to(tl.float32)
    base = head * stride_abs_h + page * stride_abs_p + d
    # The page's first token restarts its min/max (old values are not even read).
    offset_d = offset + tl.zeros_like(d)  # a vector: the interpreter rejects a scalar-and-vector mask
    restart = offset_d == 0
    keep = ok & (offset_d != 0)
    lo1 = tl.load(kmin + base, mask=keep, other=0.0).to(tl.float32)
    lo2 = tl.load(kmin + base + HALF, mask=keep, other=0.0).to(tl.float32)
    hi1 = tl.load(kmax + base, mask=keep, other=0.0).to(tl.float32)
    hi2 = tl.load(kmax + base + HALF, mask=keep, other=0.0).to(tl.float32)
    tl.store(kmin + base, tl.where(restart, r1, tl.minimum(lo1, r1)).to(ty), mask=ok)
    tl.store(kmin + base + HALF, tl.where(restart, r2, tl.minimum(lo2, r2)).to(ty), mask=ok)
    tl.store(kmax + base, tl.where(restart, r1, tl.maximum(hi1, r1)).to(ty), mask=ok)
    tl.store(kmax + base + HALF, tl.where(restart, r2, tl.maximum(hi2, r2)).to(ty), mask=ok)


_relative_abstract = lazy_jit(_relative_abstract_kernel)


def update_relative_abstract(k: torch.Tensor, inv_freq: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                             position: torch.Tensor, page_size: int) -> None:
    """Page-relative running min/max after one decode token (one launch, no host sync).

    k: (Hkv, D) pre-RoPE key of the token (model dtype; rows may be strided, last dim contiguous);
    inv_freq: (D // 2,) float32; kmin, kmax: (Hkv, max_pages, D) contiguous, updated in place;
    position: 1-element int32/int64 tensor on k's device. The key is rotated by position % P (fp32
    math, cast to kmin's dtype); page position // P takes it as its min/max when the token starts
    the page, else folds it into its running min/max.
    """
    hkv, d = k.shape
    assert d % 2 == 0 and k.stride(1) == 1, f"k {tuple(k.shape)} strides {k.stride()}"
    assert kmin.shape == kmax.shape and kmin.shape[0] == hkv and kmin.shape[2] == d and kmin.dtype == kmax.dtype
    assert kmin.is_contiguous() and kmax.is_contiguous() and kmin.device == k.device == kmax.device
    assert inv_freq.shape == (d // 2,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    assert position.numel() == 1 and position.dtype in (torch.int32, torch.int64) and position.device == k.device
    _relative_abstract()[(hkv,)](
        k, inv_freq, kmin, kmax, position, k.stride(0), kmin.stride(0), kmin.stride(1),
        P=page_size, HALF=d // 2, BLOCK_HALF=next_pow2(d // 2), num_warps=1 if d <= 128 else 2,
        enable_fp_fusion=False,  # the products and sums rounded as the torch reference rounds them
    )
