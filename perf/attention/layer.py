"""One decode-attention layer at benchmark shapes and the operations `python -m perf.attention` times
on it, as the runtime runs them: plan, page scoring, top-k selection (fused, and the older
torch.topk one), hierarchical selection, sparse attention, whole flat and hierarchical steps."""
from __future__ import annotations

import warnings

import torch

from lcrun.kernels import plan_selection, select_with_plan
from lcrun.kernels.abstracts import update_abstracts
from lcrun.kernels.chunk_abstracts import chunk_abstracts_like, select_top_pages_hier, update_chunk_abstracts
from lcrun.kernels.score import score_pages
from lcrun.kernels.select_kernels import assemble_selection, selection_bounds
from lcrun.kernels.sparse_decode import sparse_decode_attention
from lcrun.kernels.topk import select_top_pages
from perf.attention.timing import device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -- inputs ----------------------------------------------------------------------------------------

class Layer:
    """One layer's paged K/V for ``context`` tokens (identity page table) and a decode query.
    hot > 0: structured keys: ``hot`` random candidate pages per KV head get keys along the mean
    query of their group (strength * unit vector added), so a few pages matter (retrieval-like)."""

    def __init__(self, context: int, args, seed: int = 0, hot: int = 0, chunk_pages=()):
        dev, dtype, P = device(), DTYPES[args.dtype], args.page
        torch.manual_seed(seed)
        self.context, self.P = context, P
        self.max_pages = -(-context // P)
        hkv, d = args.hkv, args.head_dim
        num_slots = hkv * self.max_pages
        self.q = torch.randn(args.hq, d, device=dev, dtype=dtype)
        self.k_pool = torch.randn(num_slots, P, d, device=dev, dtype=dtype)
        self.v_pool = torch.randn(num_slots, P, d, device=dev, dtype=dtype)
        self.hot_pages = None
        if hot:
            lo = -(-args.sinks // P)
            hi = max(lo + 1, (context - args.window) // P - 1)
            direction = self.q.float().view(hkv, -1, d).mean(1)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            self.hot_pages = torch.stack([torch.randperm(hi - lo, device=dev)[:hot] + lo for _ in range(hkv)])
            slots = (torch.arange(hkv, device=dev)[:, None] * self.max_pages + self.hot_pages).flatten()
            boost = (args.hot_strength * direction).repeat_interleave(hot, 0)[:, None, :]
            self.k_pool[slots] = (self.k_pool[slots].float() + boost).to(dtype)
        self.table = torch.arange(num_slots, device=dev, dtype=torch.int32).reshape(hkv, self.max_pages)
        self.kmin = torch.empty(hkv, self.max_pages, d, device=dev, dtype=dtype)
        self.kmax = torch.empty_like(self.kmin)
        update_abstracts(self.k_pool, self.table, self.kmin, self.kmax,
                         torch.arange(context // P, device=dev, dtype=torch.int32))
        self.seq_len = torch.tensor([context], device=dev, dtype=torch.int32)
        self.num_full = torch.tensor([context // P], device=dev, dtype=torch.int32)
        self.last_page = torch.tensor([(context - 1) // P], device=dev, dtype=torch.int32)
        self.chunks = {}  # chunk_pages -> (cmin, cmax)
        all_pages = torch.arange(self.max_pages, device=dev, dtype=torch.int32)
        for cp in chunk_pages:
            cmin, cmax = chunk_abstracts_like(self.kmin, cp)
            update_chunk_abstracts(self.kmin, self.kmax, cmin, cmax, all_pages, self.num_full, cp)
            self.chunks[cp] = (cmin, cmax)

    def dense_kv(self):
        """(Hkv, context, D) views of the pools: with the identity table, head h's pages are adjacent."""
        hkv, d = self.kmin.shape[0], self.kmin.shape[2]
        k = self.k_pool.view(hkv, self.max_pages * self.P, d)[:, : self.context]
        v = self.v_pool.view(hkv, self.max_pages * self.P, d)[:, : self.context]
        return k, v


def dense_names() -> list[str]:
    """The dense baselines, ``backend/form``: SDPA backends by GQA formulation (enable_gqa, or the G
    query heads of a group as G query rows of one KV head); the math backend alone without CUDA."""
    backends = ("flash", "efficient", "cudnn") if torch.cuda.is_available() else ("math",)
    return [f"{b}/{f}" for b in backends for f in ("enable_gqa", "group_rows")]


def dense_call(layer: Layer, args, name: str):
    """A callable running the dense baseline ``name`` (see dense_names) over the whole context."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backend_name, form = name.split("/")
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]
    k, v = layer.dense_kv()
    k4, v4 = k[None], v[None]  # (1, Hkv, L, D)
    gqa = form == "enable_gqa"
    q4 = layer.q.view(1, args.hq, 1, -1) if gqa else layer.q.view(1, args.hkv, args.hq // args.hkv, -1)

    def run():
        with sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "kernel not used because ..." for unsupported shapes
            return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=gqa)
    return run


def plan(layer: Layer, args):
    """Once per decode step in the runtime (shared by all layers)."""
    return plan_selection(layer.seq_len, layer.max_pages, args.page, args.sinks, args.window, args.budget,
                          bounds_fn=selection_bounds)


def folded_plan(layer: Layer, args):
    """The plan with nothing launched: the kernels compute the bounds from seq_len."""
    return plan_selection(layer.seq_len, layer.max_pages, args.page, args.sinks, args.window, args.budget,
                          fold=True)


def hier_select(layer: Layer, args, step_plan, chunk_pages=None, top_chunks=None):
    cp = chunk_pages or args.chunk_pages
    cmin, cmax = layer.chunks[cp]
    return select_top_pages_hier(layer.q, layer.kmin, layer.kmax, cmin, cmax, layer.num_full, layer.table,
                                 step_plan, cp, top_chunks or args.top_chunks, args.group_score)


def hier_step(layer: Layer, args, out=None, chunk_pages=None, top_chunks=None):
    """Hierarchical layer: folded plan, chunk scores, pages of the best chunks, top-k, attend."""
    slots, lens = hier_select(layer, args, folded_plan(layer, args), chunk_pages, top_chunks)
    return attend(layer, args, slots, lens, out)


def flat_step_folded(layer: Layer, args, out=None):
    """Flat layer with the plan folded into the score and top-k kernels (no plan launch)."""
    step_plan = folded_plan(layer, args)
    scores = score(layer, args, step_plan)
    slots, lens = select(layer, scores, step_plan, args)
    return attend(layer, args, slots, lens, out)


def score(layer: Layer, args, step_plan, **variant):
    kw = dict(kernel=args.score_kernel, block_pages=args.score_block_pages, num_warps=args.score_warps,
              programs_per_head=args.score_programs, num_stages=args.score_stages)
    kw.update(variant)
    return score_pages(layer.q, layer.kmin, layer.kmax, layer.num_full, args.group_score,
                       candidates=step_plan if step_plan.bounds is None else step_plan.bounds, **kw)


def select(layer: Layer, scores, step_plan, args=None, **variant):
    """The runtime's selection: fused top-k + assembly, one launch (lcrun.kernels.topk)."""
    kw = {}
    if args is not None:
        warps = args.topk_warps
        if warps is None and getattr(args, "topk_warps_by_context", None):
            warps = args.topk_warps_by_context.get(layer.context)
        kw = dict(num_warps=warps, groups=args.topk_groups, cap=args.topk_cap)
    kw.update(variant)
    return select_top_pages(scores, layer.table, step_plan, **kw)


def select_old(layer: Layer, scores, step_plan):
    """The previous selection: torch.topk + the assembly kernel."""
    return select_with_plan(scores, layer.table, step_plan, assemble=assemble_selection, masked=True)


def attend(layer: Layer, args, slots, lens, out=None):
    return sparse_decode_attention(layer.q, layer.k_pool, layer.v_pool, slots, lens,
                                   num_splits=args.num_splits, out=out)


def sparse_step(layer: Layer, args, out: torch.Tensor | None = None, old: bool = False, with_plan: bool = True,
                step_plan=None):
    """What one layer costs in a decode step, plus the per-step plan, as the cache runs them.
    old: torch.topk selection; with_plan=False: the layer alone (the runtime plans once per step
    for all layers), given ``step_plan``."""
    if with_plan:
        step_plan = plan(layer, args)
    scores = score(layer, args, step_plan)
    slots, lens = select_old(layer, scores, step_plan) if old else select(layer, scores, step_plan, args)
    return attend(layer, args, slots, lens, out)


def same_selection(a, b) -> tuple[bool, bool]:
    """(identical, same set per head) of two (slots, lens) selections."""
    exact = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    as_sets = (torch.equal(a[0].sort(dim=1).values, b[0].sort(dim=1).values)
               and torch.equal(a[1].sum(dim=1), b[1].sum(dim=1)))
    return exact, as_sets


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def page_mask(layer: Layer, slots, lens) -> torch.Tensor:
    """(Hkv, max_pages) bool: pages selected (identity table: slot = h * max_pages + page)."""
    hkv = slots.shape[0]
    pages = (slots.long() - torch.arange(hkv, device=slots.device)[:, None] * layer.max_pages).clamp(0)
    mask = torch.zeros(hkv, layer.max_pages, dtype=torch.bool, device=slots.device)
    mask.scatter_(1, pages, lens > 0)
    return mask
