"""Selection quality of `python -m perf.attention`: how much of the attention the selected pages hold,
and how close the hierarchical variants come to flat selection (recall, attention mass, output
error against dense attention)."""
from __future__ import annotations

import math

import torch

from perf.attention.layer import Layer, attend, folded_plan, hier_select, page_mask, plan, rel_err


class DenseProbs:
    """Softmax of the decode query over every token (fp32), for attention mass and output error."""

    def __init__(self, layer: Layer, args):
        k, v = layer.dense_kv()
        g = args.hq // args.hkv
        qg = layer.q.float().view(args.hkv, g, -1)
        self.probs = torch.softmax((qg @ k.float().transpose(1, 2)) / math.sqrt(args.head_dim), dim=-1)
        self.out = (self.probs @ v.float()).reshape(args.hq, -1)

    def mass(self, layer: Layer, mask: torch.Tensor) -> float:
        tokens = mask.repeat_interleave(layer.P, dim=1)[:, : layer.context]
        return (self.probs * tokens[:, None, :]).sum(-1).mean().item()


def quality(layer: Layer, args, flat_sel, variants, dense: DenseProbs) -> dict:
    """Per hierarchical variant: recall of the flat top pages (fraction of flat's top pages, sinks and
    window excluded, also picked), hot-page recall, attention mass captured, output error vs dense."""
    bounds = plan(layer, args).bounds
    cand = torch.zeros(layer.max_pages, dtype=torch.bool, device=bounds.device)
    cand[int(bounds[1]):int(bounds[2])] = True
    flat_mask = page_mask(layer, *flat_sel)
    flat_top = flat_mask & cand

    def describe(sel):
        mask = page_mask(layer, *sel)
        d = {"recall_vs_flat": ((mask & flat_top).sum() / flat_top.sum().clamp(min=1)).item(),
             "attention_mass": dense.mass(layer, mask),
             "out_rel_err_vs_dense": rel_err(attend(layer, args, *sel), dense.out)}
        if layer.hot_pages is not None:
            d["hot_recall"] = mask.gather(1, layer.hot_pages).float().mean().item()
        return d

    res = {"flat": describe(flat_sel)}
    for cp, tc in variants:
        res[f"hier/{cp}x{tc}"] = describe(hier_select(layer, args, folded_plan(layer, args), cp, tc))
    return res
