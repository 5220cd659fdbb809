"""Fixed attention-head pruning: the same heads are removed for every token.

Importance of query head h in layer l = mean over calibration tokens of ‖W_o[:, h] · attn_h‖₂, its contribution to
the residual stream, computed once on a calibration split (the validation split, never the evaluation split). Each
layer keeps its ⌈keep·H⌉ most important heads. The transform returns a copy of the model whose q_proj rows and o_proj
columns of the removed heads are physically deleted, so their FLOPs are really gone on every path (prefill included);
``model.sol_kv_map[l]`` tells the engine which KV head each kept query head reads, and the cost model charges the
kept heads only.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sol.errors import SolError


@torch.no_grad()
def head_importance(model, blocks: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """[layers, heads] mean L2 norm of each head's output contribution over the calibration tokens."""
    cfg = model.config
    H = cfg.num_attention_heads
    layers = model.model.layers
    hd = layers[0].self_attn.head_dim
    score = torch.zeros(len(layers), H, dtype=torch.float64)
    count = 0
    hooks = []

    def hook(i):
        def fn(module, args):
            x = args[0]  # [B, T, H·hd] input of o_proj
            w = module.weight.view(module.out_features, H, hd)
            contrib = torch.einsum("bthd,ohd->btho", x.view(*x.shape[:2], H, hd).float(), w.float())
            score[i] += contrib.norm(dim=-1).sum((0, 1)).double()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(i)))
    try:
        for s in range(0, len(blocks), batch):
            chunk = blocks[s:s + batch]
            model(chunk, use_cache=False)
            count += chunk.numel()
    finally:
        for h in hooks:
            h.remove()
    return score / max(count, 1)


def prune_heads(model, importance: torch.Tensor, keep: float) -> nn.Module:
    """A copy of ``model`` keeping the ⌈keep·H⌉ most important query heads of every layer."""
    if not 0 < keep <= 1:
        raise SolError(f"head keep fraction {keep} out of range (0, 1]")
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    n_keep = max(1, math.ceil(keep * H - 1e-9))
    pruned = copy.deepcopy(model)
    kv_map = []
    for i, layer in enumerate(pruned.model.layers):
        a = layer.self_attn
        hd = a.head_dim
        heads = importance[i].topk(n_keep).indices.sort().values
        rows = (heads.view(-1, 1) * hd + torch.arange(hd)).flatten()
        q = nn.Linear(a.q_proj.in_features, len(rows), bias=a.q_proj.bias is not None, dtype=a.q_proj.weight.dtype)
        q.weight.data = a.q_proj.weight.data[rows].clone()
        if a.q_proj.bias is not None:
            q.bias.data = a.q_proj.bias.data[rows].clone()
        o = nn.Linear(len(rows), a.o_proj.out_features, bias=a.o_proj.bias is not None, dtype=a.o_proj.weight.dtype)
        o.weight.data = a.o_proj.weight.data[:, rows].clone()
        if a.o_proj.bias is not None:
            o.bias.data = a.o_proj.bias.data.clone()
        a.q_proj, a.o_proj = q.requires_grad_(False), o.requires_grad_(False)
        kv_map.append(heads // (H // Hkv))
    pruned.sol_kv_map = kv_map
    pruned.sol_head_keep = n_keep / H
    return pruned
