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


def timeline_summary(df: pd.DataFrame) -> dict:
    """Is the schedule constant? Distinct actions, the entropy (nats) of the empirical action distribution, and the
    Spearman correlation of each step's FLOP keep with the dense model's entropy there (pooled, and the median over
    blocks): positive = more compute where the dense model is less certain."""
    p = df.action.value_counts(normalize=True).to_numpy()
    per_block = df.groupby("block")[["flop_keep", "dense_entropy"]].corr(method="spearman").xs("flop_keep", level=1)
    return {"steps": len(df), "distinct_actions": int(df.action.nunique()),
            "action_entropy_nats": float(-(p * np.log(p)).sum()),
            "spearman_keep_entropy": float(df.flop_keep.corr(df.dense_entropy, method="spearman")),
            "spearman_keep_entropy_block_median": float(per_block.dense_entropy.median()),
            "mean_flop_keep": float(df.flop_keep.mean())}


class _Schedule(Controller):
    """A precomputed per-row schedule of grid action ids [B, T] (column = decode step)."""

    def __init__(self, grid: ActionGrid, plan: torch.Tensor, context: int, name: str):
        super().__init__(grid)
        self.plan, self.context, self.name = plan, context, name

    def act(self, state):
        return self.plan[:, state.kv_len - 1 - self.context]


def headroom(engine, blocks: torch.Tensor, context: int, axis: str, low, high, mid, hi_share: float,
             seeds: int = 3, batch: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The headroom study (shared/docs/headroom-study.md) through this runtime, one axis, no refresh.

    U: uniform ``mid`` level; R: random two-level mixes (``seeds``); E: high level at the highest dense entropy;
    O: high level at the positions the low level damages most (non-causal, in-sample). All two-level schedules put
    the high level at round(hi_share·T) positions per block. Gap closed = (ppl_U − ppl_X)/(ppl_U − ppl_dense), with a
    95 % bootstrap CI over blocks. Returns (summary rows, per-position diagnostics: damage vs dense entropy/top-1).
    """
    from sol.stats import bootstrap_ci

    levels = sorted({low, high, mid, 16 if axis == "bits" else 1.0})
    grid = ActionGrid(**{axis: tuple(levels)})
    rt = Runtime(engine, grid)
    idx = {v: grid.index(Action(**{axis: v})) for v in levels}
    dense_idx = grid.dense_index

    def run(plan_fn, name):
        out = []
        for i in range(0, len(blocks), batch):
            chunk = blocks[i:i + batch]
            T = chunk.shape[1] - context - 1
            ctrl = _Schedule(grid, plan_fn(i, chunk.shape[0], T), context, name)
            out.append(rt.rollout(chunk, ctrl, 1.0, context, keep_distributions=name == "dense"))
        return out

    const = lambda v: (lambda i, b, T: torch.full((b, T), idx[v]))  # noqa: E731
    dense_ro = run(const(16 if axis == "bits" else 1.0), "dense")
    low_ro = run(const(low), "low")
    high_ro = run(const(high), "high")
    nll = {"dense": torch.cat([r.nll for r in dense_ro]), "U": torch.cat([r.nll for r in run(const(mid), "U")])}
    lp = torch.cat([r.extras["log_distributions"] for r in dense_ro])
    entropy = -(lp.exp() * lp).sum(-1)
    top1 = lp.exp().max(-1).values
    damage = torch.cat([r.nll for r in low_ro]) - torch.cat([r.nll for r in high_ro])
    N, T = damage.shape
    n_hi = round(hi_share * T)

    def ranked(score):
        def plan(i, b, T_):
            p = torch.full((b, T_), idx[low])
            p.scatter_(1, score[i:i + b].topk(n_hi, dim=1).indices, idx[high])
            return p
        return plan

    nll["E"] = torch.cat([r.nll for r in run(ranked(entropy), "E")])
    nll["O"] = torch.cat([r.nll for r in run(ranked(damage), "O")])
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        nll[f"R{s}"] = torch.cat([r.nll for r in run(ranked(torch.rand(N, T, generator=g)), f"R{s}")])
    base_u, base_d = nll["U"].mean(1).numpy(), nll["dense"].mean(1).numpy()
    rows = []
    for name, x in nll.items():
        per_block = x.mean(1).numpy()
        ppl = float(np.exp(per_block.mean()))
        def gap(v, u, d):
            den = np.exp(u.mean()) - np.exp(d.mean())
            return (np.exp(u.mean()) - np.exp(v.mean())) / den if abs(den) > 1e-12 else float("nan")

        stacked = np.stack([per_block, base_u, base_d], 1)
        lo, hi = bootstrap_ci(stacked, stat=lambda m: gap(m[:, 0], m[:, 1], m[:, 2]))
        rows.append(dict(axis=axis, low=low, high=high, mid=mid, hi_share=hi_share, schedule=name, ppl=ppl,
                         gap_closed=gap(per_block, base_u, base_d), gap_lo=lo, gap_hi=hi, tokens=int(x.numel())))
    diag = pd.DataFrame({"damage": damage.flatten().numpy(), "dense_entropy": entropy.flatten().numpy(),
                         "dense_top1": top1.flatten().numpy()})
    return pd.DataFrame(rows), diag


def where_it_hurts(diag: pd.DataFrame, worst=(0.01, 0.05, 0.1, 0.2)) -> dict:
    """Spearman correlation of per-position damage with dense entropy / top-1, and the share of total damage the
    worst k % of positions carry."""
    d = diag.damage.to_numpy()
    total = d[d > 0].sum()
    order = np.sort(d)[::-1]
    out = {"spearman_entropy": float(diag.damage.corr(diag.dense_entropy, method="spearman")),
           "spearman_top1": float(diag.damage.corr(diag.dense_top1, method="spearman"))}
    for k in worst:
        n = max(1, int(round(k * len(order))))
        out[f"damage_share_worst_{int(k * 100)}pct"] = float(order[:n].clip(min=0).sum() / max(total, 1e-12))
    return out
