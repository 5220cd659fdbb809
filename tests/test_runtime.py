"""The step runtime: dense equals HF, refresh, forced-dense steps, controllers, budgets, generation."""
import pytest
import torch

from sol.actions import Action, ActionSettings, grid_from
from sol.controllers import Dense, FixedAction
from sol.engine import Engine
from sol.runtime import Runtime


def _hf_logprobs(model, blocks, context):
    lp = model(blocks).logits.log_softmax(-1)
    return lp[:, context:-1].gather(-1, blocks[:, context + 1:, None]).squeeze(-1)


def test_dense_rollout_matches_hf_with_and_without_refresh(tiny):
    torch.manual_seed(0)
    blocks = torch.randint(0, 300, (2, 57))
    ref = _hf_logprobs(tiny, blocks, 40)
    rt = Runtime(Engine(tiny), grid_from("J-3L"))
    for episode in (None, 4, 5):
        ro = rt.rollout(blocks, Dense(rt.grid), 1.0, context=40, episode=episode)
        assert torch.allclose(ro.logprobs, ref, atol=1e-5)
        assert torch.allclose(ro.mean_flop_keep(), torch.ones(2))


def test_refresh_removes_kv_pollution(tiny_llama):
    """With refresh every 4 steps, step 4 onward sees a dense KV cache again: a rollout that is dense after
    step 4 matches the fully dense rollout from there, whereas without refresh the polluted keys still matter."""
    torch.manual_seed(1)
    blocks = torch.randint(0, 300, (1, 50))
    g = grid_from("J-2L")
    rt = Runtime(Engine(tiny_llama), g)

    class CheapThenDense(FixedAction):
        def act(self, state):
            cheap = state.kv_len - 1 - 30 < 4
            return torch.full((state.batch,), g.index(Action(0.1, 0.6, 5)) if cheap else g.dense_index)

    dense = rt.rollout(blocks, Dense(g), 1.0, context=30)
    mixed = CheapThenDense(g, Action())
    refreshed = rt.rollout(blocks, mixed, 1.0, context=30, episode=4)
    polluted = rt.rollout(blocks, mixed, 1.0, context=30)
    assert torch.allclose(refreshed.logprobs[:, 4:], dense.logprobs[:, 4:], atol=1e-5)
    assert (polluted.logprobs[:, 4:] - dense.logprobs[:, 4:]).abs().max() > 1e-4


def test_non_effective_steps_are_forced_dense(tiny_llama):
    s = ActionSettings(sinks=4, window=8)
    g = grid_from("J-2L")
    rt = Runtime(Engine(tiny_llama, s), g)
    blocks = torch.randint(0, 300, (2, 30))
    ro = rt.rollout(blocks, FixedAction(g, Action(0.1, 0.6, 5)), 0.5, context=5)
    # kv_len = context + t + 1 <= 13 is not effective: t = 0..7
    assert ro.effective.tolist() == [False] * 8 + [True] * (ro.effective.numel() - 8)
    assert (ro.actions[:, :8] == g.dense_index).all() and (ro.flop_keep[:, :8] == 1).all()
    assert (ro.actions[:, 8:] == g.index(Action(0.1, 0.6, 5))).all()
    assert (ro.mean_flop_keep() < 1).all()


def test_generate_matches_hf_greedy(tiny):
    torch.manual_seed(2)
    prompt = torch.randint(0, 300, (2, 12))
    rt = Runtime(Engine(tiny), grid_from("J-2L"))
    out, ro = rt.generate(prompt, 10, Dense(rt.grid), 1.0)
    ref = tiny.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 12:]
    assert torch.equal(out, ref)
    assert ro.logprobs.shape == (2, 10)


class _TokenActions(FixedAction):
    """A per-row action that depends only on the row's own current token (batch-independent, varies per step)."""

    def act(self, state):
        return state.token % len(self.grid)


@pytest.mark.parametrize("mode", ["simulate", "compute"])
@pytest.mark.parametrize("controller", ["token", "matched"])
def test_ragged_batch_equals_rows_alone(tiny, mode, controller):
    """Left-padded rows of different context lengths and scored lengths give what each row gives alone: log-probs,
    actions, FLOP keep at the row's own key length; with dense refresh, QUEST page selection and (matched) a
    controller that plans each episode from its remaining steps."""
    from baselines.schedules import Matched

    torch.manual_seed(3)
    g = grid_from("J-3L")
    rt = Runtime(Engine(tiny, ActionSettings(page_size=4, sinks=2, window=3), mode), g)
    ctrl = _TokenActions(g, Action()) if controller == "token" else Matched(g, dict(token_keep=0.5, bits=7))
    T, lengths, steps = 9, [40, 23, 31, 40], [9, 5, 7, 6]
    rows = [torch.randint(1, 300, (n + T + 1,)) for n in lengths]
    L = max(lengths)
    blocks = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    pad = torch.tensor([L - n for n in lengths])
    batch = rt.rollout(blocks, ctrl, 0.7, L, episode=4, pad=pad, steps=torch.tensor(steps))
    for i, (n, r, k) in enumerate(zip(lengths, rows, steps)):
        alone = rt.rollout(r[None, :n + k + 1], ctrl, 0.7, n, episode=4)
        assert torch.allclose(batch.logprobs[i, :k], alone.logprobs[0], atol=1e-5)
        assert torch.equal(batch.actions[i, :k], alone.actions[0])
        assert torch.allclose(batch.flop_keep[i, :k], alone.flop_keep[0])
        assert torch.allclose(batch.dense_macs[i, :k], alone.dense_macs[0])
    assert len(set(batch.actions.flatten().tolist())) > (5 if controller == "token" else 1)


def test_ragged_prefill_reuses_shared_prefixes(tiny_llama):
    """Contexts sharing a long prefix (a task header, few-shot exemplars) compute it once; every row still gets what
    it gets alone, and fewer tokens go through the LM."""
    torch.manual_seed(5)
    g = grid_from("J-2L")
    e = Engine(tiny_llama)
    rt = Runtime(e, g)
    shared = torch.randint(1, 300, (30,))
    rows = [torch.cat([shared, torch.randint(1, 300, (n,))]) for n in (12, 5, 20)] + [torch.randint(1, 300, (25,))]
    T = 6
    rows = [torch.cat([r, torch.randint(1, 300, (T + 1,))]) for r in rows]
    lengths = [len(r) - T - 1 for r in rows]
    L = max(lengths)
    blocks = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    seen = []
    extend = e.extend
    e.extend = lambda ids, cache, **kw: (seen.append(ids.shape[1]), extend(ids, cache, **kw))[1]
    batch = rt.rollout(blocks, Dense(g), 1.0, L, pad=torch.tensor([L - n for n in lengths]))
    e.extend = extend
    assert sum(seen) == sum(lengths) - 2 * 30  # the 30-token prefix was computed once for three contexts
    for i, (n, r) in enumerate(zip(lengths, rows)):
        alone = rt.rollout(r[None], Dense(g), 1.0, n)
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
