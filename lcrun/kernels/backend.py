"""The one place that decides who runs the page kernels: Triton (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) or the plain-torch reference (any other CPU use)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from lcrun.kernels import key_rotation, reference, select
from lcrun.kernels.triton_support import BACKENDS, can_run_triton


@dataclass(frozen=True)
class KernelBackend:
    name: str
    update_abstracts: Callable[..., None]
    score_pages: Callable[..., torch.Tensor]
    sparse_decode_attention: Callable[..., torch.Tensor]
    paged_prefill_attention: Callable[..., torch.Tensor]
    selection_bounds: Callable[..., torch.Tensor]
    assemble_selection: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (scores, page_table, plan, masked=False) -> sel_slots, sel_lens: top-k + assembly in one call.
    select_top_pages: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # Hierarchical selection (lcrun.kernels.chunk_abstracts): chunk abstracts, then pages in the best chunks.
    update_chunk_abstracts: Callable[..., None] | None = None
    select_top_pages_hier: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # Window positions (lcrun.kernels.key_rotation): page-relative abstracts after one decode token.
    update_relative_abstract: Callable[..., None] | None = None


TORCH_BACKEND = KernelBackend(
    name="torch",
    update_abstracts=reference.update_abstracts,
    score_pages=reference.score_pages,
    sparse_decode_attention=reference.sparse_decode_attention,
    paged_prefill_attention=reference.paged_prefill_attention,
    selection_bounds=select.selection_bounds,
    assemble_selection=select.assemble_selection,
    select_top_pages=select.select_top_pages,
    update_chunk_abstracts=reference.update_chunk_abstracts,
    select_top_pages_hier=reference.select_top_pages_hier,
    update_relative_abstract=key_rotation.update_relative_abstract_reference,
)


def _triton_backend() -> KernelBackend:
    from lcrun.kernels import chunk_abstracts
    from lcrun.kernels.abstracts import update_abstracts
    from lcrun.kernels.paged_prefill import paged_prefill_attention
    from lcrun.kernels.score import score_pages
    from lcrun.kernels.select_kernels import assemble_selection, selection_bounds
    from lcrun.kernels.sparse_decode import sparse_decode_attention
    from lcrun.kernels.topk import select_top_pages
    return KernelBackend("triton", update_abstracts, score_pages, sparse_decode_attention, paged_prefill_attention,
                         selection_bounds, assemble_selection, select_top_pages,
                         update_chunk_abstracts=chunk_abstracts.update_chunk_abstracts,
                         select_top_pages_hier=chunk_abstracts.select_top_pages_hier,
                         update_relative_abstract=key_rotation.update_relative_abstract)


def kernel_backend(device: torch.device | str, prefer: str = "auto") -> KernelBackend:
    """``auto``: Triton where it can run on ``device``, else torch. ``triton``/``torch`` force one
    (forcing Triton where it cannot run is an error). On the CPU, LCRUN_CPU_KERNELS=torch makes
    ``auto`` take torch even under the Triton interpreter: model-level tests then run at torch speed
    while the kernel tests keep the interpreter."""
    assert prefer in BACKENDS, f"backend must be one of {BACKENDS}, got {prefer!r}"
    device = torch.device(device)
    if prefer == "auto" and device.type == "cpu" and os.environ.get("LCRUN_CPU_KERNELS") == "torch":
        prefer = "torch"
    if prefer == "torch" or (prefer == "auto" and not can_run_triton(device)):
        return TORCH_BACKEND
    if not can_run_triton(device):
        raise RuntimeError(f"Triton kernels cannot run on {device}: use a CUDA device, set TRITON_INTERPRET=1 "
                           "before importing lcrun, or the torch backend")
    return _triton_backend()
