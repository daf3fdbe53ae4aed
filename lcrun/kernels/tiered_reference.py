"""Plain-torch versions of the tiered-store kernels (``tiered``): the test oracle and the CPU path.

Same signatures and results (tuning arguments accepted and ignored). ``host_kv`` may live on the
CPU while the other tensors are on a GPU: indices go to the host for the gathers/scatters there,
results come back (with host synchronisation: this is an oracle, not the fast path).
"""
from __future__ import annotations

import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def encode(x: torch.Tensor, inv_scale: torch.Tensor, store_dtype: torch.dtype) -> torch.Tensor:
    """Values -> page storage: fp8 codes clamp(x * inv_scale, +-448) (inv_scale broadcasts), else a cast."""
    if store_dtype != torch.float8_e4m3fn:
        return x.to(store_dtype)
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(store_dtype)


def decode(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Page storage -> values in ``dtype`` (scale broadcasts; None: a cast)."""
    if scale is None:
        return codes.to(dtype)
    return (codes.float() * scale).to(dtype)


def _host_pages(host_kv: torch.Tensor, slots: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pages at host ``slots`` (any shape, -1 read as slot 0) on ``device``."""
    pages = host_kv[slots.clamp(min=0).long().to(host_kv.device)].to(device)
    return pages[..., 0, :, :], pages[..., 1, :, :]


def _lookup(pages: torch.Tensor, heads: torch.Tensor, cache_slot, tag, host_slot):
    """For logical ``pages`` of KV ``heads`` (same shape): cache slot, cached?, host slot."""
    max_pages = cache_slot.shape[1]
    cslot = cache_slot[heads, pages].long()
    cached = tag[cslot].long() == heads * max_pages + pages
    return cslot, cached, host_slot[heads, pages].long()


def _selection_lookup(sel_pages, sel_lens, cache_slot, tag, host_slot):
    hkv, kmax = sel_pages.shape
    used = sel_lens > 0
    pages = torch.where(used, sel_pages, 0).long()
    heads = torch.arange(hkv, device=sel_pages.device)[:, None].expand(hkv, kmax)
    cslot, cached, hslot = _lookup(pages, heads, cache_slot, tag, host_slot)
    return used, pages, heads, cslot, used & cached, hslot


def admission_winners(sel_pages, sel_lens, cache_slot, tag, host_slot) -> torch.Tensor:
    """(Hkv, Kmax) bool: the entries ``admit_pages`` copies (see its conflict rule)."""
    hkv, kmax = sel_pages.shape
    used, _, _, cslot, cached, hslot = _selection_lookup(sel_pages, sel_lens, cache_slot, tag, host_slot)
    admissible = used & ~cached & (hslot >= 0)
    # Per slot, the smallest key among its claimants: the incumbent (key -1) if selected, else the
    # smallest flat entry index that would admit.
    n = hkv * kmax
    index = torch.arange(n, device=sel_pages.device).reshape(hkv, kmax)
    big = torch.full_like(index, n)
    key = torch.where(cached, -1, torch.where(admissible, index, big))
    best = torch.full((tag.shape[0],), n, dtype=torch.long, device=tag.device)
    best.scatter_reduce_(0, cslot.flatten(), key.flatten(), reduce="amin")
    return admissible & (best[cslot] == index)


def admit_pages(sel_pages, sel_lens, cache_slot, tag, host_slot, host_kv, gpu_k, gpu_v, counters=None,
                spec_mark=None, step=None, speculative=False, read_slot=None, read_lens=None, overflow=None,
                distinct=False) -> None:
    # ``distinct`` only spares the Triton kernel its conflict scan: with no conflicts the winners are the same.
    max_pages = cache_slot.shape[1]
    if read_slot is not None:
        _read_map(sel_pages, sel_lens, cache_slot, tag, host_slot, host_kv, gpu_k, gpu_v, read_slot, read_lens,
                  overflow)
    if counters is not None and not speculative:
        used, _, _, cslot, cached, hslot = _selection_lookup(sel_pages, sel_lens, cache_slot, tag, host_slot)
        by_spec = cached & (spec_mark[cslot.long()] == step.reshape(()))
        counters += torch.stack([used.sum(), cached.sum(), (used & ~cached & (hslot < 0)).sum(), by_spec.sum(),
                                 torch.zeros((), dtype=torch.long, device=counters.device)]).to(counters)
    winners = admission_winners(sel_pages, sel_lens, cache_slot, tag, host_slot)
    heads, entries = winners.nonzero(as_tuple=True)
    if heads.numel() == 0:
        return
    pages = sel_pages[heads, entries].long()
    cslot = cache_slot[heads, pages].long()
    host_k, host_v = _host_pages(host_kv, host_slot[heads, pages], gpu_k.device)
    gpu_k[cslot] = host_k
    gpu_v[cslot] = host_v
    tag[cslot] = (heads * max_pages + pages).to(tag.dtype)
    if counters is not None and speculative:
        spec_mark[cslot] = step.reshape(()).to(spec_mark.dtype)
        counters[4] += heads.numel()


def _read_map(sel_pages, sel_lens, cache_slot, tag, host_slot, host_kv, gpu_k, gpu_v, read_slot, read_lens,
              overflow) -> None:
    """admit_pages' read map, from the state before admission: cached -> its slot; winners -> the
    slot they will take; losers -> their overflow slot, filled here; unreadable/unused -> length 0."""
    hkv, kmax = sel_pages.shape
    used, _, _, cslot, cached, hslot = _selection_lookup(sel_pages, sel_lens, cache_slot, tag, host_slot)
    winners = admission_winners(sel_pages, sel_lens, cache_slot, tag, host_slot)
    losers = used & ~cached & (hslot >= 0) & ~winners
    entry = torch.arange(hkv * kmax, device=sel_pages.device).reshape(hkv, kmax)
    slot = torch.where(losers, overflow + entry, cslot.long())
    readable = cached | (used & (hslot >= 0))
    read_slot.copy_(torch.where(readable, slot, 0).to(torch.int32))
    read_lens.copy_(torch.where(readable, sel_lens, 0).to(torch.int32))
    heads, entries = losers.nonzero(as_tuple=True)
    if heads.numel():
        pages = sel_pages[heads, entries].long()
        host_k, host_v = _host_pages(host_kv, host_slot[heads, pages], gpu_k.device)
        dst = (overflow + heads * kmax + entries).long()
        gpu_k[dst] = host_k
        gpu_v[dst] = host_v


def write_through(k_new, v_new, start, host_kv, host_slot, gpu_k, gpu_v, cache_slot, tag, kmin=None,
                  kmax=None, kv_scale=None) -> None:
    t, hkv, d = k_new.shape
    if kmin is not None:
        running_abstracts(k_new, start, kmin, kmax, gpu_k.shape[1])
    page_size = gpu_k.shape[1]
    max_pages = host_slot.shape[1]
    steps = torch.arange(t, device=k_new.device)
    positions = steps + (start.reshape(1).long() if isinstance(start, torch.Tensor) else int(start))
    heads = torch.arange(hkv, device=k_new.device)[:, None].expand(hkv, t)
    pages = (positions // page_size)[None, :].expand(hkv, t)
    tok = (positions % page_size)[None, :].expand(hkv, t)
    ok = pages < max_pages
    heads, pages, tok = heads[ok], pages[ok], tok[ok]
    k_rows, v_rows = k_new.transpose(0, 1)[ok], v_new.transpose(0, 1)[ok]  # (n, D)
    if kv_scale is not None:
        k_rows = encode(k_rows, kv_scale[heads, 2, None], gpu_k.dtype)
        v_rows = encode(v_rows, kv_scale[heads, 3, None], gpu_k.dtype)
    cslot, cached, hslot = _lookup(pages, heads, cache_slot, tag, host_slot)
    to_host = hslot >= 0
    hd = host_kv.device
    hs, ht = hslot[to_host].to(hd), tok[to_host].to(hd)
    host_kv[hs, 0, ht] = k_rows[to_host].to(hd)
    host_kv[hs, 1, ht] = v_rows[to_host].to(hd)
    gpu_k[cslot[cached], tok[cached]] = k_rows[cached]
    gpu_v[cslot[cached], tok[cached]] = v_rows[cached]


def running_abstracts(k_new, start, kmin, kmax, page_size) -> None:
    """One decode token: its page's running key min/max, restarted at the page's first token."""
    assert k_new.shape[0] == 1
    pos = start.reshape(1).long() if isinstance(start, torch.Tensor) else torch.tensor([int(start)])
    pos = pos.to(kmin.device)
    page = pos // page_size
    fresh = (pos % page_size == 0)[:, None, None]
    kt = k_new.transpose(0, 1)  # (Hkv, 1, D)
    kmin.index_copy_(1, page, torch.where(fresh, kt, torch.minimum(kmin.index_select(1, page), kt)))
    kmax.index_copy_(1, page, torch.where(fresh, kt, torch.maximum(kmax.index_select(1, page), kt)))


def gather_pages_to_staging(host_kv, host_slot, num_pages, staging_k, staging_v, kv_scale=None) -> None:
    hkv, _, d = staging_k.shape
    page_size = host_kv.shape[2]
    num_pages = int(num_pages)
    if num_pages == 0:
        return
    host_k, host_v = _host_pages(host_kv, host_slot[:, :num_pages], staging_k.device)
    if kv_scale is not None:
        host_k = decode(host_k, kv_scale[:, 0, None, None, None], staging_k.dtype)
        host_v = decode(host_v, kv_scale[:, 1, None, None, None], staging_k.dtype)
    staging_k[:, :num_pages * page_size] = host_k.reshape(hkv, num_pages * page_size, d)
    staging_v[:, :num_pages * page_size] = host_v.reshape(hkv, num_pages * page_size, d)
