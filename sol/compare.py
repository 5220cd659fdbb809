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
    """(i, j, w): x_query = (1−w)·front[i] + w·front[j] along the front; None outside its x range."""
    xs = front[x].to_numpy()
    if len(xs) == 0 or x_query < xs[0] - 1e-12 or x_query > xs[-1] + 1e-12:
        return None
    j = int(np.searchsorted(xs, x_query))
    if j == 0:
        return 0, 0, 0.0
    if j >= len(xs):
        return len(xs) - 1, len(xs) - 1, 0.0
    i = j - 1
    w = (x_query - xs[i]) / (xs[j] - xs[i]) if xs[j] > xs[i] else 0.0
    return i, j, float(w)


def versus_front(per_block: pd.DataFrame, method: tuple[str, float], front: pd.DataFrame, x_query: float) -> dict | None:
    """NLL of ``method`` minus the front's NLL interpolated at ``x_query`` (linear in FLOP keep), per block,
    with a paired bootstrap CI. Negative: the method beats the front at matched FLOP keep."""
    br = bracket(front, x_query)
    if br is None:
        return None
    i, j, w = br

    def nll(m, bud):
        d = per_block[per_block.method == m]
        if bud is not None and not (isinstance(bud, float) and np.isnan(bud)):
            d = d[np.isclose(d.budget, bud)]
        return d.sort_values("block").nll.to_numpy()

    a = nll(*method)
    fi = nll(front.loc[i, "method"], front.loc[i, "budget"])
    fj = nll(front.loc[j, "method"], front.loc[j, "budget"])
    ref = (1 - w) * fi + w * fj
    mean, lo, hi = paired_diff_ci(a, ref)
    return {"delta_nll": mean, "lo": lo, "hi": hi, "ppl_ratio": float(np.exp(mean)), "front_ppl": float(np.exp(ref.mean())),
            "between": f"{front.loc[i, 'method']} | {front.loc[j, 'method']}", "weight": w}
