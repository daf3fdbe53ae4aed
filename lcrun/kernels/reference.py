"""Plain-torch versions of the page kernels: the test oracle, and the CPU path of the cache.

Same signatures and results as the Triton wrappers (``block_*``/``num_splits`` tuning arguments are
accepted and ignored). Math in fp32; memory stays bounded by working on a chunk of pages at a time
where the whole capacity could be large.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
                candidates=None, out=None) -> torch.Tensor:
    hkv, max_pages, d = kmin.shape
    qg = q.float().reshape(hkv, -1, 1, d)  # (Hkv, G, 1, D)
    parts = []
    for p0 in range(0, max_pages, _SCORE_CHUNK_PAGES):
        low = kmin[:, None, p0:p0 + _SCORE_CHUNK_PAGES].float()
        high = kmax[:, None, p0:p0 + _SCORE_CHUNK_PAGES].float()
        bound = torch.maximum(qg * low, qg * high).sum(dim=-1)  # (Hkv, G, chunk)
        parts.append(bound.amax(dim=1) if group_reduce == "max" else bound.sum(dim=1))
    scores = torch.cat(parts, dim=1).nan_to_num(-_FINITE, _FINITE, -_FINITE)
    pages = torch.arange(max_pages, device=kmin.device)
    scored = pages < num_full_pages.reshape(1).long()
    if candidates is not None:
        scored &= (pages >= candidates[1]) & (pages < candidates[2])
    return _into(out, torch.where(scored[None, :], scores, float("-inf")))


def sparse_decode_attention(q, k_pool, v_pool, sel_slots, sel_lens, sm_scale=None, num_entries=None,
                            num_splits=None, out=None) -> torch.Tensor:
    hq, d = q.shape
    hkv, kmax = sel_slots.shape
    page_size = k_pool.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    keys = k_pool[sel_slots.long()].reshape(hkv, kmax * page_size, d).float()
    values = v_pool[sel_slots.long()].reshape(hkv, kmax * page_size, d).float()
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


def _into(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out
