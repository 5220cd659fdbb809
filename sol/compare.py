"""Matched-compute comparison: Pareto fronts and a method's quality against another method's front at the same
FLOP keep (interpolated per block, so the comparison keeps a paired bootstrap CI)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from sol.stats import paired_diff_ci


def pareto_front(df: pd.DataFrame, x: str = "flop_keep", y: str = "ppl", lower_is_better: bool = True) -> pd.DataFrame:
    """Points not dominated by a cheaper-or-equal point that is at least as good, sorted by x."""
    d = df.sort_values([x, y], ascending=[True, lower_is_better]).reset_index(drop=True)
    best = np.inf if lower_is_better else -np.inf
    keep = []
    for i, v in enumerate(d[y]):
        if (v < best) if lower_is_better else (v > best):
            keep.append(i)
            best = v
    return d.loc[keep].reset_index(drop=True)


def bracket(front: pd.DataFrame, x_query: float, x: str = "flop_keep"):
    """(i, j, w): x_query = (1−w)·front[i] + w·front[j] along the front; None below its cheapest point. Beyond its
    last point the last point holds: a front is the best quality reachable with at most that much compute, and a
    point that no costlier level improves on (e.g. a uniform level as good as dense) is reachable at any higher keep."""
    xs = front[x].to_numpy()
    if len(xs) == 0 or x_query < xs[0] - 1e-12:
        return None
    j = int(np.searchsorted(xs, x_query))
    if j == 0:
        return 0, 0, 0.0
    if j >= len(xs):
        return len(xs) - 1, len(xs) - 1, 0.0
    i = j - 1
    w = (x_query - xs[i]) / (xs[j] - xs[i]) if xs[j] > xs[i] else 0.0
    return i, j, float(w)


def front_nll(per_block: pd.DataFrame, front: pd.DataFrame, x_query: float) -> np.ndarray | None:
    """Per-block NLL of a front interpolated (linearly in FLOP keep) at ``x_query``; None outside its range."""
    br = bracket(front, x_query)
    if br is None:
        return None
    i, j, w = br
    fi = block_nll(per_block, front.loc[i, "method"], front.loc[i, "budget"])
    fj = block_nll(per_block, front.loc[j, "method"], front.loc[j, "budget"])
    return (1 - w) * fi + w * fj


def block_nll(per_block: pd.DataFrame, method: str, budget=None) -> np.ndarray:
    """Mean NLL per block (sorted by block) of one method (at one budget, if it has budgets)."""
    d = per_block[per_block.method == method]
    if budget is not None and not (isinstance(budget, float) and np.isnan(budget)):
        d = d[np.isclose(d.budget, budget)]
    return d.sort_values("block").nll.to_numpy()


def versus_front(per_block: pd.DataFrame, method: tuple[str, float], front: pd.DataFrame, x_query: float) -> dict | None:
    """NLL of ``method`` minus the front's NLL interpolated at ``x_query`` (linear in FLOP keep), per block,
    with a paired bootstrap CI. Negative: the method beats the front at matched FLOP keep."""
    ref = front_nll(per_block, front, x_query)
    if ref is None:
        return None
    i, j, w = bracket(front, x_query)
    mean, lo, hi = paired_diff_ci(block_nll(per_block, *method), ref)
    return {"delta_nll": mean, "lo": lo, "hi": hi, "ppl_ratio": float(np.exp(mean)), "front_ppl": float(np.exp(ref.mean())),
            "between": f"{front.loc[i, 'method']} | {front.loc[j, 'method']}", "weight": w}


def headroom_captured(sol: np.ndarray, uniform: np.ndarray, oracle: np.ndarray) -> dict:
    """Share of the oracle's gain over uniform that a method captures, on per-block NLLs of the same blocks at
    matched FLOP keep: (ppl_U − ppl_SOL)/(ppl_U − ppl_oracle), with a 95 % bootstrap CI over blocks, and the
    headroom itself (NLL_U − NLL_oracle, paired CI). 1 = all of it, 0 = none, < 0 = worse than uniform."""
    from sol.stats import bootstrap_ci

    stacked = np.stack([sol, uniform, oracle], 1).astype(np.float64)

    def share(m):
        s, u, o = np.exp(m.mean(0))
        return (u - s) / (u - o) if abs(u - o) > 1e-12 else np.nan

    lo, hi = bootstrap_ci(stacked, stat=share)
    gap, gap_lo, gap_hi = paired_diff_ci(uniform, oracle)
    return {"captured": float(share(stacked)), "captured_lo": lo, "captured_hi": hi, "ppl_sol": float(np.exp(sol.mean())),
            "ppl_uniform": float(np.exp(uniform.mean())), "ppl_oracle": float(np.exp(oracle.mean())),
            "headroom_nll": gap, "headroom_lo": gap_lo, "headroom_hi": gap_hi}
