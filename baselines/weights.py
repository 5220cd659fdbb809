"""Static weight-only quantisation: the "quantise the whole model to 4-bit" baseline.

Group-wise symmetric round-to-nearest: each row of every decoder linear weight (q, k, v, o, gate, up, down) is split
into groups of ``group_size`` input columns; per group s = absmax / (2^(b−1) − 1) and w' = clamp(round(w/s)) · s.
Embeddings and the lm_head stay at full precision (the common practice). The transform is applied once to a copy of
the frozen model; its cost is charged by :class:`sol.cost.CostModel` with ``weight_bits`` (BitOPs-style weighting of
the quantised GEMMs by w_bits·a_bits/16², which for 16-bit activations is w_bits/16).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sol.errors import SolError


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Group-wise symmetric RTN of a 2-D weight [out, in] (dequantised back to its dtype)."""
    if not 2 <= bits <= 8:
        raise SolError(f"weight bits must be in [2, 8], got {bits}")
    out_f, in_f = weight.shape
    g = group_size if group_size > 0 else in_f
    if in_f % g:
        raise SolError(f"group_size {g} does not divide the input width {in_f}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float().reshape(out_f, in_f // g, g)
    scale = w.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(w / scale).clamp(-qmax - 1, qmax)
    return (q * scale).reshape(out_f, in_f).to(weight.dtype)


def quantize_weights(model: nn.Module, bits: int = 4, group_size: int = 128) -> nn.Module:
    """A copy of ``model`` whose decoder linear weights are RTN-quantised (``model`` itself is untouched)."""
    qmodel = copy.deepcopy(model)
    with torch.no_grad():
        for layer in qmodel.model.layers:
            for lin in layer.modules():
                if isinstance(lin, nn.Linear):
                    lin.weight.copy_(quantize_rtn(lin.weight, bits, group_size))
    qmodel.sol_weight_bits = bits
    return qmodel
