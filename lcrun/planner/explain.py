"""A memory plan as plain text, one line per item (no rich: it is not a dependency).

``format_plan`` is what ``lcrun plan`` and the run header show; ``MemoryPlan.to_dict()`` is the
JSON form for reports and benchmarks.
"""
from __future__ import annotations

from lcrun.planner.hardware import Hardware
from lcrun.planner.plan import MemoryPlan
from lcrun.units import format_bytes

_W = 34  # label column


def format_rate(bytes_per_s: float) -> str:
    """Link speeds in decimal GB/s, as vendors and benchmarks quote them."""
    return f"{bytes_per_s / 1e9:.1f} GB/s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _line(label: str, size: str, detail: str = "") -> str:
    return f"  {label:<{_W}} {size:>12}" + (f"   {detail}" if detail else "")


def _source(hw: Hardware, name: str) -> str:
    return hw.source(name)


def format_plan(plan: MemoryPlan) -> str:
    p, hw, m = plan, plan.hardware, plan.model
    dev = "GPU" if p.device == "cuda" else "CPU (host memory)"
    lines: list[str] = []
    title = m.name or "model"
    held = f", {m.dtype}" if m.dtype else ""
    lines.append(f"Memory plan: {title}, {p.ctx_tokens:,} tokens, attention {p.attention}{held}, "
                 f"on {hw.gpu_name or dev}")

    cap_src = _source(hw, "gpu_cap_bytes" if p.device == "cuda" else "host_cap_bytes")
    total = f" of {format_bytes(hw.gpu_total_bytes)}" if hw.gpu_total_bytes else ""
    lines.append(f"{dev}: cap {format_bytes(p.device_cap_bytes)}{total} ({cap_src})")
    for item, size in p.gpu_breakdown.items():
        detail = ""
        if item == "weights":
            detail = m.weight_format
        elif item == "workspace":
            detail = f"prefill chunk {p.prefill_chunk} ({'auto' if p.prefill_chunk_auto else 'given'})"
        elif item == "KV pages":
            detail = f"all {p.total_pages:,} pages"
        elif item == "KV page cache":
            detail = (f"{p.gpu_slots:,} slots x {format_bytes(p.page_bytes)}, direct-mapped cache of "
                      "host/NVMe pages")
        elif item in ("page abstracts", "chunk abstracts"):
            n = p.total_pages if item == "page abstracts" else None
            unit = 2 * m.head_dim * m.kv_dtype_bytes
            sets = f" x {p.abstract_sets} sets" if p.abstract_sets > 1 else ""
            detail = f"{n:,} x {unit} B{sets}" if n else f"1 per {p.chunk_pages} pages{sets.replace(' x ', ', ')}"
        lines.append(_line(item, format_bytes(size), detail))
        if item == "workspace":
            for part, part_size in p.workspace_breakdown.items():
                if part_size:
                    lines.append(_line("  " + part, format_bytes(part_size)))
    lines.append(_line("free", format_bytes(p.gpu_free_bytes)))

    if p.device == "cuda":
        lines.append(f"Host (pinned): cap {format_bytes(hw.host_cap_bytes)} ({_source(hw, 'host_cap_bytes')}; "
                     f"{format_bytes(hw.host_available_bytes)} available of {format_bytes(hw.host_total_bytes)})")
        if p.all_on_gpu and not p.host_pages:
            lines.append(_line("KV pages", format_bytes(0), "none: everything fits on the GPU"))
        else:
            lines.append(_line("KV pages", format_bytes(p.host_pages * p.page_bytes), f"{p.host_pages:,} pages"))
        if p.host_staging_pages:
            lines.append(_line("NVMe staging", format_bytes(p.host_staging_pages * p.page_bytes),
                               f"{p.host_staging_pages:,} pages"))
        if p.abstract_host_bytes:
            lines.append(_line("page abstracts", format_bytes(p.abstract_host_bytes)))
    if p.nvme_pages or hw.kv_dir:
        free = format_bytes(hw.kv_dir_free_bytes) if hw.kv_dir_free_bytes is not None else "?"
        lines.append(f"NVMe: {hw.kv_dir or '(no --kv-dir)'} ({free} free)")
        lines.append(_line("KV pages", format_bytes(p.nvme_bytes), f"{p.nvme_pages:,} pages"))

    lines.append("KV cache")
    if m.local_kv_bytes:
        lines.append(_line("KV per token", format_bytes(p.kv_bytes_per_token),
                           f"the {m.context_layers} global layers of {m.num_layers}"))
        lines.append(_line("local-layer windows", format_bytes(m.local_kv_bytes),
                           f"{m.num_layers - m.context_layers} sliding-window layers, a ring each, on the device"))
    else:
        lines.append(_line("KV per token", format_bytes(p.kv_bytes_per_token)))
    lines.append(_line("KV total", format_bytes(p.kv_total_bytes), f"{p.total_pages:,} pages"))
    lines.append(_line("page size", f"{p.page_size} tokens",
                       f"{'auto: ' if p.page_size_auto else ''}{p.page_size_reason}"))
    lines.append(_line("bytes per page (K+V)", format_bytes(p.page_bytes),
                       f"copies of {format_bytes(p.transfer_bytes)}"))
    if p.abstract_mode == "chunk":
        lines.append(_line("abstracts", "chunk", f"{p.chunk_pages} pages per chunk abstract; hierarchical"))
    elif p.abstract_mode == "page":
        lines.append(_line("abstracts", "page", f"all page abstracts on the {'GPU' if p.device == 'cuda' else 'CPU'}"))
    if p.attention == "topk":
        lines.append(_line("token budget", f"{p.budget_tokens} tokens",
                           f"{p.sink_tokens} sink + {p.window_tokens} window + top pages; "
                           f"{p.selected_pages_per_head} pages/head ({p.top_pages_per_head} scored)"))
    lines.append(_line("prefetch depth", f"{p.prefetch_depth} layer{'' if p.prefetch_depth == 1 else 's'}",
                       "nothing to fetch" if p.prefetch_depth == 0 else "layers fetched ahead"))
    if not p.all_on_gpu:
        lines.append(_line("hit rate", f"{p.effective_hit_rate:.2f}",
                           f"assumed step-to-step reuse {p.hit_rate:.2f}; "
                           f"{p.miss_pages_per_token:,.0f} page misses/token"))

    lines.append("Decode time per token (predicted, serial)")
    for t in p.decode_terms:
        if t.bytes == 0:
            continue
        lines.append(_line(f"{t.name} ({t.link})", _ms(t.seconds),
                           f"{format_bytes(t.bytes)} at {format_rate(t.bytes_per_s)}"))
    lines.append(_line("total", _ms(p.decode_s_per_token),
                       f"{p.decode_tokens_per_s:.1f} tokens/s; full overlap: {_ms(p.decode_s_overlapped)}"))
    lines.append(f"  {'bottleneck':<{_W}} {p.bottleneck}")
    lines.append("  (predicted ms/token: one decode step with the context full, each term its bytes over its "
                 "link's speed, summed as if nothing overlapped; kernel launches and compute are not counted, "
                 "so a run is slower by those and faster where transfers overlap)")

    speeds = []
    for name, label in (("gpu_mem_bytes_per_s", "HBM" if p.device == "cuda" else "DRAM"),
                        ("h2d_bytes_per_s", "host->GPU"), ("disk_read_bytes_per_s", "disk read"),
                        ("disk_write_bytes_per_s", "disk write")):
        speeds.append(f"{label} {format_rate(getattr(hw, name))} ({_source(hw, name)})")
    lines.append("Links: " + ", ".join(speeds))
    for note in p.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
