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
    """The reference path: chunks of ``batch`` blocks, each prefilled and refreshed by its own rollout, step by
    step."""
    ctrl = make()
    if hasattr(ctrl, "prepare"):
        ctrl.prepare(rt, blocks, budget, CONTEXT, episode)
    parts = [rt.rollout(blocks[i:i + batch], ctrl, budget, CONTEXT, episode=episode, stepwise=True,
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
    assert torch.equal(k0, k1)
    diff = (lp0 - lp1).abs()
    if not make().open_loop:
        assert diff.max() <= 1e-5, (kind, diff.max())
    else:  # one causal call per episode (other GEMM shapes): a fake-quantised value that sits on a rounding boundary
        # in fp32 may round the other way (it does between two sequential batchings too); fp64 is exact, below
        assert (diff > 1e-5).sum() <= 2 and diff.max() <= 1e-3, (kind, diff.max())


OPEN_LOOP = [k for k in CONTROLLERS if k in ("dense", "uniform", "matched", "random")]


@pytest.mark.parametrize("kind", OPEN_LOOP)
@pytest.mark.parametrize("episode", [None, 4, 5])
def test_open_loop_episodes_are_exact_in_fp64(tiny, blocks, kind, episode):
    """An open-loop controller's episode as one causal multi-token call computes what its T single steps compute:
    in fp64, where no fake-quantised value lands on an fp32 rounding boundary, the NLLs agree to 1e-9."""
    assert CONTROLLERS[kind](grid_from("J-3L"), 8).open_loop
    model = tiny.to(torch.float64)
    try:
        grid = grid_from("J-3L")
        rt = Runtime(Engine(model, ActionSettings(page_size=4, sinks=2, window=4)), grid)
        make = lambda: CONTROLLERS[kind](grid, model.config.hidden_size)  # noqa: E731
        lp0, a0, k0 = _sequential(rt, blocks, make, 0.6, episode, batch=2)
        lp1, a1, k1 = _shared(rt, blocks, make, 0.6, episode, max_rows=3)
        assert torch.equal(a0, a1) and torch.equal(k0, k1)
        assert (lp0 - lp1).abs().max() <= 1e-9, (lp0 - lp1).abs().max()
    finally:
        tiny.to(torch.float32)


def test_multi_token_step_is_the_same_as_single_steps(tiny_llama):
    """Engine.step with ids [B, T]: per-(row, step) actions, ragged rows (pad), QUEST; fp64, both modes."""
    model = tiny_llama.to(torch.float64)
    try:
        g = torch.Generator().manual_seed(1)
        B, C, T = 3, 20, 6
        ids = torch.randint(0, 300, (B, C + T), generator=g)
        pad = torch.tensor([0, 3, 5])
        tk = torch.tensor([0.3, 0.6, 1.0])[torch.randint(0, 3, (B, T), generator=g)]
        pk = torch.tensor([0.4, 0.8, 1.0])[torch.randint(0, 3, (B, T), generator=g)]
        bits = torch.tensor([5, 8, 16])[torch.randint(0, 3, (B, T), generator=g)]
        for mode in ("simulate", "compute"):
            e = Engine(model, ActionSettings(page_size=4, sinks=2, window=3), mode)
            caches = []
            for _ in range(2):
                c = e.new_cache(B, C + T)
                c.pad, c.length = pad, pad.max().item()
                for t in c.k + c.v:
                    t.zero_()
                e.extend(ids[:, pad.max():C], c)  # padding slots: zeros that no query attends to
                caches.append(c)
            one = [e.step(ids[:, C + j], caches[0], tk[:, j], pk[:, j], bits[:, j]) for j in range(T)]
            logits, hidden = e.step(ids[:, C:], caches[1], tk, pk, bits)
            assert logits.shape[:2] == (B, T) and caches[0].length == caches[1].length
            assert torch.allclose(torch.stack([o[0] for o in one], 1), logits, atol=1e-9), mode
            assert torch.allclose(torch.stack([o[1] for o in one], 1), hidden, atol=1e-9), mode
    finally:
        tiny_llama.to(torch.float32)


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


def _prefix_job(cache, log, go):
    """A job of its own (another process) that needs the dense prefix of the shared test blocks."""
    import os
    import time

    os.environ["SOL_CACHE"] = cache
    from sol.models import load

    real = prefix.compute

    def counted(*a, **k):
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)  # long enough that the other job asks while this one computes
        return real(*a, **k)

    prefix.compute = counted
    torch.manual_seed(0)
    b = torch.randint(0, 300, (3, CONTEXT + 9))
    go.wait()
    pre = prefix.dense_prefix(Engine(load("tiny-llama")[0]), b, CONTEXT, 4)
    with open(log, "a") as f:
        f.write(f"hidden {float(pre.hidden.sum()):.6f}\n")


def test_jobs_side_by_side_compute_a_prefix_once(tmp_path):
    """Two processes needing the same prefix at the same time: one computes it (holding a file lock), the other
    waits and reads it from disk; both get the same prefix."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go = ctx.Event()
    log = tmp_path / "log.txt"
    jobs = [ctx.Process(target=_prefix_job, args=(str(tmp_path), str(log), go)) for _ in range(2)]
    for j in jobs:
        j.start()
    go.set()
    for j in jobs:
        j.join(120)
    assert all(j.exitcode == 0 for j in jobs)
    lines = log.read_text().splitlines()
    assert lines.count("computed") == 1
    assert len({x for x in lines if x.startswith("hidden")}) == 1 and len(lines) == 3


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


@pytest.mark.parametrize("kind", OPEN_LOOP)
def test_open_loop_rollout_matches_stepwise_on_ragged_rows(tiny_llama, kind):
    """Runtime.rollout itself takes the open-loop path (MMLU: ragged contexts with ``pad``, per-row ``steps``, dense
    refresh inside): records, hidden states seen and full distributions match the step-by-step run (fp64)."""
    model = tiny_llama.to(torch.float64)
    try:
        grid = grid_from("J-3L")
        rt = Runtime(Engine(model, ActionSettings(page_size=4, sinks=2, window=4)), grid)
        g = torch.Generator().manual_seed(5)
        B, C, T = 4, 20, 9
        blocks = torch.randint(0, 300, (B, C + T + 1), generator=g)
        pad, steps = torch.tensor([0, 2, 5, 1]), torch.tensor([9, 7, 4, 2])  # non-increasing: finished rows skipped
        out = []
        for stepwise in (True, False):
            ctrl = CONTROLLERS[kind](grid, model.config.hidden_size)
            out.append(rt.rollout(blocks, ctrl, 0.6, C, episode=4, pad=pad, steps=steps, record_hidden=True,
                                  keep_distributions=True, stepwise=stepwise))
        a, b = out
        valid = torch.arange(T)[None] < steps[:, None]
        assert torch.equal(a.actions, b.actions) and torch.equal(a.flop_keep, b.flop_keep)
        assert (a.logprobs - b.logprobs)[valid].abs().max() <= 1e-9
        assert (a.hidden - b.hidden)[valid].abs().max() <= 1e-6  # recorded in fp32
        assert (a.extras["log_distributions"] - b.extras["log_distributions"])[valid].abs().max() <= 1e-6
        assert torch.equal(a.extras["greedy"][valid], b.extras["greedy"][valid])
    finally:
        tiny_llama.to(torch.float32)


@pytest.mark.parametrize("budget", [0.05, 1.0])
def test_tracked_policy_takes_the_grid_end_outright(tiny_llama, blocks, budget):
    """A budget below the grid's floor realises the floor (the cheapest action at every effective step), a budget of
    1 the costliest action, whatever the policy's logits."""
    grid = grid_from("J-3L")
    rt = Runtime(Engine(tiny_llama, ActionSettings(page_size=4, sinks=2, window=4)), grid)
    ctrl = _policy(grid, tiny_llama.config.hidden_size, track=True)
    ctrl.bias = torch.linspace(-50, 50, len(grid)) * (1 if budget < 0.5 else -1)  # logits that pull the other way
    ro = rt.rollout(blocks, ctrl, budget, CONTEXT, episode=4)
    tables = torch.stack([rt.keep_table(CONTEXT + t + 1) for t in range(STEPS)])     # [T, A]
    end = (tables.min(1) if budget < 0.5 else tables.max(1)).values
    eff = ro.effective
    assert torch.allclose(ro.flop_keep[:, eff], end[eff].expand(len(blocks), -1))
