"""Action primitives: QUEST page selection, channel pruning, quantisation, the grid."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sol.actions import (Action, ActionGrid, ActionSettings, fake_quant, grid_from, keeps_all, quest_mask,
                         quest_pages, select_tokens, token_layout, topk_channels)
from sol.errors import SolError


def test_quest_hand_built_example():
    """K=32 keys in 4 pages of 8, one KV head, one query head; q = e0. Page scores = Σ max(q·max, q·min) = max of
    dimension 0 within the page. Pages get maxima 1, 5, 3, 2, so κ=0.5 (16 tokens → 2 pages) picks pages 1 and 2."""
    hd, K = 4, 32
    keys = torch.zeros(1, 1, K, hd)
    for page, m in enumerate([1.0, 5.0, 3.0, 2.0]):
        keys[0, 0, page * 8 + 3, 0] = m
        keys[0, 0, page * 8 + 5, 0] = -10.0  # large negative values must not matter for a positive query
    q = torch.zeros(1, 1, hd)
    q[0, 0, 0] = 1.0
    s = ActionSettings(page_size=8, faithful=True)
    idx, valid = select_tokens(q, keys, K, 0.5, s)
    assert sorted(idx[valid].tolist()) == list(range(8, 24))
    # A negative query prefers the page with the most negative minimum: page 0..3 all have -10 → ties; use page 3.
    keys[0, 0, 29, 0] = -20.0
    idx, valid = select_tokens(-q, keys, K, 0.25, s)
    assert sorted(idx[valid].tolist()) == list(range(24, 32))


def test_quest_forces_sinks_and_window():
    s = ActionSettings(page_size=8, sinks=4, window=8)
    q, keys = torch.randn(2, 4, 16), torch.randn(2, 2, 100, 16)
    idx, valid = select_tokens(q, keys, 100, 0.3, s)
    for row in range(2):
        for head in range(4):
            kept = set(idx[row, head][valid[row, head]].tolist())
            assert set(range(4)) <= kept and set(range(92, 100)) <= kept
            assert len(kept) <= math.ceil(0.3 * 100) + 8  # page rounding over-keeps by less than a page
    sinks, window, pages = token_layout(0.3, 100, s)
    assert (sinks, window, pages) == (4, 8, 3)


def test_quest_gqa_query_heads_choose_independently():
    s = ActionSettings(page_size=4, sinks=0, window=0)
    keys = torch.randn(1, 1, 64, 8)
    q = torch.randn(1, 2, 8)
    q[0, 1] = -q[0, 0]
    idx, _ = select_tokens(q, keys, 64, 0.25, s)
    assert not torch.equal(idx[0, 0], idx[0, 1])


def test_recency_reference_example():
    """Reference §2.1a: K=20, Ts=4, Tw=2, κ=0.5 keeps {0..3, 10..19}."""
    s = ActionSettings(criterion="recency", sinks=4, window=2, faithful=True)
    idx, valid = select_tokens(torch.randn(1, 1, 4), torch.randn(1, 1, 20, 4), 20, 0.5, s)
    assert sorted(idx[0, 0].tolist()) == list(range(4)) + list(range(10, 20))


def test_keeps_all():
    s = ActionSettings()
    assert keeps_all(1.0, 50, s) and keeps_all(0.99, 20, s) and not keeps_all(0.5, 200, s)


def test_prune_keeps_ceil_rho_d():
    x = torch.randn(3, 64)
    idx = topk_channels(x, 0.8)
    assert idx.shape == (3, 52)  # ceil(0.8 * 64), reference §2.2
    assert torch.equal(x.abs().gather(1, idx).min(1).values >= x.abs().topk(52).values[:, -1], torch.ones(3, dtype=torch.bool))


def test_fake_quant_example():
    """Reference §2.3: 3 bits, [0.1, -0.5, 1.0, 0.33] → [0, -0.667, 1.0, 0.333]."""
    y = fake_quant(torch.tensor([[0.1, -0.5, 1.0, 0.33]]), torch.tensor([3]))
    assert torch.allclose(y, torch.tensor([[0.0, -2 / 3, 1.0, 1 / 3]]), atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=16),
       st.integers(min_value=2, max_value=16))
def test_fake_quant_is_finite_and_bounded(values, bits):
    x = torch.tensor([values], dtype=torch.float32)
    y = fake_quant(x, torch.tensor([bits]))
    assert torch.isfinite(y).all()
    assert (y.abs() <= x.abs().max() * (1 + 1e-6)).all()
    if bits >= 16:
        assert torch.equal(x, y)


def test_fake_quant_zero_and_huge():
    b = torch.tensor([4, 8])
    assert torch.equal(fake_quant(torch.zeros(2, 5), b), torch.zeros(2, 5))
    huge = torch.full((2, 5), torch.finfo(torch.float32).max)
    huge[:, 0] *= -1
    assert torch.isfinite(fake_quant(huge, b)).all()


def test_grid_layout_and_dense_index():
    g = grid_from("J-FL")
    assert len(g) == 1560 and g[g.dense_index] == Action(1.0, 1.0, 16)
    g2 = grid_from("J-2L")
    assert [a.tag for a in g2.actions][:2] == ["k010-s060-q5", "k010-s060-q16"]
    assert g2.index(Action(1.0, 0.6, 16)) == 1 * 4 + 0 * 2 + 1


def test_grid_errors():
    with pytest.raises(SolError, match="unknown action grid key"):
        ActionGrid.from_config({"token_keep": [1.0], "tokens": [0.5]})
    with pytest.raises(SolError, match="out of range"):
        ActionGrid(token_keep=(0.0, 1.0))
    with pytest.raises(SolError, match="unknown action grid 'J-9L'"):
        grid_from("J-9L")


@pytest.mark.parametrize("s", [ActionSettings(), ActionSettings(page_size=4, sinks=2, window=1),
                               ActionSettings(page_size=5, sinks=3, window=2), ActionSettings(faithful=True),
                               ActionSettings(page_size=3, sinks=0, window=0)])
def test_quest_mask_is_select_tokens_for_every_query(s):
    """The vectorised mask (T queries, per-query levels, running page metadata) keeps exactly the keys that
    select_tokens keeps for each query alone, partial pages and dense levels included."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, hd, pos, T = 3, 4, 2, 8, 37, 6
    q = torch.randn(B, Hq, T, hd, generator=g, dtype=torch.float64)
    q[0, :, 1] = 0  # a query of zeros: every page scores 0, ties go to the lower page in both
    keys = torch.randn(B, Hkv, pos + T, hd, generator=g, dtype=torch.float64)
    levels = torch.tensor([0.1, 0.3, 0.6, 1.0])[torch.randint(0, 4, (B, T), generator=g)]
    lv = [round(float(v), 6) for v in levels.t().reshape(-1)]
    pages = torch.tensor(quest_pages(lv, [pos + j + 1 for j in range(T) for _ in range(B)], s)).view(T, B).t()
    mask = quest_mask(q, keys, pos, pages, s)
    for done in (1, (pos + T) // s.page_size):  # complete pages' metadata kept by the cache (KVCache.page_meta)
        pk = keys[:, :, :done * s.page_size].reshape(B, Hkv, done, s.page_size, hd)
        assert torch.equal(quest_mask(q, keys, pos, pages, s, meta=(pk.amax(3), pk.amin(3))), mask), done
    for b in range(B):
        for j in range(T):
            n, level = pos + j + 1, float(levels[b, j])
            want = torch.zeros(Hq, pos + T + 1, dtype=torch.bool)
            if keeps_all(level, n, s):
                want[:, :n] = True
            else:
                idx, valid = select_tokens(q[b:b + 1, :, j], keys[b:b + 1], n, level, s)
                want.scatter_(-1, idx[0].masked_fill(~valid[0], pos + T), True)  # invalid: the spare column
            assert torch.equal(mask[b, :, j], want[:, :-1]), (b, j, level)
