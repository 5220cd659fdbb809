"""Cost model: analytic FLOPs agree with fvcore and torch.utils.flop_counter on the compute path."""
import pytest

from sol.actions import Action, ActionSettings
from sol.cost import CostModel, fvcore_step_macs, torch_step_macs
from sol.engine import Engine

ACTIONS = [Action(), Action(0.3, 1, 16), Action(1, 0.5, 16), Action(1, 1, 6), Action(0.5, 0.5, 8), Action(0.1, 0.45, 5)]


@pytest.mark.parametrize("settings", [ActionSettings(), ActionSettings(faithful=True), ActionSettings(criterion="recency")])
@pytest.mark.parametrize("kv_len", [40, 201])
def test_three_counters_agree(tiny_llama, settings, kv_len):
    engine = Engine(tiny_llama, settings, mode="compute")
    cost = CostModel.for_engine(engine)
    for a in ACTIONS:
        analytic = cost.step_macs(a, kv_len)
        assert fvcore_step_macs(engine, a, kv_len) == pytest.approx(analytic, rel=0.01)
        assert torch_step_macs(engine, a, kv_len) == pytest.approx(cost.step_macs(a, kv_len, bit_weighted=False), rel=0.01)


def test_flop_keep_properties(tiny_llama):
    cost = CostModel(tiny_llama.config, ActionSettings())
    assert cost.flop_keep(Action(), 300) == 1.0
    assert cost.flop_keep(Action(bits=8), 300) < cost.flop_keep(Action(bits=12), 300) < 1.0
    assert cost.flop_keep(Action(prune_keep=0.5), 300) < cost.flop_keep(Action(prune_keep=0.75), 300) < 1.0
    # token sparsity saves more at long context
    assert cost.flop_keep(Action(token_keep=0.25), 1000) < cost.flop_keep(Action(token_keep=0.25), 100)
    assert Action(0.5, 0.5, 8).net_keep == pytest.approx(0.5)


def test_step_bytes_are_the_tensors_a_step_reads(tiny_llama):
    """The byte roofline: a dense step reads every decoder projection and the LM head once, and each KV head's keys
    and values; pruning drops kept-out columns of W_gate/W_up; QUEST reads page metadata and at most g·slots keys per
    KV head; activation bits read the same bytes."""
    import torch

    cfg = tiny_llama.config
    cost = CostModel(cfg, ActionSettings())
    el = 4
    linears = [m for n, m in tiny_llama.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    weights = el * (sum(m.weight.numel() for m in linears) + tiny_llama.lm_head.weight.numel())
    hd = cfg.hidden_size // cfg.num_attention_heads
    dense = cost.step_bytes(Action(), 300, el)
    assert dense["weights"] == weights and dense["page_meta"] == 0
    assert dense["kv"] == el * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * 300
    assert cost.step_bytes(Action(bits=5), 300, el) == dense
    pruned = cost.step_bytes(Action(prune_keep=0.5), 300, el)
    assert dense["weights"] - pruned["weights"] == el * cfg.num_hidden_layers * 2 * (cfg.hidden_size // 2) * \
        cfg.intermediate_size
    sparse = cost.step_bytes(Action(token_keep=0.1), 1000, el)
    slots, pages = cost.attention_slots(0.1, 1000)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    assert sparse["page_meta"] > 0 and sparse["kv"] == el * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd \
        * min(1000, g * slots) < cost.step_bytes(Action(), 1000, el)["kv"]
