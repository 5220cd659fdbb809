"""The shared dense prefix (sol.prefix, Runtime.score) computes what the sequential runtime computes: the same
per-token NLLs (≤ 1e-5, fp32) and the same actions, for every controller kind, both engine modes, QUEST, with and
without refresh, whatever the batching."""
import pytest
import torch

from baselines.heads import head_importance, prune_heads
from baselines.schedules import DriftController, EntropyController, Matched, RandomPermutation
from baselines.weights import quantize_weights
from sol import prefix
from sol.actions import Action, ActionSettings, grid_from
from sol.controllers import Dense, FixedAction
from sol.engine import Engine
from sol.oracles import GreedyOracle, RankedOracle
from sol.policy import Policy, PolicyConfig, PolicyController
from sol.runtime import Runtime

TARGETS = {"token_keep": 0.6, "prune_keep": 0.7, "bits": 9}
N, CONTEXT, STEPS = 5, 24, 12


def _policy(grid, hidden, track):
    torch.manual_seed(3)
    p = Policy(PolicyConfig(d_lm=hidden, n_actions=len(grid), d_model=32, n_heads=2, n_layers=1)).eval()
    return PolicyController(p, grid, "flop", greedy=True, track_budget=track)


CONTROLLERS = {
    "dense": lambda g, h: Dense(g),
    "uniform": lambda g, h: FixedAction(g, Action(0.6, 0.4, 5)),
    "policy": lambda g, h: _policy(g, h, False),
    "policy-tracked": lambda g, h: _policy(g, h, True),
    "matched": lambda g, h: Matched(g, TARGETS),
    "random": lambda g, h: RandomPermutation(g, TARGETS, seed=4),
    "emc": lambda g, h: EntropyController(g, TARGETS),
    "dac": lambda g, h: DriftController(g, TARGETS),
    "oracle-greedy-kl": lambda g, h: GreedyOracle(g, horizon=2, candidates=[0, 5, 13, len(g) - 1]),
    "oracle-greedy-nll": lambda g, h: GreedyOracle(g, horizon=1, candidates=[0, 7, len(g) - 1], score="nll"),
    "oracle-ranked": lambda g, h: RankedOracle(g, Action(0.1, 0.4, 5), Action()),
}


def _sequential(rt, blocks, make, budget, episode, batch):
    """Today's path: chunks of ``batch`` blocks, each prefilled and refreshed by its own rollout."""
    ctrl = make()
    if hasattr(ctrl, "prepare"):
        ctrl.prepare(rt, blocks, budget, CONTEXT, episode)
    parts = [rt.rollout(blocks[i:i + batch], ctrl, budget, CONTEXT, episode=episode,
                        row_ids=torch.arange(i, min(len(blocks), i + batch))) for i in range(0, len(blocks), batch)]
    return torch.cat([p.logprobs for p in parts]), torch.cat([p.actions for p in parts]), \
        torch.cat([p.flop_keep for p in parts])


def _shared(rt, blocks, make, budget, episode, max_rows):
    ctrl = make()
    if hasattr(ctrl, "prepare"):
        ctrl.prepare(rt, blocks, budget, CONTEXT, episode, max_rows)
    ro = rt.score(blocks, ctrl, budget, CONTEXT, episode, max_rows=max_rows)
    return ro.logprobs, ro.actions, ro.flop_keep


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 300, (N, CONTEXT + STEPS + 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", list(CONTROLLERS))
@pytest.mark.parametrize("mode", ["simulate", "compute"])
@pytest.mark.parametrize("episode", [None, 4, 5])
def test_shared_prefix_equals_sequential(tiny, blocks, kind, mode, episode):
    settings = ActionSettings(page_size=4, sinks=2, window=4)  # QUEST pages selected at every effective step
    grid = grid_from("J-3L")
    rt = Runtime(Engine(tiny, settings, mode), grid)
    make = lambda: CONTROLLERS[kind](grid, tiny.config.hidden_size)  # noqa: E731
    lp0, a0, k0 = _sequential(rt, blocks, make, 0.6, episode, batch=2)
    lp1, a1, k1 = _shared(rt, blocks, make, 0.6, episode, max_rows=3)
    assert torch.equal(a0, a1), kind
    assert torch.allclose(lp0, lp1, atol=1e-5), (kind, (lp0 - lp1).abs().max())
    assert torch.equal(k0, k1)


@pytest.mark.parametrize("transform", ["weights", "heads"])
def test_shared_prefix_on_transformed_models(tiny_llama, blocks, transform):
    """Static weight quantisation and head pruning change the dense pass too: each model gets its own prefix."""
    model = (quantize_weights(tiny_llama, 4, 16) if transform == "weights"
             else prune_heads(tiny_llama, head_importance(tiny_llama, blocks[:2]), 0.5))
    grid = grid_from("J-3L")
    rt = Runtime(Engine(model), grid)
    assert prefix.fingerprint(rt.engine) != prefix.fingerprint(Engine(tiny_llama))
    # 16 bits: a fake-quantised step can flip one rounding at an exact level boundary between *any* two batchings
    # (sequential batch 2 vs 5 differ by 2e-4 here too); the prefix adds no difference of its own
    make = lambda: FixedAction(grid, Action(0.6, 0.4, 16))  # noqa: E731
    lp0, a0, _ = _sequential(rt, blocks, make, 1.0, 4, batch=2)
    lp1, a1, _ = _shared(rt, blocks, make, 1.0, 4, max_rows=4)
    assert torch.equal(a0, a1) and torch.allclose(lp0, lp1, atol=1e-5)


def test_prefix_is_cached_on_disk_and_keyed(tiny_llama, blocks, tmp_path, monkeypatch):
    monkeypatch.setenv("SOL_CACHE", str(tmp_path))
    prefix._MEMORY.clear()
    e = Engine(tiny_llama)
    a = prefix.dense_prefix(e, blocks, CONTEXT, 4)
    files = list((tmp_path / "prefix").glob("*.pt"))
    assert len(files) == 1
    prefix._MEMORY.clear()
    b = prefix.dense_prefix(e, blocks, CONTEXT, 4)  # from disk
    assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v)) and torch.equal(a.hidden, b.hidden)
    prefix.dense_prefix(e, blocks, CONTEXT, 6)     # another episode length: another entry
    prefix.dense_prefix(e, blocks[:3], CONTEXT, 4)  # other blocks: another entry
    assert len(list((tmp_path / "prefix").glob("*.pt"))) == 3
    files[0].write_bytes(b"damaged")               # a damaged file is recomputed, never trusted
    prefix._MEMORY.clear()
    c = prefix.dense_prefix(e, blocks, CONTEXT, 4)
    assert torch.equal(a.hidden, c.hidden)


def test_forced_dense_first_steps_fall_back_to_sequential(tiny_llama, blocks):
    """context ≤ sinks + window + 1: which steps are effective depends on the episode start, so score() runs the
    blocks sequentially and still returns the sequential numbers."""
    settings = ActionSettings(sinks=8, window=20)
    grid = grid_from("J-3L")
    rt = Runtime(Engine(tiny_llama, settings), grid)
    make = lambda: Matched(grid, TARGETS)  # noqa: E731
    lp0, a0, _ = _sequential(rt, blocks, make, 0.6, 4, batch=2)
    lp1, a1, _ = _shared(rt, blocks, make, 0.6, 4, max_rows=8)
    assert torch.equal(a0, a1) and torch.allclose(lp0, lp1, atol=1e-5)


@pytest.mark.parametrize("mode", ["simulate", "compute"])
def test_context_memo_serves_later_controllers_bitwise(tiny, mode):
    """Ragged MMLU-style rows: a context prefilled by one controller is copied for the next, and every controller
    gets exactly what it gets with an empty memo."""
    g = torch.Generator().manual_seed(5)
    lengths, L, T = [9, 14, 6, 14], 14, 5
    rows = [torch.randint(0, 300, (n + T + 1,), generator=g) for n in lengths]
    rows[3][:14] = rows[1][:14]  # a context shared by two rows
    blocks = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    pad = torch.tensor([L - n for n in lengths])
    steps = torch.tensor([5, 4, 3, 2])
    grid = grid_from("J-3L")
    rt = Runtime(Engine(tiny, ActionSettings(page_size=4, sinks=1, window=2), mode), grid)
    specs = [lambda: Dense(grid), lambda: Matched(grid, TARGETS), lambda: _policy(grid, tiny.config.hidden_size, True)]
    alone = []
    for make in specs:
        prefix.CONTEXTS.clear()
        alone.append(rt.rollout(blocks, make(), 0.6, L, episode=3, pad=pad, steps=steps))
    prefix.CONTEXTS.clear()
    for make, ref in zip(specs, alone):
        ro = rt.rollout(blocks, make(), 0.6, L, episode=3, pad=pad, steps=steps)
        assert torch.equal(ro.logprobs, ref.logprobs) and torch.equal(ro.actions, ref.actions)
    assert prefix.CONTEXTS.misses == 3 and prefix.CONTEXTS.hits == 6  # 3 distinct contexts, 2 later controllers
