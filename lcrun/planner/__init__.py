"""The memory planner: plain Python (no torch), the bottom layer of lcrun.

Given a model's shape, a context length and the machine, it decides the page size, where weights,
workspace, page abstracts and every KV page live (GPU, pinned host, NVMe), the prefill chunk and
prefetch depth, and predicts the decode time per token with its bottleneck.
"""
from lcrun.planner.choose import ATTENTIONS, AttentionChoice, choose_attention
from lcrun.planner.explain import format_plan, format_rate
from lcrun.planner.hardware import Calibration, Hardware, calibration_path, detect_hardware
from lcrun.planner.plan import (DecodeTerm, MemoryPlan, abstract_sets, choose_page_size, make_plan,
                                workspace_breakdown)
from lcrun.planner.spec import ModelSpec

__all__ = ["ATTENTIONS", "AttentionChoice", "Calibration", "DecodeTerm", "Hardware", "MemoryPlan", "ModelSpec",
           "abstract_sets", "calibration_path", "choose_attention", "choose_page_size", "detect_hardware",
           "format_plan", "format_rate", "make_plan", "workspace_breakdown"]
