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
bound q.R(Q' - S) against them is exact for the logit a far page gets at S .. S+P-1. While the
sequence stays inside T nothing moves and every kernel runs exactly as with ``--positions true``.

A prompt whose prefill passes T places ALL its queries at window positions, those before T too
(``true_queries``): the tokens a later query reads at window positions must have been computed in
that layout. Computed at true positions and read at window positions, a needle was selected by
nearly every layer and still missed (demo model, passkey 32K: needles at tokens 3K-7K wrong, the
same prompts right when the whole prefill used window positions). So a conversation whose next
prompt passes T while the cache holds tokens computed at true positions prefills from its first
token again (lcrun.runtime.generate), once.

Decode builds a (3,) int32 device layout [S, ls, shift] per step from the selection bounds (no
host sync: the step stays graph-captured); the Triton decode kernel rotates at read
(lcrun.kernels.key_rotation). Prefill past T runs ``window_prefill_attention`` below: pieces of
queries, each sub-block of ``select_block`` queries with its own far selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcrun.kernels.attention_lse import RunningAttention, attention_with_lse
from lcrun.runtime.rope import Rotary

SELECT_BLOCK = 64    # prefill queries sharing one far-page selection
PIECE_TOKENS = 512   # prefill queries per attention call (bounds its temporaries)
# Far pages scored per block in prefill: an fp32 copy of all abstracts would take 4 * Hkv * pages * D
# bytes at once (256 MiB for an 8B model at 1M tokens, which a 24 GiB plan has no room for).
SCORE_BLOCK_PAGES = 4096


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

    def passes(self, end: int) -> bool:
        """Whether a sequence of ``end`` tokens has passed the window (its queries then move)."""
        return self.trained_window is not None and end > self.trained_window

    def true_queries(self, start: int, n: int, prefill_end: int = 0) -> int:
        """How many of the n queries from token ``start`` keep their true positions, in a prefill
        that ends at token ``prefill_end`` (at least start + n). A prefill that passes the window
        places every query at window positions, those before the window too (module doc)."""
        return 0 if self.passes(max(prefill_end, start + n)) else n


def decode_layout(bounds: torch.Tensor, page_size: int, out: torch.Tensor) -> None:
    """Selection bounds (4,) int32 [n, sink pages, first window page, top pages] -> out (3,) int32
    [S, ls, shift] of a window-position decode step (module doc), on the device."""
    n_sink, window_first = bounds[1].long(), bounds[2].long()
    shift = torch.clamp((window_first - n_sink - 1) * page_size, min=0)
    out.copy_(torch.stack((n_sink * page_size, window_first * page_size, shift)))


def rotate_keys(x: torch.Tensor, rotary: Rotary, delta: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by integer ``delta`` (0-dim, or one dim per dim of x.shape[:-1], sizes 1
    or equal) in fp32, back in x's dtype; cos/sin are computed at delta's shape and broadcast."""
    cos, sin = rotary.cos_sin(delta.reshape(-1), torch.float32)     # (M, 1, D)
    cos, sin = cos.view(*delta.shape, -1), sin.view(*delta.shape, -1)
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
    parts = []
    for b in range(first, last, SCORE_BLOCK_PAGES):  # fp32 copies of a block of abstracts at a time
        e = min(last, b + SCORE_BLOCK_PAGES)
        lo, hi = rel_min[:, b:e].float(), rel_max[:, b:e].float()
        parts.append(q_mean @ ((hi + lo) * 0.5).transpose(1, 2) + q_abs @ ((hi - lo) * 0.5).transpose(1, 2))
    bound = torch.cat(parts, dim=-1).view(hkv, n_sel, g, -1)
    scores = bound.amax(dim=2) if group_score == "max" else bound.sum(dim=2)
    return torch.topk(scores, lay.k_far, dim=-1, sorted=False).indices + first


def _attend_piece(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rel_min: torch.Tensor,
                  rel_max: torch.Tensor, lay: PieceLayout, rotary: Rotary, page_size: int, group_score: str,
                  sm_scale: float, select_block: int) -> torch.Tensor:
    """One piece as up to three mask-free attentions merged by log-sum-exp (flash kernels on a GPU:
    a boolean mask would make SDPA expand it over heads, 0.8 GiB at 256K): the queries' own tokens
    (causal), the local window before them, and per sub-block its sinks + far pages."""
    n, hq, d = q.shape
    hkv = keys.shape[0]
    g = hq // hkv
    end, dev = lay.p0 + n, q.device
    qpos = torch.arange(lay.p0, end, device=dev) - lay.shift
    cos, sin = rotary.cos_sin(qpos, q.dtype)
    qr = Rotary.apply(q, cos, sin).to(keys.dtype).view(n, hkv, g, d).permute(1, 2, 0, 3)    # (Hkv, G, n, D)
    local_k = keys[:, lay.ls:end]
    if lay.shift:
        local_k = rotate_keys(local_k, rotary, torch.tensor(-lay.shift, device=dev))
    own = lay.p0 - lay.ls  # local tokens before the piece
    o, lse = attention_with_lse(qr.reshape(hkv * g, n, d), local_k[:, own:].repeat_interleave(g, 0),
                                values[:, lay.p0:end].repeat_interleave(g, 0), True, sm_scale)
    acc = RunningAttention(o.reshape(hkv, g * n, d), lse.reshape(hkv, g * n))  # flash outputs may be strided
    rows = qr.reshape(hkv, g * n, d)
    if own:
        acc.add(*attention_with_lse(rows, local_k[:, :own].contiguous(), values[:, lay.ls:lay.p0], False, sm_scale))
    if lay.sink_end:
        acc.add(*_attend_far(q, qr, keys, values, rel_min, rel_max, lay, rotary, page_size, group_score, sm_scale,
                             select_block))
    return acc.result(q.dtype).view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)


def _attend_far(q: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rel_min: torch.Tensor,
                rel_max: torch.Tensor, lay: PieceLayout, rotary: Rotary, page_size: int, group_score: str,
                sm_scale: float, select_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + each sub-block's far pages, batched over sub-blocks (no mask): q (n, Hq, D) pre-RoPE,
    qr (Hkv, G, n, D) placed -> out (Hkv, G*n, D), lse (Hkv, G*n)."""
    hkv, g, n, d = qr.shape
    P, dev = page_size, q.device
    pages = _select_far(q, rel_min, rel_max, lay, rotary, P, group_score, select_block)  # (Hkv, n_sel, k)
    n_sel = pages.shape[1]
    tok = (pages[..., None] * P + torch.arange(P, device=dev)).reshape(hkv, -1)
    idx = tok[..., None].expand(-1, -1, d)
    # One rotation per page (its tokens share the delta): cos/sin per page, not per token.
    far_k = torch.gather(keys, 1, idx).view(hkv, n_sel, lay.k_far, P, d)
    far_k = rotate_keys(far_k, rotary, (lay.sink_end - pages * P)[..., None]).view(hkv, n_sel, -1, d)
    far_v = torch.gather(values, 1, idx).view(hkv, n_sel, -1, d)
    sinks = (keys[:, None, :lay.sink_end].expand(-1, n_sel, -1, -1), values[:, None, :lay.sink_end].expand(-1, n_sel, -1, -1))
    k_blk = torch.cat((sinks[0], far_k), dim=2).reshape(hkv * n_sel, -1, d)
    v_blk = torch.cat((sinks[1], far_v), dim=2).reshape(hkv * n_sel, -1, d)
    pad = n_sel * select_block - n
    q_blk = torch.nn.functional.pad(qr, (0, 0, 0, pad)) if pad else qr                     # (Hkv, G, n_sel*sb, D)
    q_blk = q_blk.view(hkv, g, n_sel, select_block, d).permute(0, 2, 1, 3, 4).reshape(hkv * n_sel, g * select_block, d)
    o, lse = attention_with_lse(q_blk.contiguous(), k_blk, v_blk, False, sm_scale)
    o = o.reshape(hkv, n_sel, g, select_block, d).permute(0, 2, 1, 3, 4).reshape(hkv, g, -1, d)[:, :, :n]
    lse = lse.reshape(hkv, n_sel, g, select_block).permute(0, 2, 1, 3).reshape(hkv, g, -1)[:, :, :n]
    return o.reshape(hkv, g * n, d), lse.reshape(hkv, g * n)
