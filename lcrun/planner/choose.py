"""--attention auto: dense or top-k, and the plan that goes with it.

The rule, on a GPU (a planned one included): build the plan for top-k and for dense; dense while the
whole KV cache fits beside the weights under the cap (the dense plan exists) and its predicted
decode ms/token is not slower than top-k's, else top-k. Past the model's trained window dense
attention produces noise, so auto takes top-k there. On the CPU (no GPU to plan): top-k when the
context is past the trained window or the weights and the dense KV cache would not fit the host
memory cap, else dense.

``choose_attention`` is what ``lcrun plan``, ``lcrun run/chat/bench`` and ``lcrun.LLM`` all call
(through ``lcrun.construct.plan_run``), so the plan shown is the plan run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcrun.errors import CapacityError, ConfigError
from lcrun.planner.hardware import Hardware
from lcrun.planner.plan import MemoryPlan, make_plan
from lcrun.planner.spec import ModelSpec
from lcrun.units import format_bytes, parse_tokens

ATTENTIONS = ("auto", "dense", "topk")
_NAMES = {"dense": "dense", "topk": "top-k"}


@dataclass
class AttentionChoice:
    """attention: "dense" or "topk"; reason: why, for the one-line report; plan: the plan for it
    (None on a CPU unless asked for); warning: one line to show the user, or None."""

    attention: str
    reason: str
    plan: MemoryPlan | None
    requested: str = "auto"
    warning: str | None = None

    def line(self) -> str:
        """``attention: top-k (why)``: one line, as the commands print it."""
        return f"attention: {_NAMES[self.attention]} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "attention_reason": self.reason, "attention_requested": self.requested,
                "attention_warning": self.warning}


def _ms(plan: MemoryPlan) -> str:
    return f"{plan.decode_s_per_token * 1e3:.2f} ms/token"


def past_window_warning(model: ModelSpec, ctx: int) -> str | None:
    """The warning for dense attention past the trained window, or None inside it."""
    tw = model.trained_window
    if tw is None or ctx <= tw:
        return None
    return (f"--attention dense with --ctx {ctx:,}: output past the model's trained window of {tw:,} tokens will "
            f"degrade (--attention auto or topk keeps it usable there)")


def choose_attention(model: ModelSpec, ctx_tokens: int | str, hw: Hardware, *, attention: str = "auto",
                     positions: str = "auto", cpu_plan: bool = False, **plan_kwargs: Any) -> AttentionChoice:
    """Resolve ``attention`` (auto, dense or topk) for ``ctx_tokens`` of ``model`` on ``hw`` and plan
    it. ``plan_kwargs`` go to make_plan as they are (page_size, budget_tokens, sink_tokens,
    window_tokens, prefill_chunk, hit_rate). On a GPU the plan is always built (and its errors
    raised); on the CPU only with ``cpu_plan`` (runs there place nothing through the planner)."""
    ctx = parse_tokens(ctx_tokens)
    if attention not in ATTENTIONS:
        raise ConfigError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "dense" and positions == "window":
        raise ConfigError("--positions window needs --attention topk (dense attention attends to every token, so "
                          "there is no window to place them in)")

    def plan(kind: str) -> MemoryPlan:
        return make_plan(model, ctx, hw, attention=kind, positions=positions, **plan_kwargs)

    tw = model.trained_window
    past = tw is not None and ctx > tw
    if attention != "auto":
        the_plan = plan(attention) if hw.on_gpu or cpu_plan else None
        why = f"--attention {attention}" + _predicted(the_plan)
        return AttentionChoice(attention, why, the_plan, attention,
                               past_window_warning(model, ctx) if attention == "dense" else None)

    if positions == "window":
        the_plan = plan("topk") if hw.on_gpu or cpu_plan else None
        return AttentionChoice("topk", "--positions window needs top-k" + _predicted(the_plan), the_plan)
    if past:
        the_plan = plan("topk") if hw.on_gpu or cpu_plan else None
        return AttentionChoice("topk", f"{ctx:,} tokens is past the model's trained window of {tw:,}, where dense "
                               f"attention produces noise" + _predicted(the_plan), the_plan)

    kv = model.kv_bytes(ctx)
    if not hw.on_gpu:
        need = model.weight_bytes + kv
        cap = hw.host_cap_bytes
        if need > cap:
            why = (f"on the CPU: the KV cache for {ctx:,} tokens needs {format_bytes(kv)}, which with the weights "
                   f"({format_bytes(model.weight_bytes)}) is over the host memory cap of {format_bytes(cap)}")
            kind = "topk"
        else:
            why = (f"on the CPU: the whole KV cache, {format_bytes(kv)} for {ctx:,} tokens, fits in host memory "
                   f"beside the weights ({format_bytes(model.weight_bytes)}) under the {format_bytes(cap)} cap")
            kind = "dense"
        return AttentionChoice(kind, why, plan(kind) if cpu_plan else None)

    cap = hw.device_cap_bytes
    try:
        topk_plan = plan("topk")
    except CapacityError as exc:
        try:
            dense_plan = plan("dense")
        except CapacityError:
            raise exc from None  # neither fits: top-k's shortfall is the one to show
        return AttentionChoice("dense", f"top-k does not fit ({str(exc).split(':')[0]}) but the whole KV cache, "
                               f"{format_bytes(kv)}, does; predicted {_ms(dense_plan)}", dense_plan)
    try:
        dense_plan = plan("dense")
    except CapacityError:
        return AttentionChoice("topk", f"the KV cache for {ctx:,} tokens needs {format_bytes(kv)}, more than the "
                               f"{format_bytes(cap)} cap leaves beside the weights ({format_bytes(model.weight_bytes)}) "
                               f"and workspace; predicted {_ms(topk_plan)}", topk_plan)
    d_ms, t_ms = dense_plan.decode_s_per_token * 1e3, topk_plan.decode_s_per_token * 1e3
    if dense_plan.decode_s_per_token <= topk_plan.decode_s_per_token:
        return AttentionChoice("dense", f"the whole KV cache, {format_bytes(kv)}, fits beside the weights under the "
                               f"{format_bytes(cap)} cap; predicted dense {d_ms:.2f} ms/token vs top-k {t_ms:.2f}",
                               dense_plan)
    return AttentionChoice("topk", f"the whole KV cache, {format_bytes(kv)}, fits under the {format_bytes(cap)} cap, "
                           f"but top-k is predicted faster: {t_ms:.2f} ms/token vs dense {d_ms:.2f}", topk_plan)


def _predicted(plan: MemoryPlan | None) -> str:
    return f"; predicted {_ms(plan)}" if plan is not None else ""
