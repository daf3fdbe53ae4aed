"""Plain-torch versions of the page kernels: the test oracle, and the CPU path of the cache.

Same signatures and results as the Triton wrappers (``block_*``/``num_splits`` tuning arguments are
accepted and ignored). Math in fp32; memory stays bounded by working on a chunk of pages at a time
where the whole capacity could be large.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcrun.kernels.key_rotation import rotate_selected_keys

_SCORE_CHUNK_PAGES = 1024
_FINITE = 3.0e38  # scores of scored pages are kept finite, so they rank above -inf


def update_abstracts(k_pool, page_table, kmin, kmax, pages, seq_len=None) -> None:
    page_size = k_pool.shape[1]
    pages = pages.long()
    keys = k_pool[page_table[:, pages].long()]  # (Hkv, n, P, D)
    if seq_len is not None:
        positions = pages[:, None] * page_size + torch.arange(page_size, device=pages.device)
        dead = (positions >= seq_len.reshape(1).long())[None, :, :, None]
        kmin[:, pages] = keys.masked_fill(dead, float("inf")).amin(dim=2)
        kmax[:, pages] = keys.masked_fill(dead, float("-inf")).amax(dim=2)
    else:
        kmin[:, pages] = keys.amin(dim=2)
        kmax[:, pages] = keys.amax(dim=2)


def score_pages(q, kmin, kmax, num_full_pages, group_reduce="max", block_pages=None, num_warps=None,
                candidates=None, out=None, kernel=None, programs_per_head=None, num_stages=None,
                row_pages=1) -> torch.Tensor:
    hkv, max_pages, d = kmin.shape
    qg = q.float().reshape(hkv, -1, 1, d)  # (Hkv, G, 1, D)
    parts = []
    for p0 in range(0, max_pages, _SCORE_CHUNK_PAGES):
        low = kmin[:, None, p0:p0 + _SCORE_CHUNK_PAGES].float()
        high = kmax[:, None, p0:p0 + _SCORE_CHUNK_PAGES].float()
        bound = torch.maximum(qg * low, qg * high).sum(dim=-1)  # (Hkv, G, chunk)
        parts.append(bound.amax(dim=1) if group_reduce == "max" else bound.sum(dim=1))
    scores = torch.cat(parts, dim=1).nan_to_num(-_FINITE, _FINITE, -_FINITE)
    lo = torch.zeros(1, dtype=torch.long, device=kmin.device)
    hi = num_full_pages.reshape(1).long()
    if candidates is not None:
        bounds = candidates.device_bounds() if hasattr(candidates, "device_bounds") else candidates
        lo, hi = bounds[1:2].long(), torch.minimum(hi, bounds[2:3].long())
    if row_pages > 1:  # chunk rows: those holding a page in [lo, hi)
        nonempty = hi > lo
        lo = lo // row_pages
        hi = torch.where(nonempty, (hi + row_pages - 1) // row_pages, lo)
    rows = torch.arange(max_pages, device=kmin.device)
    scored = (rows >= lo) & (rows < hi)
    return _into(out, torch.where(scored[None, :], scores, float("-inf")))


def sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, sm_scale=None, num_entries=None,
                            num_splits=None, out=None, kv_scale=None, rotation=None) -> torch.Tensor:
    hq, d = q.shape
    hkv, kmax = sel_slots.shape
    page_size = k_pool.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    keys = k_pool[sel_slots.long()].float()  # (Hkv, Kmax, P, D)
    values = v_pool[sel_slots.long()].reshape(hkv, kmax * page_size, d).float()
    if kv_scale is not None:  # fp8 codes (lcrun.kernels.tiered's kv_scale layout)
        keys = keys * kv_scale[:, 0, None, None, None]
        values = values * kv_scale[:, 1, None, None]
    if rotation is not None:  # window positions (lcrun.kernels.key_rotation); V is never rotated
        keys = rotate_selected_keys(keys, rotation)
    keys = keys.reshape(hkv, kmax * page_size, d)
    live = torch.arange(page_size, device=q.device) < sel_lens[..., None].long()  # (Hkv, Kmax, P)
    if num_entries is not None:
        live &= (torch.arange(kmax, device=q.device) < num_entries.reshape(1).long())[None, :, None]
    live = live.reshape(hkv, 1, kmax * page_size)
    qg = q.float().reshape(hkv, -1, d)
    scores = (qg @ keys.transpose(1, 2)) * sm_scale  # (Hkv, G, N)
    scores = scores.masked_fill(~live, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a head with no token: zeros
    return _into(out, (probs @ values).reshape(hq, d).to(q.dtype))


def paged_prefill_attention(q, k_pool, v_pool, page_table, start, sm_scale=None, block_m=None,
                            block_n=None, out=None) -> torch.Tensor:
    t, hq, d = q.shape
    hkv = page_table.shape[0]
    page_size = k_pool.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    total = start + t
    n_pages = -(-total // page_size)
    slots = page_table[:, :n_pages].long()
    keys = k_pool[slots].reshape(hkv, n_pages * page_size, d)[:, :total].float()
    values = v_pool[slots].reshape(hkv, n_pages * page_size, d)[:, :total].float()
    visible = torch.arange(total, device=q.device)[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
    # SDPA (fp32) rather than explicit scores: no (Hq, T, total) matrix on long CPU contexts.
    attended = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], keys[None], values[None],
                                              attn_mask=visible, scale=sm_scale, enable_gqa=hq != hkv)
    return _into(out, attended[0].transpose(0, 1).contiguous().to(q.dtype))


def update_chunk_abstracts(kmin, kmax, cmin, cmax, pages, num_full_pages, chunk_pages) -> None:
    """chunk_abstracts.update_chunk_abstracts in torch."""
    hkv, max_pages, d = kmin.shape
    chunks = torch.unique(pages.long() // chunk_pages)
    page = chunks[:, None] * chunk_pages + torch.arange(chunk_pages, device=kmin.device)  # (n, CP)
    full = (page < num_full_pages.reshape(1).long()) & (page < max_pages)
    page = page.clamp(max=max_pages - 1)
    low = kmin[:, page].float().masked_fill(~full[None, :, :, None], float("inf")).amin(dim=2)
    high = kmax[:, page].float().masked_fill(~full[None, :, :, None], float("-inf")).amax(dim=2)
    cmin[:, chunks] = low.to(cmin.dtype)
    cmax[:, chunks] = high.to(cmax.dtype)


def select_top_pages_hier(q, kmin, kmax, cmin, cmax, num_full_pages, page_table, plan, chunk_pages: int,
                          top_chunks: int = 32, group_reduce: str = "max", score_kw=None,
                          hier_warps=None, leader_groups: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_abstracts.select_top_pages_hier in torch: same arguments and result."""
    hkv, max_pages, d = kmin.shape
    P, kmax_entries = plan.page_size, plan.kmax
    n, n_sink, window_first, n_top = (int(x) for x in plan.device_bounds().tolist())
    lo, hi = n_sink, min(int(num_full_pages.reshape(-1)[0]), window_first)
    n_chunks = cmin.shape[1]
    chunks_pad = 1 << max(0, (n_chunks - 1).bit_length())
    top_chunks = min(top_chunks, chunks_pad)
    leader_groups = min(leader_groups, chunks_pad)
    chunk_scores = score_pages(q, cmin, cmax, num_full_pages, group_reduce, candidates=plan.device_bounds(),
                               row_pages=chunk_pages)
    page_scores = score_pages(q, kmin, kmax, num_full_pages, group_reduce)
    slots = torch.zeros((hkv, kmax_entries), dtype=torch.int32, device=kmin.device)
    lens = torch.zeros_like(slots)
    n_forced = n_sink + (n + P - 1) // P - window_first
    forced = [e if e < n_sink else window_first + e - n_sink for e in range(min(n_forced, kmax_entries))]
    pages = torch.arange(max_pages, device=kmin.device)
    for h in range(hkv):
        c_ok = torch.isfinite(chunk_scores[h]) if hi > lo else torch.zeros(n_chunks, dtype=torch.bool)
        # Leaders: the best chunk of each group c % leader_groups (chunk_abstracts.LEADER_GROUPS).
        order = _order(chunk_scores[h], c_ok)
        group_of = order % leader_groups
        first = torch.ones_like(order, dtype=torch.bool)
        seen = set()
        for i, grp in enumerate(group_of.tolist()):
            first[i] = grp not in seen
            seen.add(grp)
        c_rank = order[first][:top_chunks]
        chosen = torch.zeros(max_pages, dtype=torch.bool, device=kmin.device)
        for c in c_rank.tolist():
            chosen[c * chunk_pages:(c + 1) * chunk_pages] = True
        chosen &= (pages >= lo) & (pages < hi)
        top = _order(page_scores[h], chosen)[:max(0, min(n_top, kmax_entries - n_forced))].tolist()
        chosen_pages = torch.tensor(forced + top, dtype=torch.long, device=kmin.device)
        slots[h, :len(chosen_pages)] = page_table[h, chosen_pages]
        lens[h, :len(chosen_pages)] = torch.clamp(n - chosen_pages * P, 0, P).to(torch.int32)
    return slots, lens


def _order(scores: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Indices with ok set, by falling score then rising index."""
    idx = ok.nonzero().flatten()
    order = torch.sort(scores[idx].float(), descending=True, stable=True).indices
    return idx[order]


def _into(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out
