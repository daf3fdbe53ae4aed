"""Kernels of the tiered KV store: pages live in a pinned host pool, the GPU keeps a direct-mapped
page cache, and every host->GPU byte moves through Triton loads of host pointers (zero-copy over
UVA, ~20x the rate of one cudaMemcpyAsync per page), driven by index tensors on the GPU: no host
synchronisation, no per-page host loop, so the decode step can be captured in a CUDA graph.

Layouts, one layer (the caller passes one layer's tensors):
    host_kv     (num_host_slots, 2, P, D) in pinned host memory; [s, 0] is a K page, [s, 1] its V page.
                The inner (2, P, D) must be contiguous; the slot stride may be larger (padded slots of
                a ``HostPagePool``).
    host_slot   (Hkv, max_pages) int32, GPU: host slot of logical page p of KV head h, -1 when the
                page is not in the host pool now (spilled to NVMe, not promoted yet).
    gpu_k/gpu_v (num_cache_slots, P, D) contiguous, GPU: the page cache.
    cache_slot  (Hkv, max_pages) int32, GPU: the one cache slot page (h, p) may occupy (direct-mapped).
    tag         (num_cache_slots,) int32, GPU: flat id h * max_pages + p of the page in the slot, or -1.
    kv_scale    (Hkv, 4) fp32, GPU, for fp8 pages only: [K scale, V scale, 1 / K scale, 1 / V scale]
                of each KV head; a page stores codes = clamp(x / scale, +-448) in e4m3, read as
                code * scale. The host pool and the GPU cache hold the same codes.
                Page (h, p) is cached iff tag[cache_slot[h, p]] == h * max_pages + p.
    sel_pages   (Hkv, Kmax) int32 logical pages, sel_lens (Hkv, Kmax) int32 valid tokens (0 = unused;
                the page of an unused entry is never looked at).

A cached page is always read from the cache (whatever host_slot says): write_through keeps cached
copies coherent and admission copies whole pages, so a cached copy is never stale.

Kernels (a decode step admits its selection first, then attends from GPU memory with
``sparse_decode_attention``: a miss crosses PCIe once):
    admit_pages               copy selected, uncached, host-resident pages into the cache (+ tags),
                              count hits, and map every selected page to a GPU slot for attention
    write_through             new tokens into their host pages, and into cached copies
    gather_pages_to_staging   pages 0..n-1 of every head from the host pool into contiguous buffers

``tiered_reference`` has plain-torch versions with the same signatures.
"""
from __future__ import annotations

import torch

from lcrun.kernels.tiered_reference import FP8_MAX
from lcrun.kernels.triton_support import jit, next_pow2, tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Page storage may also be fp8 (e4m3): codes = clamp(x / scale, +-FP8_MAX), one power-of-two scale
# per KV head for K and one for V (``kv_scale`` below), so a page costs half the bytes to move.
FP8 = torch.float8_e4m3fn
STORE_DTYPES = DTYPES + (FP8,)


# -- host pointers ---------------------------------------------------------------------------------

class HostPointer:
    """A pinned CPU tensor as a Triton pointer argument for a CUDA kernel (zero-copy through UVA).

    Triton's CUDA launcher turns ``data_ptr()`` into a device address with cuPointerGetAttribute,
    which succeeds for page-locked memory (cudaHostAlloc / cudaHostRegister, e.g. a pinned
    ``HostPagePool``) and fails with "cannot be accessed from Triton" for pageable memory. Keeps a
    reference to the tensor, so the memory outlives the launch call.
    """

    __slots__ = ("tensor", "dtype")

    def __init__(self, tensor: torch.Tensor):
        assert tensor.device.type == "cpu", f"HostPointer wraps CPU tensors, got {tensor.device}"
        self.tensor = tensor
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    def __repr__(self) -> str:
        return f"HostPointer({self.dtype}, {tuple(self.tensor.shape)}, 0x{self.data_ptr():x})"


def as_kernel_pointer(t: torch.Tensor, device: torch.device):
    """What to pass to a Triton kernel running on ``device`` for tensor ``t``: ``t`` itself, except
    a CPU tensor for a CUDA kernel, which goes as a :class:`HostPointer` (must be pinned)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return HostPointer(t)
    return t


def _kernel_device(*tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors}
    assert len(devices) == 1, f"GPU-side tensors on several devices: {devices}"
    return devices.pop()


def _check_host(host_kv: torch.Tensor, device: torch.device, page_size: int, d: int, dtype: torch.dtype) -> None:
    assert host_kv.dim() == 4 and host_kv.shape[1:] == (2, page_size, d), \
        f"host_kv {tuple(host_kv.shape)} != (num_host_slots, 2, {page_size}, {d})"
    assert host_kv.stride()[1:] == (page_size * d, d, 1), "host_kv: each slot's (2, P, D) must be contiguous"
    assert host_kv.dtype == dtype, f"host_kv is {host_kv.dtype}, expected {dtype}"
    assert host_kv.device == device or (host_kv.device.type == "cpu" and device.type == "cuda"), \
        f"host_kv on {host_kv.device} cannot be read by kernels on {device}"


def _check_cache(gpu_k, gpu_v, cache_slot, tag, host_slot) -> None:
    assert gpu_k.dim() == 3 and gpu_k.is_contiguous() and gpu_v.is_contiguous() and gpu_v.shape == gpu_k.shape
    assert gpu_k.dtype == gpu_v.dtype and gpu_k.dtype in STORE_DTYPES
    page_size = gpu_k.shape[1]
    assert page_size & (page_size - 1) == 0, f"page size {page_size} must be a power of two"
    assert tag.shape == (gpu_k.shape[0],) and tag.dtype == torch.int32 and tag.is_contiguous()
    assert cache_slot.dim() == 2 and cache_slot.shape == host_slot.shape, \
        f"cache_slot {tuple(cache_slot.shape)} vs host_slot {tuple(host_slot.shape)}"
    assert cache_slot.dtype == host_slot.dtype == torch.int32
    assert cache_slot.is_contiguous() and host_slot.is_contiguous()


def check_kv_scale(kv_scale: torch.Tensor | None, store_dtype: torch.dtype, hkv: int, device: torch.device) -> None:
    """fp8 pages need their (Hkv, 4) fp32 scales on the kernels' device; other dtypes take none."""
    if store_dtype != FP8:
        assert kv_scale is None, f"kv_scale is for fp8 pages, these are {store_dtype}"
        return
    assert kv_scale is not None, "fp8 pages need kv_scale (Hkv, 4): K/V scales and their inverses"
    assert kv_scale.shape == (hkv, 4) and kv_scale.dtype == torch.float32 and kv_scale.stride(1) == 1, \
        f"kv_scale {tuple(kv_scale.shape)} {kv_scale.dtype}, expected ({hkv}, 4) float32, last dim contiguous"
    assert kv_scale.device == device, f"kv_scale on {kv_scale.device}, kernels on {device}"


def _check_selection(sel_pages, sel_lens, hkv) -> None:
    assert sel_pages.dim() == 2 and sel_pages.shape == sel_lens.shape and sel_pages.shape[0] == hkv, \
        f"sel_pages {tuple(sel_pages.shape)}, sel_lens {tuple(sel_lens.shape)}, Hkv {hkv}"
    assert sel_pages.dtype == sel_lens.dtype == torch.int32
    assert sel_pages.is_contiguous() and sel_lens.is_contiguous()


# -- admission -------------------------------------------------------------------------------------

@jit
def _admit_pages_kernel(
    sel_pages, sel_lens, cache_slot, tag, host_slot, host_kv, gpu_k, gpu_v, counters, spec_mark, step_ptr,
    read_slot, read_lens, overflow,
    n_entries, kmax, max_pages, stride_sel_h, stride_map_h, stride_hslot, stride_hkv, stride_cslot,
    PD: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_E: tl.constexpr, COUNT: tl.constexpr,
    SPECULATIVE: tl.constexpr, READ_MAP: tl.constexpr, DISTINCT: tl.constexpr,
):
    i = tl.program_id(0)
    head = i // kmax
    length = tl.load(sel_lens + head * stride_sel_h + i % kmax)
    if READ_MAP:  # where attention reads entry i this step (unused / unreadable: length 0)
        tl.store(read_slot + i, 0)
        tl.store(read_lens + i, 0)
    if length > 0:
        page = tl.load(sel_pages + head * stride_sel_h + i % kmax)
        cslot = tl.load(cache_slot + head * stride_map_h + page)
        flat = head * max_pages + page
        resident = tl.load(tag + cslot)  # flat id of the page in my slot now
        hslot = tl.load(host_slot + head * stride_map_h + page)
        if COUNT:
            # Demand lookups: selected / hit / unreadable (on NVMe only) / hit that this step's
            # speculative admission brought in.
            tl.atomic_add(counters, 1)
            if resident == flat:
                tl.atomic_add(counters + 1, 1)
                if tl.load(spec_mark + cslot) == tl.load(step_ptr):
                    tl.atomic_add(counters + 3, 1)
            elif hslot < 0:
                tl.atomic_add(counters + 2, 1)
        if READ_MAP:
            if resident == flat:
                tl.store(read_slot + i, cslot)
                tl.store(read_lens + i, length)
        if (resident != flat) & (hslot >= 0):
            # Start the host reads now: their PCIe latency overlaps the conflict scan below.
            offs = tl.arange(0, BLOCK_PD)
            mask = offs < PD
            src = host_kv + hslot.to(tl.int64) * stride_hslot + offs
            k_page = tl.load(src, mask=mask)
            v_page = tl.load(src + stride_hkv, mask=mask)
            # Do I own the slot? Another used entry j mapping to it blocks me if its page is the one
            # cached there (the incumbent stays), or if it would be admitted too and j < i.
            blocked = tl.zeros([BLOCK_E], tl.int32)
            for j0 in range(0, 0 if DISTINCT else n_entries, BLOCK_E):
                j = j0 + tl.arange(0, BLOCK_E)
                head_j = j // kmax
                len_j = tl.load(sel_lens + head_j * stride_sel_h + j % kmax, mask=j < n_entries, other=0)
                used_j = (len_j > 0) & (j != i)
                page_j = tl.load(sel_pages + head_j * stride_sel_h + j % kmax, mask=used_j, other=0)
                cslot_j = tl.load(cache_slot + head_j * stride_map_h + page_j, mask=used_j, other=-1)
                same = used_j & (cslot_j == cslot)
                cached_j = same & (resident == head_j * max_pages + page_j)
                hslot_j = tl.load(host_slot + head_j * stride_map_h + page_j, mask=same & ~cached_j, other=-1)
                blocks = cached_j | (same & (hslot_j >= 0) & (j < i))
                blocked += blocks.to(tl.int32)
            n_blocked = tl.sum(blocked, axis=0)
            if n_blocked == 0:
                dst = cslot.to(tl.int64) * stride_cslot + offs
                tl.store(gpu_k + dst, k_page, mask=mask)
                tl.store(gpu_v + dst, v_page, mask=mask)
                tl.debug_barrier()  # every thread's data stores are issued before the tag claims the slot
                tl.store(tag + cslot, flat)
                if SPECULATIVE:
                    tl.store(spec_mark + cslot, tl.load(step_ptr))
                    tl.atomic_add(counters + 4, 1)
            if READ_MAP:
                # A page that lost its slot is still read from the GPU: in entry i's overflow slot,
                # valid for this step's attention only.
                where = tl.where(n_blocked == 0, cslot, overflow + i)
                if n_blocked != 0:
                    dst = (overflow + i).to(tl.int64) * stride_cslot + offs
                    tl.store(gpu_k + dst, k_page, mask=mask)
                    tl.store(gpu_v + dst, v_page, mask=mask)
                tl.store(read_slot + i, where)
                tl.store(read_lens + i, length)


def admit_pages(sel_pages: torch.Tensor, sel_lens: torch.Tensor, cache_slot: torch.Tensor, tag: torch.Tensor,
                host_slot: torch.Tensor, host_kv: torch.Tensor, gpu_k: torch.Tensor, gpu_v: torch.Tensor,
                counters: torch.Tensor | None = None, spec_mark: torch.Tensor | None = None,
                step: torch.Tensor | None = None, speculative: bool = False,
                read_slot: torch.Tensor | None = None, read_lens: torch.Tensor | None = None,
                overflow: int | None = None, distinct: bool = False) -> None:
    """Copy into the GPU cache every selected page (entry with len > 0) that is not cached and is in
    the host pool (host_slot >= 0): its whole K and V page (P * D each, also for a partial last
    page) into gpu_k/gpu_v[cache_slot[h, p]], then tag[cache_slot[h, p]] = h * max_pages + p.

    sel_pages, sel_lens: (Hkv, Kmax) int32; cache_slot, host_slot: (Hkv, max_pages) int32; tag:
    (num_cache_slots,) int32; host_kv: (num_host_slots, 2, P, D) pinned CPU (or device) memory;
    gpu_k, gpu_v: (num_cache_slots, P, D) contiguous, host_kv's dtype.

    Conflicts (direct-mapped: several used entries of this call, of any heads, on one slot): at
    most one page is written per slot, so no slot is ever torn. If the page already cached in the
    slot is itself selected, it keeps the slot and nothing is written there (the other pages miss
    either way; keeping the incumbent moves no bytes). Otherwise the admissible entry with the
    smallest flat index h * Kmax + e wins. Each program decides alone by scanning all Hkv * Kmax
    entries in vector blocks (only for entries that want to admit; cost O(entries) each, fine for a
    few thousand entries); its host reads are issued before the scan, overlapping it.
    ``distinct``: the caller guarantees that no two used entries map to one slot (no scan: the
    cost is O(1) per entry, for calls over every page of a layer, e.g. GpuPageCache.fill).

    One launch, one program per entry; no host synchronisation (graph-capturable). Within a
    program the data is written before the tag. Nothing may read this layer's cache while this
    runs (the caller orders streams: e.g. the prefetcher's side stream is joined by an event before
    the layer's attention).

    Counting (optional, all three of counters (5,) int64, spec_mark (num_cache_slots,) int32 and
    step (1,) int32 on the device): a demand call (speculative=False) adds, over its used entries,
    [selected, cached, unreadable (not cached, host_slot -1), cached by this step's speculative
    admission (spec_mark[slot] == step), 0] to counters, as found before it admits anything; a
    speculative call counts nothing of that, marks spec_mark[slot] = step on each slot it fills
    and adds the pages it admitted to counters[4]. Counting costs no extra launch.

    Read map (optional, demand calls: read_slot and read_lens (Hkv, Kmax) int32 contiguous, and
    ``overflow``): for each entry, where this step's attention reads it from the GPU
    (``sparse_decode_attention(q, gpu_k, gpu_v, read_slot, read_lens)``): its cache slot when
    cached or admitted; when it lost its slot to a conflict, slot ``overflow + h * Kmax + e``, where
    this call copies it (gpu_k/gpu_v then extend past the cache slots: at least overflow + Hkv *
    Kmax rows); length 0 for unused entries and pages in no readable tier.
    """
    hkv, kmax = sel_pages.shape
    num_cache_slots, page_size, d = gpu_k.shape
    device = _kernel_device(sel_pages, sel_lens, cache_slot, tag, host_slot, gpu_k, gpu_v)
    read_map = read_slot is not None
    if read_map:
        assert not speculative and overflow is not None and read_lens is not None
        for t in (read_slot, read_lens):
            assert t.shape == sel_pages.shape and t.dtype == torch.int32 and t.is_contiguous() and t.device == device
        assert tag.shape[0] <= overflow and overflow + hkv * kmax <= gpu_k.shape[0], "no room for overflow slots"
        _check_cache(gpu_k[:tag.shape[0]], gpu_v[:tag.shape[0]], cache_slot, tag, host_slot)
        assert gpu_k.is_contiguous() and gpu_v.is_contiguous() and gpu_v.shape == gpu_k.shape
    else:
        _check_cache(gpu_k, gpu_v, cache_slot, tag, host_slot)
    _check_selection(sel_pages, sel_lens, hkv)
    _check_host(host_kv, device, page_size, d, gpu_k.dtype)
    assert cache_slot.shape[0] == hkv
    n = hkv * kmax
    if n == 0:
        return
    count = counters is not None
    if count:
        _check_counters(counters, spec_mark, step, tag, device)
    pd = page_size * d
    _admit_pages_kernel[(n,)](
        sel_pages, sel_lens, cache_slot, tag, host_slot, as_kernel_pointer(host_kv, device), gpu_k, gpu_v,
        counters if count else tag, spec_mark if count else tag, step if count else tag,
        read_slot if read_map else tag, read_lens if read_map else tag, overflow if read_map else 0,
        n, kmax, cache_slot.shape[1], sel_pages.stride(0), cache_slot.stride(0), host_kv.stride(0),
        host_kv.stride(1), gpu_k.stride(0),
        PD=pd, BLOCK_PD=next_pow2(pd), BLOCK_E=min(1024, next_pow2(n)),
        COUNT=count and not speculative, SPECULATIVE=count and speculative, READ_MAP=read_map, DISTINCT=distinct,
        num_warps=4 if pd * gpu_k.element_size() <= 8192 else 8, num_stages=1,
    )


def _check_counters(counters, spec_mark, step, tag, device) -> None:
    assert counters.shape == (5,) and counters.dtype == torch.int64 and counters.device == device
    assert spec_mark is not None and spec_mark.shape == tag.shape and spec_mark.dtype == torch.int32
    assert step is not None and step.numel() == 1 and step.dtype == torch.int32
    assert spec_mark.device == step.device == device


# -- write-through ---------------------------------------------------------------------------------

@jit
def _to_e4m3(x, code_max: tl.constexpr):
    """fp32 -> e4m3 codes, round to nearest even, saturating at +-code_max. Rounded on e4m3's grid
    in fp32 first (adding and subtracting 1.5 * 2^(23 + s) rounds to a multiple of the grid step
    2^s; subnormals have step 2^-9), so the cast only meets representable values: the interpreter's
    own fp8 cast mis-rounds some values (7.9 -> 4); the GPU's hardware cast agrees with torch on
    every value (perf/diag/fp8_rounding.py), and so does this."""
    size = tl.abs(x)
    biased = (size.to(tl.int32, bitcast=True) >> 23) & 0xFF
    step_exp = tl.maximum(biased - 127, -6) - 3
    magic = (((step_exp + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = tl.minimum((size + magic) - magic, code_max)
    # x's sign bit, also on a zero (a compiled negation is 0 - x, which loses it)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(tl.float8e4nv)


@jit
def _write_through_kernel(
    k_new, v_new, start_ptr, start_int, host_kv, host_slot, gpu_k, gpu_v, cache_slot, tag, kmin, kmax, kv_scale,
    T, max_pages, stride_kt, stride_kh, stride_vt, stride_vh, stride_hslot, stride_hkv, stride_htok,
    stride_cslot, stride_ctok, stride_map_h, stride_abs_h, stride_abs_p, stride_scale_h,
    START_IS_TENSOR: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, ABSTRACTS: tl.constexpr, QUANT: tl.constexpr, CODE_MAX: tl.constexpr,
):
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    pos = offs_t.to(tl.int64)
    if START_IS_TENSOR:
        pos += tl.load(start_ptr).to(tl.int64)
    else:
        pos += start_int  # a host int (Triton may specialise it to a constant)
    page = pos // P
    tok = pos % P
    in_t = offs_t < T
    ok = in_t & (page < max_pages)  # memory safety only: the caller checks capacity
    hslot = tl.load(host_slot + head * stride_map_h + page, mask=ok, other=-1)
    cslot = tl.load(cache_slot + head * stride_map_h + page, mask=ok, other=0)
    cached = ok & (tl.load(tag + cslot, mask=ok, other=-1) == head * max_pages + page)
    m_in = in_t[:, None] & mask_d[None, :]
    k = tl.load(k_new + offs_t[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=m_in)
    v = tl.load(v_new + offs_t[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=m_in)
    if QUANT:  # fp8 pages: codes with the head's scales (multiplying by a power-of-two inverse is exact)
        inv_k = tl.load(kv_scale + head * stride_scale_h + 2)
        inv_v = tl.load(kv_scale + head * stride_scale_h + 3)
        k_st = _to_e4m3(k.to(tl.float32) * inv_k, CODE_MAX)
        v_st = _to_e4m3(v.to(tl.float32) * inv_v, CODE_MAX)
    else:
        k_st = k
        v_st = v
    h_off = hslot.to(tl.int64) * stride_hslot + tok * stride_htok
    m_h = (ok & (hslot >= 0))[:, None] & mask_d[None, :]
    tl.store(host_kv + h_off[:, None] + offs_d[None, :], k_st, mask=m_h)
    tl.store(host_kv + stride_hkv + h_off[:, None] + offs_d[None, :], v_st, mask=m_h)
    c_off = cslot.to(tl.int64) * stride_cslot + tok * stride_ctok
    m_c = cached[:, None] & mask_d[None, :]
    tl.store(gpu_k + c_off[:, None] + offs_d[None, :], k_st, mask=m_c)
    tl.store(gpu_v + c_off[:, None] + offs_d[None, :], v_st, mask=m_c)
    if ABSTRACTS:
        # One token (decode): the running min/max of its page; the page's first token restarts them.
        a_off = head * stride_abs_h + page.to(tl.int64) * stride_abs_p
        m_a = ok[:, None] & mask_d[None, :]
        fresh = (tok == 0)[:, None]
        lo = tl.load(kmin + a_off[:, None] + offs_d[None, :], mask=m_a & ~fresh, other=0.0)
        hi = tl.load(kmax + a_off[:, None] + offs_d[None, :], mask=m_a & ~fresh, other=0.0)
        tl.store(kmin + a_off[:, None] + offs_d[None, :], tl.where(fresh, k, tl.minimum(lo, k)), mask=m_a)
        tl.store(kmax + a_off[:, None] + offs_d[None, :], tl.where(fresh, k, tl.maximum(hi, k)), mask=m_a)


def write_through(k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor, host_kv: torch.Tensor,
                  host_slot: torch.Tensor, gpu_k: torch.Tensor, gpu_v: torch.Tensor, cache_slot: torch.Tensor,
                  tag: torch.Tensor, kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                  kv_scale: torch.Tensor | None = None) -> None:
    """Write tokens at positions start .. start+T-1 of every KV head into their host pages (zero-copy
    stores into host_kv[host_slot[h, pos // P], 0/1, pos % P]) and into the page's GPU cache slot
    when the page is cached there. Never claims a slot (a page cached part-way would hold garbage).

    k_new, v_new: (T, Hkv, D), host_kv's dtype (or fp16/bf16/fp32 when the pages are fp8: then
    stored as codes with ``kv_scale``, module docstring), last dim contiguous (keys post-RoPE); start: a
    Python int, or a 1-element int32/int64 tensor on the GPU side's device (decode: no host sync,
    graph-capturable); host_kv: (num_host_slots, 2, P, D) pinned CPU (or device) memory;
    host_slot, cache_slot: (Hkv, max_pages) int32; gpu_k, gpu_v: (num_cache_slots, P, D); tag:
    (num_cache_slots,) int32. The caller guarantees host_slot >= 0 for the pages written and
    positions below max_pages * P; tokens breaking either are dropped (no out-of-bounds store).

    kmin, kmax: optional (Hkv, max_pages, D) page abstracts, k_new's dtype, last dim contiguous; only
    with T == 1 (a decode step): the token's page gets its running per-channel min/max (reset when
    the token is the page's first), in the same launch; from the exact keys, also for fp8 pages.

    One launch, grid (ceil(T / BLOCK_T), Hkv); each program moves BLOCK_T rows of D contiguous
    elements (16-byte vectors) per K and V.
    """
    t, hkv, d = k_new.shape
    num_cache_slots, page_size, d_cache = gpu_k.shape
    device = _kernel_device(k_new, v_new, host_slot, gpu_k, gpu_v, cache_slot, tag)
    assert v_new.shape == k_new.shape and d_cache == d, f"k {tuple(k_new.shape)}, v {tuple(v_new.shape)}, cache {tuple(gpu_k.shape)}"
    assert k_new.stride(2) == 1 and v_new.stride(2) == 1, "k_new/v_new: last dim must be contiguous"
    assert k_new.dtype == v_new.dtype and k_new.dtype in DTYPES
    assert gpu_k.dtype in (k_new.dtype, FP8), f"tokens are {k_new.dtype}, pages {gpu_k.dtype}"
    _check_cache(gpu_k, gpu_v, cache_slot, tag, host_slot)
    _check_host(host_kv, device, page_size, d, gpu_k.dtype)
    check_kv_scale(kv_scale, gpu_k.dtype, hkv, device)
    assert host_slot.shape[0] == hkv
    if isinstance(start, torch.Tensor):
        assert start.numel() == 1 and start.dtype in (torch.int32, torch.int64) and start.device == device
        start_ptr, start_int = start, 0
    else:
        start_ptr, start_int = host_slot, int(start)
    abstracts = kmin is not None
    if abstracts:
        assert t == 1, "running abstracts are updated in-kernel for one token (decode) only"
        assert kmax is not None and kmin.shape == kmax.shape == (hkv, host_slot.shape[1], d)
        assert kmin.stride() == kmax.stride() and kmin.stride(2) == 1 and kmin.dtype == k_new.dtype
        assert kmin.device == device
    if t == 0:
        return
    block_t = min(32, next_pow2(t))
    _write_through_kernel[(-(-t // block_t), hkv)](
        k_new, v_new, start_ptr, start_int, as_kernel_pointer(host_kv, device), host_slot, gpu_k, gpu_v,
        cache_slot, tag, kmin if abstracts else k_new, kmax if abstracts else k_new,
        kv_scale if kv_scale is not None else tag,
        t, host_slot.shape[1], k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        host_kv.stride(0), host_kv.stride(1), host_kv.stride(2), gpu_k.stride(0), gpu_k.stride(1),
        host_slot.stride(0), kmin.stride(0) if abstracts else 0, kmin.stride(1) if abstracts else 0,
        kv_scale.stride(0) if kv_scale is not None else 0,
        START_IS_TENSOR=isinstance(start, torch.Tensor), P=page_size, D=d, BLOCK_D=next_pow2(d),
        BLOCK_T=block_t, ABSTRACTS=abstracts, QUANT=kv_scale is not None, CODE_MAX=FP8_MAX,
        num_warps=4, num_stages=1,
    )


# -- bulk gather for the layer-by-layer prefill ----------------------------------------------------

@jit
def _gather_pages_kernel(
    host_kv, host_slot, staging_k, staging_v, num_pages, kv_scale,
    stride_hslot, stride_hkv, stride_map_h, stride_st_h, stride_scale_h,
    PD: tl.constexpr, BLOCK_PD: tl.constexpr, PAGES: tl.constexpr, DEQUANT: tl.constexpr,
):
    head = tl.program_id(1)
    pages = tl.program_id(0) * PAGES + tl.arange(0, PAGES)
    offs = tl.arange(0, BLOCK_PD)
    in_p = pages < num_pages
    hslot = tl.load(host_slot + head * stride_map_h + pages, mask=in_p, other=0).to(tl.int64)
    mask = in_p[:, None] & (offs < PD)[None, :]
    src = host_kv + hslot[:, None] * stride_hslot + offs[None, :]
    k = tl.load(src, mask=mask)
    v = tl.load(src + stride_hkv, mask=mask)
    if DEQUANT:  # fp8 codes -> values in the staging dtype
        k = (k.to(tl.float32) * tl.load(kv_scale + head * stride_scale_h)).to(staging_k.dtype.element_ty)
        v = (v.to(tl.float32) * tl.load(kv_scale + head * stride_scale_h + 1)).to(staging_k.dtype.element_ty)
    dst = head.to(tl.int64) * stride_st_h + pages.to(tl.int64)[:, None] * PD + offs[None, :]
    tl.store(staging_k + dst, k, mask=mask)
    tl.store(staging_v + dst, v, mask=mask)


def gather_pages_to_staging(host_kv: torch.Tensor, host_slot: torch.Tensor, num_pages: int,
                            staging_k: torch.Tensor, staging_v: torch.Tensor,
                            kv_scale: torch.Tensor | None = None) -> None:
    """staging_k/v[h, p*P : (p+1)*P] = host K/V page of (h, p) for every KV head h and p < num_pages
    (a layer-by-layer prefill stages a layer's past from the host pool in bulk).

    host_kv: (num_host_slots, 2, P, D) pinned CPU (or device) memory; host_slot: (Hkv, max_pages)
    int32 on the GPU; staging_k, staging_v: (Hkv, capacity_tokens, D), host_kv's dtype, with
    contiguous (capacity_tokens, D) rows and capacity_tokens >= num_pages * P. fp8 pages (with
    their ``kv_scale``) arrive as values in the staging dtype (fp16/bf16/fp32). Every page copied
    must be in the host pool (host_slot >= 0): the caller promotes spilled pages first; the kernel
    does not check (it would read slot -1).

    One launch, grid (ceil(num_pages / PAGES), Hkv): each program copies PAGES whole pages (about
    16 KiB of K and 16 KiB of V) as flat, 16-byte-aligned vectors, all loads in flight at once.
    """
    hkv, capacity, d = staging_k.shape
    page_size = host_kv.shape[2]
    device = _kernel_device(host_slot, staging_k, staging_v)
    dequant = host_kv.dtype != staging_k.dtype
    assert not dequant or host_kv.dtype == FP8, f"host pages {host_kv.dtype}, staging {staging_k.dtype}"
    _check_host(host_kv, device, page_size, d, host_kv.dtype)
    check_kv_scale(kv_scale, host_kv.dtype, hkv, device)
    assert staging_v.shape == staging_k.shape and staging_v.dtype == staging_k.dtype
    assert staging_k.stride()[1:] == (d, 1) and staging_v.stride() == staging_k.stride(), \
        "staging_k/v: (capacity_tokens, D) rows must be contiguous, same strides"
    assert host_slot.dim() == 2 and host_slot.shape[0] == hkv and host_slot.dtype == torch.int32
    assert host_slot.is_contiguous()
    num_pages = int(num_pages)
    assert 0 <= num_pages <= host_slot.shape[1] and num_pages * page_size <= capacity, \
        f"{num_pages} pages of {page_size} do not fit (max_pages {host_slot.shape[1]}, capacity {capacity})"
    if num_pages == 0 or hkv == 0:
        return
    pd = page_size * d
    block_pd = next_pow2(pd)
    pages = max(1, min(next_pow2(num_pages), 16384 // (block_pd * staging_k.element_size())))
    _gather_pages_kernel[(-(-num_pages // pages), hkv)](
        as_kernel_pointer(host_kv, device), host_slot, staging_k, staging_v, num_pages,
        kv_scale if dequant else host_slot,
        host_kv.stride(0), host_kv.stride(1), host_slot.stride(0), staging_k.stride(0),
        kv_scale.stride(0) if dequant else 0,
        PD=pd, BLOCK_PD=block_pd, PAGES=pages, DEQUANT=dequant, num_warps=8, num_stages=1,
    )
