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
