"""Where attended tokens sit: true positions while the sequence is inside the model's trained
window, window positions past it (InfLLM-style), decided per query by the paged and tiered caches.

Pools keep keys rotated at their TRUE positions. A query at token c uses window positions when
c >= the trained window T (``PositionRule``). Then, with S = sink pages * P tokens and ls the first
token of the local window (a page boundary), every attended token is re-placed by rotating its
stored key by a delta (rotations compose):

    sinks     [0, S)        stay at 0 .. S-1                     delta 0
    far pages [S, ls)       a selected page's tokens sit at      delta S - page * P
                            S .. S+P-1 (its order and offsets
                            kept, every page at one distance)
    local     [ls, c]       true relative distances              delta -shift
    query     c             at c - shift,  shift = ls - S - P    (0 when there is no far page)

so nothing attended is further than S + P + window + a prefill block from the query. Far pages are
ranked with page-relative abstracts (min/max of each key rotated by its offset in the page): the
bound q.R(Q' - S) against them is exact for the logit a far page gets at S .. S+P-1. While c < T
nothing moves and every kernel runs exactly as with ``--positions true``.

Decode builds a (3,) int32 device layout [S, ls, shift] per step from the selection bounds (no
host sync: the step stays graph-captured); the Triton decode kernel rotates at read
(lcrun.kernels.key_rotation). Prefill past T runs ``window_prefill_attention`` below: pieces of
queries, each sub-block of ``select_block`` queries with its own far selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lcrun.runtime.rope import Rotary

SELECT_BLOCK = 64    # prefill queries sharing one far-page selection
PIECE_TOKENS = 512   # prefill queries per masked attention call (bounds the mask's memory)


@dataclass(frozen=True)
class PositionRule:
    """trained_window: None = true positions always (--positions true, or a context that never
    passes the window); 0 = window positions whenever there are far pages (--positions window);
    else the model's trained window in tokens."""
    trained_window: int | None

    @classmethod
    def for_run(cls, positions: str, trained_window: int, ctx_tokens: int) -> "PositionRule":
        if positions == "true":
            return cls(None)
        if positions == "window":
            return cls(0)
        return cls(trained_window if ctx_tokens > trained_window else None)

    @property
    def may_move(self) -> bool:
        """Whether any query can use window positions (the caches then keep page-relative abstracts)."""
        return self.trained_window is not None

    def window_at(self, position: int) -> bool:
        """Whether the query at token ``position`` uses window positions."""
        return self.trained_window is not None and position >= self.trained_window

    def first_window_position(self) -> int | None:
        return self.trained_window


def decode_layout(bounds: torch.Tensor, page_size: int, out: torch.Tensor) -> None:
    """Selection bounds (4,) int32 [n, sink pages, first window page, top pages] -> out (3,) int32
    [S, ls, shift] of a window-position decode step (module doc), on the device."""
    n_sink, window_first = bounds[1].long(), bounds[2].long()
    shift = torch.clamp((window_first - n_sink - 1) * page_size, min=0)
    out.copy_(torch.stack((n_sink * page_size, window_first * page_size, shift)))


def rotate_keys(x: torch.Tensor, rotary: Rotary, delta: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by integer ``delta`` (broadcastable to x.shape[:-1]) in fp32, back in x's dtype."""
    delta = delta.expand(x.shape[:-1]).reshape(-1)
    cos, sin = rotary.cos_sin(delta, torch.float32)                 # (M, 1, D)
    cos, sin = cos.view(x.shape), sin.view(x.shape)
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * sin).to(x.dtype)


@dataclass(frozen=True)
class PieceLayout:
    p0: int          # first query token
    n: int           # queries
    ls: int          # first local token
    sink_end: int    # S (0: no far region, every token at its true position)
    k_far: int       # far pages per sub-block
    shift: int


def piece_layout(p0: int, n: int, page_size: int, sink_tokens: int, window_tokens: int, budget: int) -> PieceLayout:
    """The window layout of prefill queries p0 .. p0+n-1 (module doc; the local window starts at
    the page boundary at or before p0 - window_tokens)."""
    P = page_size
    sink_end = -(-sink_tokens // P) * P
    ls = max(0, (p0 - window_tokens) // P * P)
    far_pages = max(0, (budget - sink_end - window_tokens) // P)
    if ls <= sink_end or far_pages == 0:
        return PieceLayout(p0, n, 0, 0, 0, 0)
    k_far = min(far_pages, (ls - sink_end) // P)
    return PieceLayout(p0, n, ls, sink_end, k_far, max(0, ls - sink_end - P))


def window_prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rel_min: torch.Tensor,
                             rel_max: torch.Tensor, p0: int, rotary: Rotary, *, page_size: int, sink_tokens: int,
                             window_tokens: int, budget: int, group_score: str, sm_scale: float,
                             select_block: int = SELECT_BLOCK, piece_tokens: int = PIECE_TOKENS) -> torch.Tensor:
    """Window-position attention of prefill queries at tokens p0 .. p0+n-1.

    q: (n, Hq, D) BEFORE RoPE; keys, values: (Hkv, >= p0 + n, D), keys rotated at their true
    positions, the queries' own K/V already written; rel_min, rel_max: (Hkv, pages, D)
    page-relative abstracts of every full page before the local window. Each query attends to
    the sinks, the far pages selected for its sub-block of ``select_block`` queries (within
    ``budget`` tokens with sinks and window), the local window and earlier queries. Returns
    (n, Hq, D) in q's dtype."""
    outs = []
    for a in range(0, q.shape[0], piece_tokens):
        n = min(piece_tokens, q.shape[0] - a)
        lay = piece_layout(p0 + a, n, page_size, sink_tokens, window_tokens, budget)
        outs.append(_attend_piece(q[a:a + n], keys, values, rel_min, rel_max, lay, rotary, page_size,
                                  group_score, sm_scale, select_block))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _select_far(q: torch.Tensor, rel_min: torch.Tensor, rel_max: torch.Tensor, lay: PieceLayout, rotary: Rotary,
                page_size: int, group_score: str, select_block: int) -> torch.Tensor:
    """q (n, Hq, D) pre-RoPE -> (Hkv, sub-blocks, k_far) far pages: the mean over a sub-block of
    Quest's bound q.c + |q|.r with the query at its distance to the far pages (exact: module doc)."""
    n, hq, d = q.shape
    hkv = rel_min.shape[0]
    g = hq // hkv
    n_sel = -(-n // select_block)
    pos = torch.arange(lay.p0, lay.p0 + n, device=q.device) - lay.shift - lay.sink_end
    cos, sin = rotary.cos_sin(pos, torch.float32)
    qs = Rotary.apply(q.float(), cos, sin)
    pad = n_sel * select_block - n
    if pad:  # the last sub-block may be short: average over its real queries only
        qs = torch.cat([qs, qs.new_zeros((pad, hq, d))])
    counts = torch.full((n_sel,), float(select_block), device=q.device)
    counts[-1] = select_block - pad
    blocks = qs.view(n_sel, select_block, hq, d)
    q_mean = (blocks.sum(1) / counts[:, None, None]).view(n_sel, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
    q_abs = (blocks.abs().sum(1) / counts[:, None, None]).view(n_sel, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
    first, last = lay.sink_end // page_size, lay.ls // page_size
    lo, hi = rel_min[:, first:last].float(), rel_max[:, first:last].float()
    bound = q_mean @ ((hi + lo) * 0.5).transpose(1, 2) + q_abs @ ((hi - lo) * 0.5).transpose(1, 2)
    bound = bound.view(hkv, n_sel, g, -1)
    scores = bound.amax(dim=2) if group_score == "max" else bound.sum(dim=2)
    return torch.topk(scores, lay.k_far, dim=-1, sorted=False).indices + first


def _attend_piece(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rel_min: torch.Tensor,
                  rel_max: torch.Tensor, lay: PieceLayout, rotary: Rotary, page_size: int, group_score: str,
                  sm_scale: float, select_block: int) -> torch.Tensor:
    n, hq, d = q.shape
    hkv, P = keys.shape[0], page_size
    g = hq // hkv
    end = lay.p0 + n
    dev = q.device
    qpos = torch.arange(lay.p0, end, device=dev) - lay.shift
    cos, sin = rotary.cos_sin(qpos, q.dtype)
    rows = Rotary.apply(q, cos, sin).to(keys.dtype).view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
    local_k = keys[:, lay.ls:end]
    if lay.shift:
        local_k = rotate_keys(local_k, rotary, torch.tensor(-lay.shift, device=dev))
    parts_k, parts_v, masks = [local_k], [values[:, lay.ls:end]], []
    q_idx = torch.arange(n, device=dev)
    causal = (torch.arange(lay.ls, end, device=dev)[None, :] <= (lay.p0 + q_idx)[:, None])
    if lay.sink_end:
        pages = _select_far(q, rel_min, rel_max, lay, rotary, P, group_score, select_block)  # (Hkv, n_sel, k)
        n_sel = pages.shape[1]
        tok = (pages[..., None] * P + torch.arange(P, device=dev)).reshape(hkv, -1)
        idx = tok[..., None].expand(-1, -1, d)
        delta = (lay.sink_end - pages * P)[..., None].expand(-1, -1, -1, P).reshape(hkv, -1)
        far_k = rotate_keys(torch.gather(keys, 1, idx), rotary, delta)
        parts_k = [keys[:, :lay.sink_end], far_k] + parts_k
        parts_v = [values[:, :lay.sink_end], torch.gather(values, 1, idx)] + parts_v
        block = q_idx // select_block
        far_block = torch.arange(n_sel, device=dev).repeat_interleave(lay.k_far * P)
        masks = [torch.ones((n, lay.sink_end), dtype=torch.bool, device=dev), block[:, None] == far_block[None, :]]
    k_all = torch.cat(parts_k, dim=1) if len(parts_k) > 1 else parts_k[0]
    v_all = torch.cat(parts_v, dim=1) if len(parts_v) > 1 else parts_v[0]
    mask = torch.cat(masks + [causal], dim=1).repeat(g, 1) if n > 1 else None
    out = F.scaled_dot_product_attention(rows, k_all, v_all, attn_mask=mask, scale=sm_scale)
    return out.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d).to(q.dtype)

