"""Bootstrap confidence intervals over evaluation units (blocks, questions), plain and paired."""
from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, stat=np.mean, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 weights: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile CI of ``stat`` over resampled units. ``values`` [N] (or [N, ...] rows resampled together)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    idx = rng.integers(0, n, size=(n_boot, n))
    if weights is None:
        stats = np.array([stat(values[i]) for i in idx])
    else:
        stats = np.array([stat(values[i], weights[i]) for i in idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def ppl_with_ci(block_nll: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Perplexity exp(mean NLL) of [blocks, tokens] NLLs, with a 95 % CI resampling blocks."""
    per_block = block_nll.mean(1)
    lo, hi = bootstrap_ci(per_block, n_boot=n_boot, seed=seed)
    return float(np.exp(per_block.mean())), float(np.exp(lo)), float(np.exp(hi))


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over the same units, with a paired 95 % bootstrap CI."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return float(d.mean()), lo, hi
