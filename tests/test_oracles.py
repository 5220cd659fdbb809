"""Oracles: they meet the budget and are never worse than the uniform level they can imitate."""
import math

import numpy as np
import pytest
import torch

from sol.actions import Action, ActionGrid, ActionSettings
from sol.controllers import FixedAction
from sol.engine import Engine
from sol.evaluate import eval_ppl
from sol.oracles import GreedyOracle, RankedOracle
from sol.runtime import Runtime


@pytest.mark.parametrize("score", ["nll", "kl"])
def test_greedy_oracle_meets_budget_and_beats_uniform(tiny_llama, score):
    """Budget met within one grid step from both sides (it must spend what it may, not only stay under); with the
    NLL score it is never worse than the uniform level it can imitate, with the KL score its distortion of the dense
    distribution is never larger than the uniform level's."""
    torch.manual_seed(0)
    blocks = torch.randint(0, 300, (3, 40))
    grid = ActionGrid(prune_keep=(0.25, 0.5, 1.0), bits=(4, 16))
    rt = Runtime(Engine(tiny_llama), grid)
    uniform = Action(prune_keep=0.5)
    u = rt.rollout(blocks, FixedAction(grid, uniform), 1.0, context=24, keep_distributions=True)
    budget = float(u.mean_flop_keep().mean())
    o = rt.rollout(blocks, GreedyOracle(grid, horizon=1, score=score), budget, context=24, keep_distributions=True)
    keeps = sorted(set(rt.keep_table(30).tolist()))
    step = max(b - a for a, b in zip(keeps, keeps[1:]))
    assert (o.mean_flop_keep() - budget).abs().max() <= step
    if score == "nll":
        assert o.logprobs.sum() >= u.logprobs.sum() - 1e-6  # the oracle can always imitate the uniform level
    else:
        d = rt.rollout(blocks, FixedAction(grid, Action()), 1.0, context=24, keep_distributions=True)
        p = d.extras["log_distributions"]
        kl = lambda r: (p.exp() * (p - r.extras["log_distributions"])).sum(-1).mean()  # noqa: E731
        assert kl(o) <= kl(u) + 1e-6


def test_ranked_oracle_beats_random_placement(tiny_llama):
    torch.manual_seed(1)
    blocks = torch.randint(0, 300, (4, 56))
    specs = ["oracle-ranked:axis=bits,low=3,high=16", "random:grid=J-2L,bits=10"]
    summary, _ = eval_ppl(tiny_llama, "tiny-llama", blocks, specs[:1], [0.8], context=24, episode=32, batch=4)
    grid = ActionGrid(bits=(3, 16))
    rt = Runtime(Engine(tiny_llama), grid)
    lo = rt.rollout(blocks, FixedAction(grid, Action(bits=3)), 1.0, 24)
    hi = rt.rollout(blocks, FixedAction(grid, Action(bits=16)), 1.0, 24)
    o = RankedOracle(grid, Action(bits=3), Action(bits=16))
    budget = float((lo.mean_flop_keep().mean() + hi.mean_flop_keep().mean()) / 2)
    o.prepare(rt, blocks, budget, 24, None)
    ro = rt.rollout(blocks, o, budget, 24)
    assert abs(float(ro.mean_flop_keep().mean()) - budget) < 0.05
    # half the positions at the high level, chosen by damage, beats the expected loss of a random half
    random_mix = 0.5 * (lo.nll.mean() + hi.nll.mean())
    assert ro.nll.mean() < random_mix
    assert math.isfinite(summary.ppl.iloc[0]) and summary.method.iloc[0] == "oracle-ranked"


def test_headroom_study_schedules(tiny_llama):
    from sol.studies import headroom, where_it_hurts

    torch.manual_seed(2)
    blocks = torch.randint(0, 300, (4, 57))
    summary, diag = headroom(Engine(tiny_llama), blocks, 24, "bits", 3, 8, 5, 0.5, seeds=2, batch=4)
    ppl = dict(zip(summary.schedule, summary.ppl))
    assert set(ppl) == {"dense", "U", "E", "O", "R0", "R1"}
    assert ppl["O"] <= min(ppl["R0"], ppl["R1"])  # damage-ranked placement beats random placement in-sample
    assert summary.loc[summary.schedule == "U", "gap_closed"].item() == 0
    hurts = where_it_hurts(diag)
    assert 0 < hurts["damage_share_worst_10pct"] <= 1 and -1 <= hurts["spearman_entropy"] <= 1
    assert len(diag) == 4 * 32


def test_probing_leaves_no_trace(tiny_llama):
    """The oracle probes candidates in the live cache (then rewinds): replaying its chosen actions without probing
    gives the same log-probs, with a dense refresh in between."""
    from sol.controllers import Controller

    torch.manual_seed(4)
    blocks = torch.randint(0, 300, (2, 45))
    grid = ActionGrid(token_keep=(0.25, 1.0), prune_keep=(0.5, 1.0), bits=(5, 16))
    rt = Runtime(Engine(tiny_llama), grid)
    o = rt.rollout(blocks, GreedyOracle(grid, horizon=2), 0.8, context=24, episode=8)

    class Replay(Controller):
        def act(self, state):
            return o.actions[:, state.kv_len - 1 - 24]

    r = rt.rollout(blocks, Replay(grid), 0.8, context=24, episode=8)
    assert torch.equal(r.actions, o.actions) and len(set(o.actions.flatten().tolist())) > 1
    assert torch.allclose(r.logprobs, o.logprobs, atol=1e-6)


def test_timeline_summary_reads_the_schedule():
    import pandas as pd

    from sol.studies import timeline_summary

    ent = [0.5, 1.0, 2.0, 3.0] * 2
    adaptive = pd.DataFrame({"block": [0] * 4 + [1] * 4, "action": ["a", "b", "c", "d"] * 2,
                             "flop_keep": [0.55, 0.6, 0.8, 1.0] * 2, "dense_entropy": ent})
    s = timeline_summary(adaptive)
    assert s["distinct_actions"] == 4 and abs(s["action_entropy_nats"] - np.log(4)) < 1e-9
    assert s["spearman_keep_entropy"] == 1.0 and s["spearman_keep_entropy_block_median"] == 1.0
    constant = adaptive.assign(action="a", flop_keep=0.7)
    s = timeline_summary(constant)
    assert s["distinct_actions"] == 1 and s["action_entropy_nats"] == 0.0


@pytest.mark.parametrize("pruned", [False, True])
def test_step_alternatives_is_one_step_per_candidate(tiny, pruned):
    """Engine.step_alternatives: candidate c of row b computes what a single step with row b's action c computes
    (fp64: token keep with QUEST pages and dense levels, prune keep, bits; GQA and head-pruned models); the cache is
    not written."""
    from baselines.heads import head_importance, prune_heads

    model = tiny.to(torch.float64)
    try:
        g = torch.Generator().manual_seed(2)
        if pruned:
            model = prune_heads(model, head_importance(model, torch.randint(0, 300, (2, 30), generator=g)), 0.5)
        e = Engine(model, ActionSettings(page_size=4, sinks=2, window=4))
        B, L, C = 3, 37, 7
        ids = torch.randint(0, 300, (B, L + 1), generator=g)
        cache = e.new_cache(B, L + 1)
        e.extend(ids[:, :L], cache)
        tk = torch.tensor([0.2, 0.5, 1.0])[torch.randint(0, 3, (B, C), generator=g)]
        pk = torch.tensor([0.4, 0.8, 1.0])[torch.randint(0, 3, (B, C), generator=g)]
        bits = torch.tensor([4, 8, 16])[torch.randint(0, 3, (B, C), generator=g)]
        before = [t[:, :, :L + 1].clone() for t in cache.k]
        logits, hidden = e.step_alternatives(ids[:, L], cache, tk, pk, bits)
        assert cache.length == L and all(torch.equal(a, t[:, :, :L + 1]) for a, t in zip(before, cache.k))
        for c in range(C):
            lg, hd = e.step(ids[:, L], cache, tk[:, c], pk[:, c], bits[:, c])
            cache.length = L
            assert torch.allclose(lg, logits[:, c], atol=1e-9) and torch.allclose(hd, hidden[:, c], atol=1e-9)
    finally:
        tiny.to(torch.float32)


@pytest.mark.parametrize("score", ["kl", "nll"])
def test_greedy_oracle_batched_probes_equal_one_probe_per_candidate(tiny_llama, score, monkeypatch):
    """The oracle's candidates as the rows of one call pick the same actions and score the same NLLs as one probe per
    candidate (fp64), with refresh and ragged episode ends."""
    model = tiny_llama.to(torch.float64)
    try:
        torch.manual_seed(3)
        blocks = torch.randint(0, 300, (3, 45))
        grid = ActionGrid(token_keep=(0.25, 1.0), prune_keep=(0.5, 1.0), bits=(5, 16))
        rt = Runtime(Engine(model, ActionSettings(page_size=4, sinks=2, window=4)), grid)
        run = lambda: rt.score(blocks, GreedyOracle(grid, horizon=1, score=score), 0.6, 24, episode=8,  # noqa: E731
                               max_rows=2)
        batched = run()
        from sol.engine import Engine as E
        from sol.runtime import _Prober

        monkeypatch.setattr(E, "step_alternatives", None)  # any use of it now fails
        monkeypatch.setattr(_Prober, "batched", False)     # one probe per candidate
        looped = run()
        assert torch.equal(batched.actions, looped.actions)
        assert (batched.logprobs - looped.logprobs).abs().max() <= 1e-9
        assert len(set(batched.actions[:, batched.effective].flatten().tolist())) > 1  # it really allocates
    finally:
        tiny_llama.to(torch.float32)
