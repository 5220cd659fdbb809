"""The paper's side studies, through the same runtime: KV pollution, token difficulty, action timelines."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sol.actions import Action, ActionGrid
from sol.controllers import Controller, Dense
from sol.runtime import Runtime

POLLUTION_LEVELS = {"token_keep": [0.1, 0.3, 0.5], "prune_keep": [0.4, 0.6, 0.8], "bits": [5, 6, 8]}


class _Impulse(Controller):
    """One action on the first ``corrupt`` steps, dense afterwards."""

    def __init__(self, grid: ActionGrid, action: Action, corrupt: int):
        super().__init__(grid)
        self.index, self.corrupt = grid.index(action), corrupt

    def start_episode(self, n_rows, budget):
        self.t = 0

    def act(self, state):
        a = self.index if self.t < self.corrupt else self.grid.dense_index
        self.t += 1
        return torch.full((state.batch,), a, dtype=torch.long)


def kv_pollution(engine, blocks: torch.Tensor, context: int, corrupt: int = 4, levels=None, batch: int = 8
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference §9.3: corrupt ``corrupt`` steps under one axis at a level, then dense tail steps (no refresh).

    Per-position %Δppl = (e^{ΔNLL} − 1)·100 against the fully dense run. Returns (summary per axis and level:
    direct mean, tail mean, worst-10 % tail mean, p90/p95 of the per-window tail peak; per-position curve).
    """
    levels = levels or POLLUTION_LEVELS
    grid = ActionGrid(token_keep=(*levels["token_keep"], 1.0), prune_keep=(*levels["prune_keep"], 1.0),
                      bits=(*levels["bits"], 16))
    rt = Runtime(engine, grid)
    dense = np.concatenate([rt.rollout(blocks[i:i + batch], Dense(grid), 1.0, context).nll.numpy()
                            for i in range(0, len(blocks), batch)])
    rows, curves = [], []
    for axis, values in levels.items():
        for v in tqdm(values, desc=f"kv pollution {axis}", leave=False):
            action = Action(**{axis: v})
            ctrl = _Impulse(grid, action, corrupt)
            nll = np.concatenate([rt.rollout(blocks[i:i + batch], ctrl, 1.0, context).nll.numpy()
                                  for i in range(0, len(blocks), batch)])
            delta = (np.exp(nll - dense) - 1) * 100  # [windows, T]
            tail = delta[:, corrupt:]
            tail_mean = tail.mean(1)
            worst = np.sort(tail_mean)[-max(1, len(tail_mean) // 10):]
            peak = tail.max(1)
            rows.append(dict(axis=axis, level=v, direct_mean=float(delta[:, :corrupt].mean()),
                             tail_mean=float(tail_mean.mean()), tail_worst10_mean=float(worst.mean()),
                             tail_peak_p90=float(np.quantile(peak, 0.9)), tail_peak_p95=float(np.quantile(peak, 0.95)),
                             windows=len(blocks)))
            for t in range(delta.shape[1]):
                curves.append(dict(axis=axis, level=v, position=t, median=float(np.median(delta[:, t])),
                                   p10=float(np.quantile(delta[:, t], 0.1)), p90=float(np.quantile(delta[:, t], 0.9))))
    return pd.DataFrame(rows), pd.DataFrame(curves)


def token_difficulty(engine, blocks: torch.Tensor, context: int, batch: int = 8) -> pd.DataFrame:
    """Dense model's top-1 probability and entropy (nats) at every decode step of a workload."""
    grid = ActionGrid()
    rt = Runtime(engine, grid)
    rows = []
    for i in tqdm(range(0, len(blocks), batch), desc="profile", leave=False):
        ro = rt.rollout(blocks[i:i + batch], Dense(grid), 1.0, context, keep_distributions=True)
        lp = ro.extras["log_distributions"]
        p = lp.exp()
        top1 = p.max(-1).values
        ent = -(p * lp).sum(-1)
        for b in range(lp.shape[0]):
            for t in range(lp.shape[1]):
                rows.append(dict(block=i + b, step=t, top1=float(top1[b, t]), entropy=float(ent[b, t]),
                                 nll=float(-ro.logprobs[b, t])))
    return pd.DataFrame(rows)


def difficulty_summary(df: pd.DataFrame) -> dict:
    return {"steps": len(df), "frac_top1_gt_0.9": float((df.top1 > 0.9).mean()),
            "frac_top1_gt_0.5": float((df.top1 > 0.5).mean()), "mean_entropy": float(df.entropy.mean()),
            "median_entropy": float(df.entropy.median()), "mean_top1": float(df.top1.mean())}


def action_timeline(runtime: Runtime, controller: Controller, blocks: torch.Tensor, budget: float, context: int,
                    episode: int, tokenizer=None) -> pd.DataFrame:
    """Per-token actions a controller chose, next to the dense model's entropy at the same position."""
    dense = Runtime(runtime.engine, runtime.grid).rollout(blocks, Dense(runtime.grid), 1.0, context, episode=episode,
                                                          keep_distributions=True)
    lp = dense.extras["log_distributions"]
    ent = -(lp.exp() * lp).sum(-1)
    ro = runtime.rollout(blocks, controller, budget, context, episode=episode)
    rows = []
    for b in range(blocks.shape[0]):
        for t in range(ro.actions.shape[1]):
            a = runtime.grid[int(ro.actions[b, t])]
            tok = int(blocks[b, context + t])
            rows.append(dict(block=b, step=t, token=tokenizer.decode([tok]) if tokenizer else tok, action=a.tag,
                             token_keep=a.token_keep, prune_keep=a.prune_keep, bits=a.bits,
                             flop_keep=float(ro.flop_keep[b, t]), dense_entropy=float(ent[b, t]),
                             nll=float(-ro.logprobs[b, t]), dense_nll=float(-dense.logprobs[b, t])))
    return pd.DataFrame(rows)
