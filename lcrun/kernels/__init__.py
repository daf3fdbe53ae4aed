"""Page kernels for top-k (Quest-style) sparse attention over a paged KV cache.

Storage, per layer: ``k_pool``/``v_pool`` (num_slots, P, D), one slot = one page of one KV head;
``page_table`` (Hkv, max_pages) int32, logical page -> slot (kernels always go through it);
``kmin``/``kmax`` (Hkv, max_pages, D) per-channel key min/max of each full page.

Modules, one job each:
    write_kv        scatter new tokens into their pages (torch)
    abstracts       update_abstracts  (Triton)
    score           score_pages       (Triton)
    select          selection rules: plan_selection / select_with_plan / select_pages (torch)
    select_kernels  selection_bounds, assemble_selection (Triton versions of select's bookkeeping)
    sparse_decode   sparse_decode_attention (Triton, flash-decoding + LSE merge)
    paged_prefill   paged_prefill_attention (Triton, exact causal)
    topk            fused top-k + selection assembly in one launch (Triton)
    chunk_abstracts chunk min/max over groups of pages, hierarchical selection (Triton)
    attention_lse   chunk attention returning its log-sum-exp, for exact merges (torch flash)
    tiered          tiered store: admit missed pages from pinned host memory into the GPU page
                    cache and write a read map, write-through, zero-copy gathers (Triton)
    fused_norm      RMSNorm with the residual add fused in (Triton, lazily decorated)
    fused_rope      rotary embedding of q and k in one launch (Triton, lazily decorated)
    triton_support  interpreter-or-GPU mode, jit/lazy_jit, use_triton
    reference       plain-torch versions of the Triton kernels (oracle and CPU path)
    backend         kernel_backend(device): who runs them

Triton picks GPU compilation or the interpreter when a kernel module is imported, so set
``TRITON_INTERPRET=1`` before the first kernel use to run the kernels on CPU tensors. The Triton
modules are imported lazily (through ``kernel_backend``), so this package imports without Triton.
"""
from lcrun.kernels.backend import KernelBackend, kernel_backend
from lcrun.kernels.select import SelectionPlan, max_entries, plan_selection, select_pages, select_with_plan
from lcrun.kernels.write_kv import write_kv

__all__ = [
    "KernelBackend", "kernel_backend", "SelectionPlan", "max_entries", "plan_selection", "select_pages",
    "select_with_plan", "write_kv",
]
