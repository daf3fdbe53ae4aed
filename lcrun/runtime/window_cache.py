"""Top-k page attention with *window positions*, in plain torch: the tests' reference for the paged
and tiered caches' window positions (lcrun.runtime.positions), which the runtime uses. Attended
tokens get positions inside the model's trained window, so a context far longer than the model
was trained on still looks familiar to it (InfLLM, LM-Infinite).

Keys are stored BEFORE rotary embedding, and rotated when read with the position each one gets
for the query block at hand. For a block of queries starting at token c0, with local start
``ls`` = the page boundary at or before c0 - W (W = window_tokens), S = sink pages * P:

    tokens [0, S)        sinks              positions 0 .. S-1
    pages in [S, ls)     far pages; the top k are selected per KV head. far_positions="fixed":
                         every selected token sits at the one position S (InfLLM's fixed
                         distance, F = 1 position). "ordered": the selected pages, in text order,
                         fill positions S .. S+k*P-1 (positions within the cache, as StreamingLLM),
                         which keeps their order and every offset inside a page (F = k*P).
                         "paged": every selected page takes positions S .. S+P-1, so the tokens
                         of a page keep their order and offsets while all pages sit at one
                         distance (F = P)
    tokens [ls, now]     local window       positions S+F+(j-ls): true relative distances

The query at token c0+i sits at S+F+(c0+i-ls), so nothing attended is further away than
S + F + W + P + block tokens. A decode query at token c measures its window from c + 1 (the
tokens cached once it is written), as the kernels' selection does. When ls <= S there are no far pages and every token keeps its true
position: a context of at most about S + W tokens is attended exactly as with real positions.

Selection: page abstracts are per-channel key min/max on pre-RoPE keys, kept as centre c and
radius r, so the Quest bound sum_d max(q_d lo_d, q_d hi_d) = q.c + |q|.r is two matmuls. The query
is first rotated by its distance to the far position (the middle of the far span),
which makes the bound exact for the logit the far keys will get (their rotation is relative).
Prefill selects per sub-block of ``select_block`` queries with the mean bound over the sub-block
(the mean of q.c + |q|.r is mean(q).c + mean(|q|).r: still two matmuls), combined over a GQA
group by max or sum; decode selects with its one query (and so does the prompt's last token: the
Generator runs it on its own). Prefill therefore stays sparse too: each query attends to at most
sinks + far budget + local window, which keeps hidden states past the trained window sane.

Storage: per layer, K and V as (Hkv, capacity, D) with pages being P consecutive tokens, plus
(Hkv, pages, D) centres and radii. Plain torch (gathers and SDPA with a block mask); the host
knows every length, so nothing here is meant for CUDA-graph capture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lcrun.errors import ConfigError
from lcrun.runtime.kv_cache import AttentionCache
from lcrun.runtime.model_config import ModelConfig
from lcrun.runtime.rope import Rotary


FAR_POSITIONS = ("fixed", "ordered", "paged")


class WindowTopKCache(AttentionCache):
    positions_mode = "window"

    def shares_prefill_selection(self, end: int) -> bool:
        return True  # select_block queries share a selection (see the Generator)

    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype, page_size: int = 32,
                 budget: int = 2048, sink_tokens: int = 64, window_tokens: int = 512,
                 group_score: str = "max", select_block: int = 64, piece_tokens: int = 512,
                 far_positions: str = "paged"):
        """budget: tokens attended per KV head by one query besides its own prefill block (sink
        pages + window + selected far pages). select_block: prefill queries sharing one far
        selection. piece_tokens: prefill queries attended in one masked SDPA call (bounds memory
        whatever the generator's prefill chunk)."""
        super().__init__(cfg, capacity, device, dtype)
        if page_size < 1 or page_size & (page_size - 1):
            raise ConfigError(f"page size must be a power of two, got {page_size}")
        if window_tokens < page_size:
            raise ConfigError(f"window positions need --window-tokens >= the page size {page_size}, "
                              f"got {window_tokens}")
        if group_score not in ("max", "sum"):
            raise ConfigError(f"group_score must be max or sum, got {group_score!r}")
        if far_positions not in FAR_POSITIONS:
            raise ConfigError(f"far_positions must be one of {', '.join(FAR_POSITIONS)}, got {far_positions!r}")
        if select_block < 1 or piece_tokens % select_block:
            raise ConfigError(f"piece_tokens {piece_tokens} must be a multiple of select_block {select_block}")
        P = page_size
        self.page_size = P
        self.sink_pages = -(-sink_tokens // P)
        self.window_tokens = window_tokens
        self.far_pages = max(0, (budget - self.sink_pages * P - window_tokens) // P)
        self.group_score = group_score
        self.far_positions = far_positions
        self.select_block = select_block
        self.piece_tokens = piece_tokens
        self.sm_scale = cfg.head_dim ** -0.5

        layers, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.max_pages = -(-capacity // P)
        shape = (layers, hkv, self.max_pages * P, d)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)  # pre-RoPE
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        self.centre = torch.zeros((layers, hkv, self.max_pages, d), device=self.device, dtype=dtype)
        self.radius = torch.zeros_like(self.centre)
        self.last_selection: torch.Tensor | None = None  # (Hkv, blocks, k) far pages of the last attend

    # -- layout -------------------------------------------------------------------------------
    def layout(self, c0: int) -> tuple[int, int]:
        """(local start, sink end) in tokens for a query block starting at token c0; sink end 0
        means no far region: everything at true positions."""
        P, sink_end = self.page_size, self.sink_pages * self.page_size
        ls = max(0, (c0 - self.window_tokens) // P * P)
        return (0, 0) if ls <= sink_end else (ls, sink_end)

    def far_span(self, k_far: int) -> int:
        """Positions the selected far tokens take: F in the module doc."""
        return {"ordered": k_far * self.page_size, "paged": self.page_size}.get(self.far_positions, 1)

    def shift(self, c0: int) -> int:
        """Local tokens and queries of block c0 sit at (token - shift)."""
        ls, sink_end = self.layout(c0)
        if ls == 0:
            return 0
        k_far = min(self.far_pages, (ls - sink_end) // self.page_size)
        return ls - sink_end - self.far_span(k_far)

    # -- per forward ----------------------------------------------------------------------------
    def _plan(self, positions: torch.Tensor) -> None:
        # Positions come from the cache's own layout; the model's positions argument is ignored
        # (they are always cache.length onwards here).
        start, t, P = self.length, positions.numel(), self.page_size
        self._pieces = []
        for p0 in range(start, start + t, self.piece_tokens):
            n = min(self.piece_tokens, start + t - p0)
            c0 = p0 + 1 if t == 1 else p0  # a decode query: the window of the tokens cached once it is written
            ls, sink_end = self.layout(c0)
            far_cands = (ls - sink_end) // P
            k_far = min(self.far_pages, far_cands)
            n_sel = -(-n // self.select_block) if k_far else 0
            shift = self.shift(c0)
            q_pos = torch.arange(p0, p0 + n, device=self.device) - shift
            local_pos = torch.arange(ls, p0 + n, device=self.device) - shift
            rot = dict(q=self.rotary.cos_sin(q_pos, self.dtype),
                       local=self.rotary.cos_sin(local_pos, self.dtype))
            if sink_end:
                rot["sink"] = self.rotary.cos_sin(torch.arange(sink_end, device=self.device), self.dtype)
                # Rotate the query by its distance to the far keys' position (the middle of their
                # span) for scoring against pre-RoPE abstracts (exact for a relative embedding).
                span = self.far_span(k_far)
                rot["score"] = self.rotary.cos_sin(q_pos - sink_end - span // 2, torch.float32)
                far = self.rotary.cos_sin(torch.arange(sink_end, sink_end + span, device=self.device), self.dtype)
                if self.far_positions != "fixed":  # per far token: its block's far section, or its page
                    repeats = n_sel * (k_far if self.far_positions == "paged" else 1)
                    far = tuple(t.reshape(1, -1, t.shape[-1]).repeat(1, repeats, 1) for t in far)
                rot["far"] = far  # built once per piece, used by every layer
            self._pieces.append(dict(p0=p0, n=n, ls=ls, sink_end=sink_end, k_far=k_far, n_sel=n_sel,
                                     rot=rot, mask=self._mask(p0, n, ls, sink_end, k_far, n_sel)))
        first, end = start // P, (start + t) // P
        self._filled_pages = torch.arange(first, end, device=self.device)

    def _mask(self, p0, n, ls, sink_end, k_far, n_sel):
        """(G*n, keys) bool, rows ordered (group member, query) as the folded queries: sinks for all,
        far section b for the queries of sub-block b, local causal. None for one query."""
        if n == 1:
            return None  # one query sees every key it is given
        g = self.cfg.gqa_group
        q_idx = torch.arange(n, device=self.device)
        local_idx = torch.arange(p0 + n - ls, device=self.device) + ls
        causal = local_idx[None, :] <= (p0 + q_idx)[:, None]
        parts = []
        if sink_end:
            parts.append(torch.ones((n, sink_end), dtype=torch.bool, device=self.device))
        if k_far:
            block = q_idx // self.select_block
            far_block = torch.arange(n_sel, device=self.device).repeat_interleave(k_far * self.page_size)
            parts.append(block[:, None] == far_block[None, :])
        mask = torch.cat(parts + [causal], dim=1)
        return mask.repeat(g, 1)

    # -- attention ------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, t = self.length, q.shape[0]
        kl, vl = self.k[layer], self.v[layer]
        kl[:, start:start + t] = k.transpose(0, 1).to(self.dtype)
        vl[:, start:start + t] = v.transpose(0, 1).to(self.dtype)
        if self._filled_pages.numel():
            self._update_abstracts(layer, self._filled_pages)
        outs = [self._attend_piece(layer, q[pc["p0"] - start: pc["p0"] - start + pc["n"]], pc)
                for pc in self._pieces]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _update_abstracts(self, layer: int, pages: torch.Tensor) -> None:
        P, d = self.page_size, self.cfg.head_dim
        keys = self.k[layer, :, pages[0] * P: (pages[-1] + 1) * P].reshape(self.cfg.num_kv_heads, -1, P, d)
        lo, hi = keys.amin(dim=2), keys.amax(dim=2)
        self.centre[layer, :, pages] = (hi + lo) * 0.5
        self.radius[layer, :, pages] = (hi - lo) * 0.5

    def _select(self, layer: int, q: torch.Tensor, pc: dict) -> torch.Tensor:
        """q: (n, Hq, D) pre-RoPE -> (Hkv, n_sel, k_far) far page indices."""
        n, hq, d = q.shape
        hkv, g, P = self.cfg.num_kv_heads, self.cfg.gqa_group, self.page_size
        cos, sin = pc["rot"]["score"]
        qs = Rotary.apply(q.float(), cos, sin)
        pad = pc["n_sel"] * self.select_block - n
        if pad:  # the last sub-block may be short: average over its real queries only
            qs = torch.cat([qs, qs.new_zeros((pad, hq, d))])
        counts = torch.full((pc["n_sel"],), float(self.select_block), device=q.device)
        counts[-1] = self.select_block - pad
        blocks = qs.view(pc["n_sel"], self.select_block, hq, d)
        q_mean = blocks.sum(1) / counts[:, None, None]          # (n_sel, Hq, D)
        q_abs = blocks.abs().sum(1) / counts[:, None, None]
        first, last = pc["sink_end"] // P, pc["ls"] // P
        centre = self.centre[layer, :, first:last].float()      # (Hkv, cands, D)
        radius = self.radius[layer, :, first:last].float()
        q_mean = q_mean.view(pc["n_sel"], hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
        q_abs = q_abs.view(pc["n_sel"], hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
        bound = (q_mean @ centre.transpose(1, 2) + q_abs @ radius.transpose(1, 2)).view(hkv, pc["n_sel"], g, -1)
        scores = bound.amax(dim=2) if self.group_score == "max" else bound.sum(dim=2)
        return torch.topk(scores, pc["k_far"], dim=-1, sorted=False).indices + first

    def _attend_piece(self, layer: int, q: torch.Tensor, pc: dict) -> torch.Tensor:
        n, hq, d = q.shape
        hkv, g, P = self.cfg.num_kv_heads, self.cfg.gqa_group, self.page_size
        kl, vl = self.k[layer], self.v[layer]
        p0, ls, sink_end, rot = pc["p0"], pc["ls"], pc["sink_end"], pc["rot"]
        end = p0 + n
        keys = [Rotary.apply(kl[:, ls:end].transpose(0, 1), *rot["local"]).transpose(0, 1)]
        values = [vl[:, ls:end]]
        if sink_end:
            if pc["k_far"]:
                pages = self._select(layer, q, pc)               # (Hkv, n_sel, k_far)
                if self.far_positions == "ordered":
                    pages = pages.sort(dim=-1).values            # text order -> position order
                self.last_selection = pages
                tok = (pages[..., None] * P + torch.arange(P, device=q.device)).reshape(hkv, -1)
                idx = tok[..., None].expand(-1, -1, d)
                far_k = torch.gather(kl, 1, idx)
                keys.insert(0, Rotary.apply(far_k, *rot["far"]))
                values.insert(0, torch.gather(vl, 1, idx))
            keys.insert(0, Rotary.apply(kl[:, :sink_end].transpose(0, 1), *rot["sink"]).transpose(0, 1))
            values.insert(0, vl[:, :sink_end])
        keys = keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)
        values = values[0] if len(values) == 1 else torch.cat(values, dim=1)
        qr = Rotary.apply(q, *rot["q"]).to(self.dtype)
        rows = qr.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
        mask = pc["mask"]
        if mask is None:
            out = F.scaled_dot_product_attention(rows, keys, values, scale=self.sm_scale)
        else:
            out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=self.sm_scale)
        return out.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)

    # -- bookkeeping ----------------------------------------------------------------------------
    def begin_replay(self, n: int) -> None:
        # Every step's layout and selection sizes are planned on the host (see the module doc).
        raise ConfigError("window positions plan each decode step on the host: it cannot be replayed "
                          "as a CUDA graph (unset LCRUN_CUDA_GRAPH=force)")

    def truncate(self, length: int) -> None:
        # Pages past the new length are rewritten, and their abstracts refreshed once full again.
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.centre, self.radius))
