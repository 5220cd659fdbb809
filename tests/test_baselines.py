"""Schedule baselines: budgets are met within one grid step, random schedules are seeded permutations."""
import pytest
import torch

from baselines.schedules import (AXES, DriftController, EntropyController, Matched, RandomPermutation,
                                 uniform_action)
from sol.actions import Action, grid_from
from sol.engine import Engine
from sol.errors import SolError
from sol.runtime import Runtime

TARGETS = {"token_keep": 0.45, "prune_keep": 0.7, "bits": 9}


@pytest.fixture(scope="module")
def runtime(tiny_llama):
    return Runtime(Engine(tiny_llama), grid_from("J-3L"))


def _usage(rt, ro):
    a = ro.actions[:, ro.effective]
    g = rt.grid
    return {"token_keep": rt._tk[a].double().mean(1), "prune_keep": rt._pk[a].double().mean(1),
            "bits": rt._bits[a].double().mean(1) / 16}


@pytest.mark.parametrize("make", [lambda g: Matched(g, TARGETS), lambda g: RandomPermutation(g, TARGETS, seed=3),
                                  lambda g: EntropyController(g, TARGETS), lambda g: DriftController(g, TARGETS)])
@pytest.mark.parametrize("episode", [None, 8])
def test_realised_budget_within_one_grid_step(runtime, make, episode):
    torch.manual_seed(0)
    blocks = torch.randint(0, 300, (4, 73))
    ctrl = make(runtime.grid)
    ro = runtime.rollout(blocks, ctrl, 0.5, context=40, episode=episode)
    used = _usage(runtime, ro)
    for axis in AXES:
        levels = ctrl.levels[axis]
        step = max(b - a for a, b in zip(levels, levels[1:]))
        n = ro.effective.sum().item() if episode is None else episode
        assert (used[axis] - ctrl.targets[axis]).abs().max() <= step / n + 1e-9, axis


def test_random_is_a_seeded_permutation_of_the_matched_multiset(runtime):
    torch.manual_seed(1)
    blocks = torch.randint(0, 300, (3, 57))
    matched = runtime.rollout(blocks, Matched(runtime.grid, TARGETS), 0.5, context=40)
    r1 = runtime.rollout(blocks, RandomPermutation(runtime.grid, TARGETS, seed=7), 0.5, context=40)
    r2 = runtime.rollout(blocks, RandomPermutation(runtime.grid, TARGETS, seed=7), 0.5, context=40)
    r3 = runtime.rollout(blocks, RandomPermutation(runtime.grid, TARGETS, seed=8), 0.5, context=40)
    assert torch.equal(r1.actions, r2.actions) and torch.equal(r1.logprobs, r2.logprobs)
    assert not torch.equal(r1.actions, r3.actions)
    for axis, table in (("token_keep", runtime._tk), ("prune_keep", runtime._pk), ("bits", runtime._bits)):
        for row in range(3):
            seq1, seq3 = table[r1.actions[row]], table[r3.actions[row]]
            assert sorted(seq1.tolist()) == sorted(seq3.tolist()), axis  # same multiset, other order
            hi = table[matched.actions[row]].max()
            assert abs(int((seq1 == hi).sum()) - int((table[matched.actions[row]] == hi).sum())) <= 1, axis


def test_targets_outside_the_grid_fail_clearly():
    g = grid_from("J-3L")
    with pytest.raises(SolError, match="outside the grid's range"):
        Matched(g, {"token_keep": 0.05})
    with pytest.raises(SolError, match="unknown target axis"):
        Matched(g, {"keep": 0.5})


def test_uniform_action_is_on_the_grid():
    g = grid_from("J-3L")
    assert uniform_action(g, {"token_keep": 0.6, "prune_keep": 0.8, "bits": 7}) == Action(0.6, 0.8, 7)


def test_int4_rtn_hand_computed():
    from baselines.weights import quantize_rtn

    w = torch.tensor([[0.66, -1.4, 0.35, 0.13, 2.0, 0.0, -0.5, 0.9]])
    # group 1: absmax 1.4, s = 0.2: [3.3, -7, 1.75, 0.65] → [3, -7, 2, 1] → [0.6, -1.4, 0.4, 0.2]
    # group 2: absmax 2.0, s = 2/7: [7, 0, -1.75, 3.15] → [7, 0, -2, 3] → [2, 0, -2s, 3s]
    s2 = 2.0 / 7
    expected = torch.tensor([[0.6, -1.4, 0.4, 0.2, 2.0, 0.0, -2 * s2, 3 * s2]])
    assert torch.allclose(quantize_rtn(w, bits=4, group_size=4), expected, atol=1e-6)


def test_int4_model_copy_and_cost(tiny_llama):
    from baselines.weights import quantize_weights
    from sol.cost import CostModel

    q = quantize_weights(tiny_llama, bits=4, group_size=32)
    w0 = tiny_llama.model.layers[0].mlp.up_proj.weight
    w1 = q.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w0, w1) and (w1.reshape(w1.shape[0], -1, 32).unique(dim=-1).shape[-1] <= 32)
    assert torch.equal(q.lm_head.weight, tiny_llama.lm_head.weight)
    rt = Runtime(Engine(q), grid_from("J-2L"))
    keep = rt.cost.flop_keep(Action(), 200)
    cm = CostModel(tiny_llama.config, rt.engine.settings)
    p = cm.parts(Action(), 200)
    assert keep == pytest.approx((0.25 * (p["qkvo"] + p["mlp"]) + p["attention"] + p["lm_head"]) / cm.dense_macs(200))


def test_head_pruning_removes_flops_in_compute_mode(tiny):
    from baselines.heads import head_importance, prune_heads
    from sol.cost import CostModel, fvcore_step_macs

    torch.manual_seed(4)
    calib = torch.randint(0, 300, (4, 40))
    imp = head_importance(tiny, calib)
    assert imp.shape == (2, 4) and (imp > 0).all()
    pruned = prune_heads(tiny, imp, 0.5)
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 2 * 16
    eng = Engine(pruned, mode="compute")
    full = Engine(tiny, mode="compute")
    a = Action()
    macs, macs_full = fvcore_step_macs(eng, a, 100), fvcore_step_macs(full, a, 100)
    cm = CostModel.for_engine(eng)
    assert macs == pytest.approx(cm.step_macs(a, 100), rel=0.01)
    # removed: half of q_proj, o_proj and attention, per layer
    hd, D, L = 16, 64, 2
    assert macs_full - macs == pytest.approx(L * (2 * D * 2 * hd + 2 * 2 * hd * 100), rel=1e-6)
    assert cm.flop_keep(a, 100) == pytest.approx(macs / macs_full)
    # simulate and compute paths agree on the pruned model, and pruning really changes the outputs
    ids = torch.randint(0, 300, (2, 50))
    outs = []
    for mode in ("simulate", "compute"):
        e = Engine(pruned, mode=mode)
        c = e.new_cache(2)
        e.extend(ids[:, :30], c)
        outs.append(torch.stack([e.step(ids[:, t], c, torch.tensor([0.4, 1.0]), torch.tensor([0.6, 1.0]),
                                        torch.tensor([8, 16]))[0] for t in range(30, 50)]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    def prefill(m):  # the pruned copy runs only through our engine (HF's attention assumes all heads)
        e = Engine(m)
        return e.extend(ids, e.new_cache(2))[0]

    assert not torch.allclose(prefill(pruned), tiny(ids).logits, atol=1e-3)
    assert torch.allclose(prefill(prune_heads(tiny, imp, 1.0)), tiny(ids).logits, atol=1e-5)  # keep all = identity


@pytest.mark.parametrize("goal", [0.6, 0.72, 0.85, 0.95])
@pytest.mark.parametrize("episode", [8, 16])
def test_flop_matched_targets_realise_the_goal_keep(runtime, goal, episode):
    """Matched compute at total keep: matched, EMC, DAC and random realise the goal FLOP keep within one step's
    resolution, on the decoded blocks (not only in the schedule simulation)."""
    from baselines.schedules import flop_matched_targets, schedule_keep
    from tests.test_train import one_step_resolution

    context, steps = 40, 32
    tables = [runtime.cost.keep_table(runtime.grid, context + t + 1) for t in range(steps)]
    targets = flop_matched_targets(runtime.grid, TARGETS, goal, tables, episode)
    res = one_step_resolution(runtime.grid, context, steps, episode)
    assert abs(schedule_keep(Matched(runtime.grid, targets), tables, episode) - goal) <= res
    blocks = torch.randint(0, 300, (3, context + steps + 1), generator=torch.Generator().manual_seed(2))
    random = flop_matched_targets(runtime.grid, TARGETS, goal, tables, episode, rows=len(blocks),
                                  make=lambda t: RandomPermutation(runtime.grid, t, seed=1))
    for ctrl in (Matched(runtime.grid, targets), EntropyController(runtime.grid, targets),
                 DriftController(runtime.grid, targets), RandomPermutation(runtime.grid, random, seed=1)):
        keep = runtime.rollout(blocks, ctrl, 1.0, context=context, episode=episode).mean_flop_keep()
        if ctrl.name == "random":  # positions are random per block, so is each block's keep: their mean tracks
            keep = keep.mean()
        assert (keep - goal).abs().max().item() <= res, ctrl.name
