"""Decode attention over selected pages (flash-decoding): split the pages of each KV head across
programs, one program serving all G query heads of the group, then merge splits by log-sum-exp.
Optionally the keys of each selected page are moved to window positions on the way in
(lcrun.kernels.key_rotation)."""
from __future__ import annotations

import math

import torch
from triton.language.extra.cuda import libdevice

from lcrun.kernels.key_rotation import KeyRotation
from lcrun.kernels.triton_support import (LOG2E, dot_precision, dot_upcast, interpreting, jit, launch_fitting_shared_memory,
                                          next_pow2, pdl_enabled, pdl_launch, pdl_wait, tl)


@jit
def _window_delta(page, sink_end, local_start, shift, P: tl.constexpr):
    """Position delta of selected pages (int32, any shape; the rules of lcrun.kernels.key_rotation)."""
    start = page * P
    return tl.where(start < sink_end, 0, tl.where(start >= local_start, -shift, sink_end - start))


@jit
def _cos_sin(angle, FAST: tl.constexpr):
    """cos and sin of fp32 angles. FAST (compiled for CUDA): reduced to [-pi, pi] by Cody-Waite
    with exact fma products, then the hardware approximations (abs error ~1e-6): with libdevice's
    exact cosf/sinf a rotated decode took 1.4-2.5x the unrotated kernel's time, with these 1.3-1.5x
    (H200, bf16, D 64/128). Angle 0 gives exactly 1 and 0 either way."""
    if FAST:
        turns = libdevice.rint(angle * 0.15915494309189535)
        reduced = tl.fma(-turns, 6.2831854820251465, angle)
        reduced = tl.fma(-turns, -1.7484555314695172e-07, reduced)
        cos = tl.where(angle == 0.0, 1.0, libdevice.fast_cosf(reduced))
        sin = tl.where(angle == 0.0, 0.0, libdevice.fast_sinf(reduced))
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return cos, sin


@jit
def _block_rotation(pages_row, e0, last, page_base, sink_end, local_start, shift, freq, sign, entry_of_row,
                    P: tl.constexpr, ENTRIES: tl.constexpr, FAST_TRIG: tl.constexpr):
    """cos and signed sin of the angles that move a block's keys to their window positions:
    (BLOCK_D, 1) when the block is one entry, else (BLOCK_D, BLOCK_N). Computed once per
    (entry, channel), then spread over the entry's tokens (per token costs several times more).
    freq: (BLOCK_D,) inverse frequency of each channel; sign: -1 on the first half, +1 after."""
    page = tl.load(pages_row + e0, mask=e0 < last, other=0) - page_base
    cos, sin = _cos_sin(_window_delta(page, sink_end, local_start, shift, P).to(tl.float32) * freq, FAST_TRIG)
    cos = cos[:, None]
    sin = (sin * sign)[:, None]
    for j in tl.static_range(1, ENTRIES):
        page = tl.load(pages_row + e0 + j, mask=e0 + j < last, other=0) - page_base
        c, s = _cos_sin(_window_delta(page, sink_end, local_start, shift, P).to(tl.float32) * freq, FAST_TRIG)
        mine = (entry_of_row == j)[None, :]
        cos = tl.where(mine, c[:, None], cos)
        sin = tl.where(mine, (s * sign)[:, None], sin)
    return cos, sin


@jit
def _sparse_decode_split_kernel(
    q, k_pool, v_pool, sel_slots, sel_lens, num_entries, kv_scale, rot_inv_freq, rot_pages, rot_layout,
    part_out, part_lse, qk_scale,
    stride_q_h, stride_slot, stride_tok, stride_sel_h, stride_po_h, stride_po_s, stride_pl_h, stride_scale_h,
    kmax, pages_per_split, rot_page_base,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_NUM_ENTRIES: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr = False,
    ROTATE: tl.constexpr = False, FAST_TRIG: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    head = tl.program_id(0)
    split = tl.program_id(1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    rows = head * G + offs_g
    qt = tl.load(q + rows[:, None] * stride_q_h + offs_d[None, :],
                 mask=(offs_g < G)[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        qt = qt.to(tl.float32)
    if SCALED:  # fp8 pages: K's scale folds into the logits' scale, V's into the output
        qk_scale = qk_scale * tl.load(kv_scale + head * stride_scale_h)
    if ROTATE:
        # rotate_half: channel i pairs with i + D/2 (read from the same key row: an L1 hit) at
        # frequency i % (D/2); k' = k cos + partner * (-sin on the first half, +sin after).
        half_d = offs_d % (D // 2)
        partner_d = (offs_d + D // 2) % D
        freq = tl.load(rot_inv_freq + half_d, mask=mask_d, other=0.0)
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
        pages_row = rot_pages + head * stride_sel_h
        page_base = head * rot_page_base
        sink_end = tl.load(rot_layout)
        local_start = tl.load(rot_layout + 1)
        shift = tl.load(rot_layout + 2)

    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, kmax)
    if HAS_NUM_ENTRIES:
        last = tl.minimum(last, tl.load(num_entries))
    # Token n of a block lies in entry first + n // P at offset n % P (a block spans BLOCK_N // P pages).
    entry_of_row = offs_n // P
    tok_of_row = offs_n % P

    # Finite start so fully masked blocks give exp2(-inf - m) = 0, never nan.
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for e0 in range(first, last, BLOCK_N // P):
        entry = e0 + entry_of_row
        in_range = entry < last
        slot = tl.load(sel_slots + head * stride_sel_h + entry, mask=in_range, other=0).to(tl.int64)
        length = tl.load(sel_lens + head * stride_sel_h + entry, mask=in_range, other=0)
        live = tok_of_row < length
        row_off = slot * stride_slot + tok_of_row * stride_tok
        kt = tl.load(k_pool + row_off[None, :] + offs_d[:, None], mask=live[None, :] & mask_d[:, None], other=0.0)
        # V is loaded with K, not after the scores: one memory round trip per block, not two.
        v = tl.load(v_pool + row_off[:, None] + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0)
        if ROTATE:  # fp32 math; fp8 codes rotate before their scale (it folds into qk_scale)
            kp = tl.load(k_pool + row_off[None, :] + partner_d[:, None], mask=live[None, :] & mask_d[:, None],
                         other=0.0)
            cos, sin = _block_rotation(pages_row, e0, last, page_base, sink_end, local_start, shift, freq, sign,
                                       entry_of_row, P, BLOCK_N // P, FAST_TRIG)
            kt = (kt.to(tl.float32) * cos + kp.to(tl.float32) * sin).to(qt.dtype)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        elif SCALED:
            kt = kt.to(qt.dtype)
            v = v.to(qt.dtype)
        s = tl.dot(qt, kt, input_precision=PRECISION) * qk_scale  # (G_PAD, BLOCK_N), log2 units
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_tokens = l_i > 0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if SCALED:
        out = out * tl.load(kv_scale + head * stride_scale_h + 1)
    lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
    row_mask = offs_g < G
    tl.store(part_out + rows[:, None] * stride_po_h + split * stride_po_s + offs_d[None, :], out,
             mask=row_mask[:, None] & mask_d[None, :])
    tl.store(part_lse + rows * stride_pl_h + split, lse, mask=row_mask)


@jit
def _merge_splits_kernel(
    part_out, part_lse, out, num_splits,
    stride_po_h, stride_po_s, stride_pl_h, stride_o_h,
    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(part_lse + row * stride_pl_h + offs_s, mask=mask_s, other=float("-inf"))
    parts = tl.load(part_out + row * stride_po_h + offs_s[:, None] * stride_po_s + offs_d[None, :],
                    mask=mask_s[:, None] & (offs_d < D)[None, :], other=0.0)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no token at all: weights 0, output 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    res = tl.sum(parts * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out + row * stride_o_h + offs_d, res.to(out.dtype.element_ty), mask=offs_d < D)


def _fast_trig(device: torch.device) -> bool:
    """Hardware cos/sin approximations: compiled NVIDIA kernels only (the interpreter has none)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs run fastest


def decode_splits(hkv: int, kmax: int, page_size: int, block_n: int, device: torch.device,
                  num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, pages_per_split): enough programs to fill the GPU twice over, each with at
    least one block of tokens; pages_per_split is a multiple of the pages in a block."""
    pages_per_block = block_n // page_size
    blocks = -(-kmax // pages_per_block)
    if num_splits is None:
        num_splits = -(-2 * _device_sm_count(device) // hkv)
    num_splits = max(1, min(num_splits, blocks))
    pages_per_split = -(-blocks // num_splits) * pages_per_block
    return -(-kmax // pages_per_split), pages_per_split


def sparse_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            sel_slots: torch.Tensor, sel_lens: torch.Tensor, sm_scale: float | None = None,
                            num_entries: torch.Tensor | None = None,
                            num_splits: int | None = None, out: torch.Tensor | None = None,
                            kv_scale: torch.Tensor | None = None,
                            rotation: KeyRotation | None = None) -> torch.Tensor:
    """Attention of one decode token over the selected pages of its KV head.

    q: (Hq, D) fp16/bf16/fp32, last dim contiguous (Hq = G * Hkv, head i uses KV head i // G);
    k_pool, v_pool: (num_slots, P, D) contiguous, q's dtype; sel_slots, sel_lens: (Hkv, Kmax) int32,
    contiguous: physical slot and number of valid tokens (the first ``len`` of the page; 0 = unused
    entry); sm_scale defaults to 1/sqrt(D); num_entries: optional 1-element int32 device tensor,
    entries at or past it are skipped without being read (dense layers over a capacity-sized list).
    Returns out (Hq, D) in q's dtype (into ``out`` if given, contiguous); a head with no selected
    token gets zeros. num_splits overrides the split heuristic (tuning).
    fp8 pools (e4m3 codes): kv_scale (Hkv, 4) fp32 gives each KV head's K and V scale (columns 0
    and 1; lcrun.kernels.tiered's layout); keys are code * K scale, values code * V scale.
    rotation: window positions (lcrun.kernels.key_rotation.KeyRotation): each selected entry's
    keys are rotated by its delta (fp32 math) before the dot, read on the device (no host sync);
    delta 0 gives exactly the unrotated result in fp32. Needs an even D.
    """
    hq, d = q.shape
    hkv, kmax = sel_slots.shape
    num_slots, page_size, d_pool = k_pool.shape
    assert q.stride(1) == 1 and d_pool == d and hq % hkv == 0, f"q {tuple(q.shape)} vs pool {tuple(k_pool.shape)}"
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and v_pool.shape == k_pool.shape
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k_pool.dtype == v_pool.dtype
    scaled = k_pool.dtype == torch.float8_e4m3fn
    assert k_pool.dtype == q.dtype or scaled, f"q is {q.dtype}, pools {k_pool.dtype}"
    if scaled:
        assert kv_scale is not None and kv_scale.shape == (hkv, 4) and kv_scale.dtype == torch.float32
        assert kv_scale.stride(1) == 1 and kv_scale.device == q.device
    else:
        assert kv_scale is None, "kv_scale is for fp8 pools"
    assert sel_lens.shape == sel_slots.shape and sel_slots.dtype == sel_lens.dtype == torch.int32
    assert sel_slots.is_contiguous() and sel_lens.is_contiguous()
    assert page_size & (page_size - 1) == 0
    if num_entries is not None:
        assert num_entries.numel() == 1 and num_entries.dtype == torch.int32
    if rotation is not None:
        rotation.check(sel_slots, d)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    g = hq // hkv
    block_d = next_pow2(d)
    block_n = max(64, page_size)
    splits, pages_per_split = decode_splits(hkv, kmax, page_size, block_n, q.device, num_splits)
    part_out = torch.empty((hq, splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((hq, splits), device=q.device, dtype=torch.float32)
    # Rotation keeps a third tile (each key's partner half) in flight; with fp32 pools and wide heads
    # two pipeline stages overflow shared memory (launch_fitting_shared_memory takes one then).
    pdl = pdl_enabled(q.device)
    launch_fitting_shared_memory(
        ("sparse_decode", q.device, k_pool.dtype, d, g, page_size, rotation is not None, scaled), 2,
        lambda stages: _sparse_decode_split_kernel[(hkv, splits)](
            q, k_pool, v_pool, sel_slots, sel_lens, num_entries if num_entries is not None else sel_lens,
            kv_scale if scaled else sel_lens,
            *((rotation.inv_freq, rotation.pages, rotation.layout) if rotation is not None else (sel_lens,) * 3),
            part_out, part_lse, sm_scale * LOG2E,
            q.stride(0), k_pool.stride(0), k_pool.stride(1), sel_slots.stride(0),
            part_out.stride(0), part_out.stride(1), part_lse.stride(0), kv_scale.stride(0) if scaled else 0,
            kmax, pages_per_split, rotation.page_base if rotation is not None else 0,
            G=g, G_PAD=max(16, next_pow2(g)), D=d, BLOCK_D=block_d, P=page_size, BLOCK_N=block_n,
            HAS_NUM_ENTRIES=num_entries is not None,
            DOT_FP32=dot_upcast(q.dtype), PRECISION=dot_precision(q.dtype), SCALED=scaled,
            ROTATE=rotation is not None, FAST_TRIG=_fast_trig(q.device), num_warps=4, num_stages=stages, PDL=pdl,
            **pdl_launch(pdl)))
    if out is None:
        out = torch.empty((hq, d), device=q.device, dtype=q.dtype)
    assert out.shape == (hq, d) and out.dtype == q.dtype and out.is_contiguous()
    _merge_splits_kernel[(hq,)](
        part_out, part_lse, out, splits,
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), out.stride(0),
        D=d, BLOCK_D=block_d, SPLITS_PAD=next_pow2(splits), num_warps=4 if block_d <= 128 else 8,
        PDL=pdl, **pdl_launch(pdl),
    )
    return out
