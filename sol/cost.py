"""Cost model: FLOPs of one decode step for every action at a given key length, and "FLOP keep".

Definitions (used by every report):

* **step FLOPs** are multiply-accumulates (MACs) of the matrix products of one decode step on the ``compute`` path
  of :class:`sol.engine.Engine` — the fvcore convention (one "flop" per MAC); elementwise work (norms, RoPE, softmax,
  top-k) is not counted. They include the QUEST page scoring (q against per-page key max/min) and every gathered key
  slot, padding included.
* **bit-weighted FLOPs** weight the MLP GEMMs (gate, up, down) by b/16, since with the default semantics their inputs
  are b-bit; everything else runs at 16 bits. A statically weight-quantised model (``baselines.weights``) also weights
  its decoder GEMMs by w_bits/16 (BitOPs: w_bits·a_bits/16²). (In ``faithful`` mode the reference quantises the MLP output, so no
  GEMM is actually narrower; we still charge b/16 there, so that costs stay comparable with the reference's bookkeeping.)
* **FLOP keep** = bit-weighted step FLOPs / dense step FLOPs at the same key length. This is the one budget scalar.
* **net keep** = (κ + ρ + b/16)/3, the reference's unweighted mean of the three keep ratios (reported for comparison).
* the policy's own FLOPs per step are counted separately (``policy_macs``) and added in ``total_flop_keep``.

The analytic formula (``step_macs``) is what the runtime uses; ``fvcore_step_macs`` and ``torch_step_macs`` count the
real compute-path forward with fvcore (jit trace) and ``torch.utils.flop_counter`` — tests and ``sol bench`` check
that the three agree within 1 %.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from sol.actions import Action, ActionSettings, keeps_all, n_kept_channels, token_layout
from sol.engine import Engine, KVCache




class CostModel:
    """Analytic decode-step cost of a model under the runtime's action semantics (cached per action and key length)."""

    def __init__(self, config, settings: ActionSettings, weight_bits: int = 16, head_keep: float = 1.0):
        self.settings = settings
        self.weight_bits = weight_bits  # static weight quantisation of the decoder GEMMs (baselines.weights)
        self.head_keep = head_keep      # static head pruning: fraction of query heads kept (baselines.heads)
        self.L = config.num_hidden_layers
        self.D = config.hidden_size
        self.I = config.intermediate_size
        self.V = config.vocab_size
        self.Hq = config.num_attention_heads
        self.Hkv = config.num_key_value_heads
        self.hd = getattr(config, "head_dim", None) or self.D // self.Hq
        self.model_id = getattr(config, "_name_or_path", "") or config.model_type
        self._config = config
        self._cache: dict = {}

    @classmethod
    def for_engine(cls, engine: Engine) -> "CostModel":
        return cls(engine.hf.config, engine.settings, getattr(engine.hf, "sol_weight_bits", 16),
                   getattr(engine.hf, "sol_head_keep", 1.0))

    # --- parts --------------------------------------------------------------------------------------------------
    def attention_slots(self, token_keep: float, kv_len: int) -> tuple[int, int]:
        """(keys attended per query head, pages scored per query head) for one step."""
        s = self.settings
        if keeps_all(token_keep, kv_len, s):
            return kv_len, 0
        sinks, window, n = token_layout(token_keep, kv_len, s)
        if s.criterion == "recency":
            return sinks + window + n, 0
        lo, hi = sinks, kv_len - window
        pages = (hi - 1) // s.page_size - lo // s.page_size + 1 if hi > lo else 0
        if n == 0 or pages == 0:
            return sinks + window, 0
        return sinks + window + n * s.page_size, pages

    def parts(self, action: Action, kv_len: int) -> dict[str, int]:
        """MACs of one decode step by part (summed over layers), without bit weighting."""
        key = (action, kv_len)
        if key not in self._cache:
            slots, pages = self.attention_slots(action.token_keep, kv_len)
            k = n_kept_channels(action.prune_keep, self.D) if action.prune_keep < 1.0 else self.D
            hq = round(self.Hq * self.head_keep)
            self._cache[key] = {
                "qkvo": self.L * (2 * self.D * hq * self.hd + 2 * self.D * self.Hkv * self.hd),
                "attention": self.L * 2 * hq * self.hd * slots,
                "page_scoring": self.L * 2 * hq * self.hd * pages,
                "mlp": self.L * (2 * k * self.I + self.I * self.D),
                "lm_head": self.D * self.V,
            }
        return self._cache[key]

    def step_macs(self, action: Action, kv_len: int, bit_weighted: bool = True) -> float:
        p = self.parts(action, kv_len)
        a = min(action.bits, 16) / 16 if bit_weighted else 1.0
        w = self.weight_bits / 16 if bit_weighted else 1.0
        return w * p["qkvo"] + p["attention"] + p["page_scoring"] + w * a * p["mlp"] + p["lm_head"]

    def dense_macs(self, kv_len: int) -> float:
        """MACs of the dense action of the unmodified model: the common denominator of every FLOP keep."""
        if self.weight_bits != 16 or self.head_keep != 1.0:
            return CostModel(self._config, self.settings).dense_macs(kv_len)
        p = self.parts(Action(), kv_len)
        return p["qkvo"] + p["attention"] + p["page_scoring"] + p["mlp"] + p["lm_head"]

    def flop_keep(self, action: Action, kv_len: int) -> float:
        return self.step_macs(action, kv_len) / self.dense_macs(kv_len)

    def step_bytes(self, action: Action, kv_len: int, element_size: int = 4) -> dict[str, float]:
        """Bytes one batch-1 decode step reads on the compute path, by part: the byte roofline of a memory-bound
        decode (every weight and key is read once per step; activations are negligible at batch 1).

        * ``weights``: Q/K/V/O, the kept columns of W_gate/W_up and all of W_down, the LM head, at ``element_size``
          bytes (activation bits change the GEMM inputs, not what is read; the engine's weights stay full-width);
        * ``kv``: dense attention reads each KV head's keys and values once; QUEST gathers each query head's kept
          slots, so a KV head's group of g query heads reads at most min(kv_len, g·slots) of them;
        * ``page_meta``: QUEST's per-page key max and min (float32) of every candidate page, kept incrementally by the
          cache (``KVCache.page_meta``).
        """
        slots, pages = self.attention_slots(action.token_keep, kv_len)
        k = n_kept_channels(action.prune_keep, self.D) if action.prune_keep < 1.0 else self.D
        hq = round(self.Hq * self.head_keep)
        g = max(1, hq // self.Hkv)
        read = kv_len if slots >= kv_len else min(kv_len, g * slots)
        return {
            "weights": element_size * (self.L * (2 * self.D * hq * self.hd + 2 * self.D * self.Hkv * self.hd
                                                 + 2 * k * self.I + self.I * self.D) + self.D * self.V),
            "kv": element_size * self.L * 2 * self.Hkv * self.hd * read,
            "page_meta": 4 * self.L * 2 * self.Hkv * self.hd * pages,
        }

    def keep_table(self, grid, kv_len: int) -> torch.Tensor:
        """FLOP keep of every grid action at one key length, as a tensor (for vectorised budget tracking)."""
        return torch.tensor([self.flop_keep(a, kv_len) for a in grid.actions], dtype=torch.float64)


def policy_macs(policy: nn.Module) -> int:
    """MACs of one policy step ≈ its matmul parameters (embeddings excluded) + attention over its own short cache."""
    n = 0
    for m in policy.modules():
        if isinstance(m, nn.Linear):
            n += m.in_features * m.out_features
    return n


# ------------------------------------------------------------------------------------------------------------------
# Counting the real compute-path forward
# ------------------------------------------------------------------------------------------------------------------

class _CountedStep(nn.Module):
    """Tensor-in/tensor-out wrapper of one compute-mode decode step (jit tracing cannot see a KVCache object)."""

    def __init__(self, engine: Engine, action: Action):
        super().__init__()
        self.engine = engine
        self.action = action

    def forward(self, ids, keys, values):
        cache = KVCache(list(keys.unbind(0)), list(values.unbind(0)), keys.shape[3] - 1)
        b = ids.shape[0]
        a = self.action
        logits, _ = self.engine.step(ids, cache, torch.full((b,), a.token_keep), torch.full((b,), a.prune_keep),
                                     torch.full((b,), a.bits))
        return logits


def _step_inputs(engine: Engine, kv_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(engine.layers), 1, engine.n_kv, kv_len, engine.head_dim)  # the last slot is the step's own position
    keys = torch.randn(shape, generator=g).to(engine.dtype)
    values = torch.randn(shape, generator=g).to(engine.dtype)
    ids = torch.randint(0, engine.hf.config.vocab_size, (1,), generator=g)
    return ids.to(engine.device), keys.to(engine.device), values.to(engine.device)


def _embedding_bag_fvcore(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    weight, indices = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(indices) * weight[1]


def _fvcore(module: nn.Module, inputs) -> int:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module.eval(), inputs)
        fca.set_op_handle("aten::embedding_bag", _embedding_bag_fvcore)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return fca.total()


def fvcore_step_macs(engine: Engine, action: Action, kv_len: int, bit_weighted: bool = True) -> float:
    """fvcore count of one compute-mode decode step. With ``bit_weighted`` the MLP part (counted by tracing one
    layer's :class:`sol.engine.MLPStep` on its own) is weighted by b/16."""
    mode = engine.mode
    engine.mode = "compute"
    try:
        total = _fvcore(_CountedStep(engine, action), _step_inputs(engine, kv_len))
        w = min(action.bits, 16) / 16 if bit_weighted else 1.0
        if w < 1.0:
            x = torch.randn(1, engine.hidden, generator=torch.Generator().manual_seed(0)).to(engine.device, engine.dtype)
            mlp = sum(_fvcore(m, (x, torch.tensor([action.prune_keep]), torch.tensor([action.bits])))
                      for m in engine.mlps)
            total -= (1 - w) * mlp
    finally:
        engine.mode = mode
    return total


def torch_step_macs(engine: Engine, action: Action, kv_len: int) -> float:
    """``torch.utils.flop_counter`` count (FLOPs/2) of one compute-mode step, without bit weighting."""
    from torch.utils.flop_counter import FlopCounterMode

    def bag(weight_shape, indices_shape, *args, out_shape=None, **kwargs):
        return 2 * math.prod(indices_shape) * weight_shape[1]

    mode = engine.mode
    engine.mode = "compute"
    try:
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._embedding_bag: bag,
                                                            torch.ops.aten._embedding_bag_forward_only: bag}) as fc:
            _CountedStep(engine, action)(*_step_inputs(engine, kv_len))
    finally:
        engine.mode = mode
    return fc.get_total_flops() / 2
