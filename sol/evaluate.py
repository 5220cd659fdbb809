"""Perplexity at matched compute (``sol eval ppl``).

Held-out blocks of ``context + steps + 1`` tokens: dense prefill of ``context`` tokens, then ``steps`` teacher-forced
steps under the controller, with a dense refresh every ``episode`` steps (identical for every controller). Per
(method, budget): ppl with a 95 % bootstrap CI over blocks, mean NLL, realised FLOP keep (LM only and with the
controller's own cost), net keep and per-axis usage; per-block NLLs are kept so that any two methods can be compared
pairwise on the same blocks (``paired``). With ``time_steps`` every decode step is timed (CUDA events on GPU,
``perf_counter`` on CPU; run with ``mode="compute"`` for real savings) and the ratio to dense in the same run is
reported.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from baselines import BASELINE_KINDS
from sol.actions import ActionSettings
from sol.bench import StepTimer
from sol.controllers import Controller, FixedAction, StepState
from sol.engine import Engine
from sol.registry import Built, build
from sol.runtime import Runtime, rows_for_memory
from sol.stats import paired_diff_ci, ppl_with_ci


def run_blocks(runtime: Runtime, built: Built, blocks: torch.Tensor, budget: float, context: int, episode: int,
               batch: int, max_rows: int = 64, desc: str = "") -> dict[str, np.ndarray]:
    """Per-block arrays: nll [N, T], flop_keep / total_keep / token_keep / prune_keep / bits [N].

    Scored through the shared dense prefix (``Runtime.score``, rows of at most ``max_rows``). With a step timer the
    blocks run as before, ``batch`` blocks per sequential rollout, so a timed step is one step of ``batch`` blocks."""
    if hasattr(built.controller, "prepare"):  # oracles that look at the whole block set first
        built.controller.prepare(runtime, blocks, budget, context, episode, max_rows)
    timed = runtime.timer is not None
    ro = runtime.score(blocks, built.controller, budget, context, episode, max_rows=batch if timed else max_rows,
                       desc=desc or built.controller.name)
    out = {"nll": ro.nll.numpy(), "flop_keep": ro.mean_flop_keep().numpy(), "total_keep": ro.mean_total_keep().numpy()}
    for axis, v in runtime.axis_usage(ro.actions[:, ro.effective]).items():
        out[axis] = v.mean(1).numpy()
    if timed:  # one step serves a whole chunk: charge its mean time to every block
        out["step_ms"] = np.full(len(blocks), ro.extras["step_ms"].mean().item())
    return out


def transformed(model, built: Built, calibration: torch.Tensor | None):
    """The model a controller runs on: unchanged, or a statically weight-quantised / head-pruned copy."""
    m = model
    if built.weight_bits < 16:
        from baselines.weights import quantize_weights

        m = quantize_weights(m, built.weight_bits, built.group_size)
    if built.head_keep < 1.0:
        from baselines.heads import head_importance, prune_heads

        if calibration is None:
            raise ValueError("head pruning needs calibration blocks")
        m = prune_heads(m, head_importance(model, calibration), built.head_keep)
    return m


def summary_row(method: str, budget: float, r: dict, model_name: str, seed: int = 0, **extra) -> dict:
    """One (method, budget) summary from :func:`run_blocks` arrays: ppl with a block-bootstrap CI, keeps, time."""
    ppl, lo, hi = ppl_with_ci(r["nll"], seed=seed)
    return dict(method=method, budget=budget, ppl=ppl, ppl_lo=lo, ppl_hi=hi, nll=float(r["nll"].mean()),
                flop_keep=float(r["flop_keep"].mean()), total_keep=float(r["total_keep"].mean()),
                token_keep=float(r["token_keep"].mean()), prune_keep=float(r["prune_keep"].mean()),
                bit_ratio=float(r["bit_ratio"].mean()),
                net_keep=float((r["token_keep"] + r["prune_keep"] + r["bit_ratio"]).mean() / 3),
                blocks=len(r["nll"]), tokens=int(r["nll"].size), model=model_name,
                step_ms=float(r["step_ms"].mean()) if "step_ms" in r else np.nan, **extra)


BLOCK_KEEPS = ("flop_keep", "total_keep", "token_keep", "prune_keep", "bit_ratio")


def block_rows(method: str, budget: float, r: dict) -> list[dict]:
    """Per block: mean NLL and every keep, so that each summary number can be recomputed from these rows."""
    return [dict(method=method, budget=budget, block=b, nll=float(r["nll"][b].mean()),
                 **{k: float(r[k][b]) for k in BLOCK_KEEPS}) for b in range(len(r["nll"]))]


def keep_floor(runtime: Runtime, grid, context: int, steps: int) -> float:
    """The lowest mean FLOP keep any schedule on ``grid`` can realise over these steps (the cheapest action at every
    step): budgets below it cannot be met."""
    return float(np.mean([runtime.cost.keep_table(grid, context + t + 1).min().item() for t in range(steps)]))


def eval_ppl(model, model_name: str, blocks: torch.Tensor, specs: list[str], budgets: list[float], context: int,
             episode: int, batch: int = 8, settings: ActionSettings | None = None, seed: int = 0,
             calibration: torch.Tensor | None = None, time_steps: bool = False, mode: str = "simulate",
             memory_gb: float = 2.0):
    """Returns (summary DataFrame, per-block DataFrame). ``calibration``: blocks for head importance (not ``blocks``).
    Rows per batch come from ``memory_gb`` (``rows_for_memory``); ``batch`` blocks per timed step."""
    settings = settings or ActionSettings()
    rows, per_block = [], []
    engines = {}
    for spec in specs:
        built = build(spec, model_name)
        if built.transform not in engines:
            engines[built.transform] = Engine(transformed(model, built, calibration), settings, mode)
        timer = StepTimer(engines[built.transform].device) if time_steps else None
        runtime = Runtime(engines[built.transform], built.grid, timer=timer)
        max_rows = rows_for_memory(runtime.engine, blocks.shape[1] + 1, memory_gb)
        extra = {"keep_floor": keep_floor(runtime, built.grid, context, blocks.shape[1] - context - 1)
                 } if built.uses_budget else {}
        for budget in (budgets if built.uses_budget else [1.0]):
            torch.manual_seed(seed)
            r = run_blocks(runtime, built, blocks, budget, context, episode, batch, max_rows,
                           desc=f"{built.controller.name} {budget:g}")
            method = built.controller.name
            rows.append(summary_row(method, budget if built.uses_budget else np.nan, r, model_name, seed, **extra))
            per_block += block_rows(method, rows[-1]["budget"], r)
    summary = pd.DataFrame(rows)
    if time_steps and "dense" in set(summary.method):
        summary["time_ratio"] = summary.step_ms / summary.loc[summary.method == "dense", "step_ms"].iloc[0]
    return summary, pd.DataFrame(per_block)


def paired(per_block: pd.DataFrame, a: tuple[str, float], b: tuple[str, float]) -> dict:
    """Mean NLL difference a − b over the same blocks with a paired bootstrap CI (negative: a is better)."""
    def sel(m, bud):
        d = per_block[per_block.method == m]
        if not np.isnan(bud):
            d = d[np.isclose(d.budget, bud)]
        return d.sort_values("block").nll.to_numpy()

    mean, lo, hi = paired_diff_ci(sel(*a), sel(*b))
    return {"delta_nll": mean, "lo": lo, "hi": hi, "ppl_ratio": float(np.exp(mean)),
            "ppl_ratio_lo": float(np.exp(lo)), "ppl_ratio_hi": float(np.exp(hi))}


class _EveryAction(Controller):
    """Row k of each block's group of len(actions) rows runs grid action actions[k] at every step."""

    name = "every-action"
    open_loop = True

    def __init__(self, grid, actions: list[int]):
        super().__init__(grid)
        self.actions = torch.tensor(actions, dtype=torch.long)

    def act(self, state: StepState) -> torch.Tensor:
        return self.actions[torch.arange(state.batch) % len(self.actions)]


def static_sweep(runtime: Runtime, grid, blocks: torch.Tensor, context: int, episode: int, max_rows: int = 256,
                 actions: list[int] | None = None) -> pd.DataFrame:
    """Every fixed (uniform) action of ``grid`` (or of ``actions``, grid indices) on ``blocks`` at once: each
    (block, episode) decoded from the shared dense prefix as one row per action. Per action its mean NLL and realised
    FLOP keep."""
    actions = list(range(len(grid))) if actions is None else list(actions)
    A = len(actions)
    ro = runtime.score(blocks, _EveryAction(grid, actions), 1.0, context, episode, max_rows=max(max_rows, A),
                       rollouts=A, desc=f"static sweep ({A} actions)")
    nll, keep = ro.nll.mean(-1).view(-1, A).mean(0), ro.mean_flop_keep().view(-1, A).mean(0)
    return pd.DataFrame({"action": actions, "tag": [grid.actions[a].tag for a in actions], "nll": nll.numpy(),
                         "flop_keep": keep.numpy()})


def paper_baselines(model, model_name: str, summary: pd.DataFrame, blocks: torch.Tensor, selection: torch.Tensor,
                    grid, context: int, episode: int, batch: int = 8, n_random: int = 5,
                    settings: ActionSettings | None = None, seed: int = 0, select_on_eval: bool = False,
                    primary: str = "policy", memory_gb: float = 2.0, kinds=BASELINE_KINDS, match: str = "total"):
    """The reference's schedule baselines at every policy operating point (reference §8): the matched two-level mix
    at the policy's realised per-axis averages, N random permutations of it (best-of-N chosen on ``selection``
    blocks — a held-out split — unless ``select_on_eval``, the reference's optimistic choice), EMC and DAC. Plus
    ours, the strongest uniform baseline: ``static-best``, the one fixed grid action (joint levels of all axes) with
    the lowest NLL on the selection blocks among those whose FLOP keep is at most the policy's total keep (its LM FLOPs plus its own MACs).

    ``match="total"`` (default): the schedule baselines' per-axis targets are shifted together until the matched
    mix realises the policy's total keep (``flop_matched_targets``); ``match="axes"``: the reference's rule, the
    policy's per-axis averages as they are (0.001–0.011 less FLOP keep than the policy, and none of its own MACs).
    ``kinds``: which of ``BASELINE_KINDS`` to run (the pipeline runs each kind as its own job).

    Returns (summary rows, per-block rows) to append to the policy's; method names carry the operating point.
    """
    from baselines.schedules import (DriftController, EntropyController, Matched, RandomPermutation,
                                     flop_matched_targets)

    engine = Engine(model, settings or ActionSettings())
    runtime = Runtime(engine, grid)
    rows, blocks_out = [], []
    pol = summary[summary.method == primary]
    max_rows = rows_for_memory(engine, blocks.shape[1] + 1, memory_gb)
    unknown = set(kinds) - set(BASELINE_KINDS)
    if unknown or match not in ("total", "axes"):
        raise ValueError(f"unknown baseline kind or match rule: {sorted(unknown) or match}")
    steps = blocks.shape[1] - context - 1
    tables = [runtime.cost.keep_table(grid, context + t + 1) for t in range(steps)]
    sweep = None
    if len(pol) and "static" in kinds:  # only actions some operating point can afford (the others are never chosen)
        mean_keep = torch.stack(tables).mean(0)
        actions = [a for a in range(len(grid)) if mean_keep[a] <= pol.total_keep.max() + 1e-6]
        sweep = static_sweep(runtime, grid, selection, context, episode, max(max_rows, len(actions)), actions)
    for _, p in pol.iterrows():
        axes = {"token_keep": p.token_keep, "prune_keep": p.prune_keep, "bits": p.bit_ratio * 16}
        point = float(p.budget)

        def targets(make=None, rows=1):  # per-axis targets at which the schedule ``make`` realises the total keep
            return (flop_matched_targets(grid, axes, float(p.total_keep), tables, episode, make, rows)
                    if match == "total" else axes)

        candidates = []
        if "matched" in kinds:  # EMC and DAC take the matched mix's targets
            t = targets()
            candidates = [("matched", Matched(grid, t)), ("emc", EntropyController(grid, t)),
                          ("dac", DriftController(grid, t))]
        randoms = []
        for s in range(seed, seed + n_random) if "random" in kinds else []:  # each seed its own targets
            make = lambda t, s=s: RandomPermutation(grid, t, seed=s)  # noqa: E731
            randoms.append((f"random:seed={s}", make(targets(make, len(blocks)))))
        sel_ppl = {}
        for name, ctrl in randoms:
            r = run_blocks(runtime, Built(ctrl, grid), selection, 1.0, context, episode, batch, max_rows)
            sel_ppl[name] = float(np.exp(r["nll"].mean()))
        for name, ctrl in candidates + randoms:
            r = run_blocks(runtime, Built(ctrl, grid), blocks, 1.0, context, episode, batch, max_rows)
            rows.append(summary_row(name, point, r, model_name, seed, selection_ppl=sel_ppl.get(name, np.nan)))
            blocks_out += block_rows(name, point, r)
        affordable = sweep[sweep.flop_keep <= p.total_keep + 1e-9] if sweep is not None else []  # LM + its MACs
        if len(affordable):
            best_static = affordable.loc[affordable.nll.idxmin()]
            ctrl = FixedAction(grid, grid[int(best_static.action)])
            r = run_blocks(runtime, Built(ctrl, grid), blocks, 1.0, context, episode, batch, max_rows)
            rows.append(summary_row("static-best", point, r, model_name, seed, selected=best_static.tag,
                                    selection_ppl=float(np.exp(best_static.nll)), selected_on="selection split"))
            blocks_out += block_rows("static-best", point, r)
        trials = [x for x in rows if x["method"].startswith("random:") and x["budget"] == point]
        if not trials:
            continue
        key = "ppl" if select_on_eval else "selection_ppl"
        best = min(trials, key=lambda x: x[key])
        rows.append({**best, "method": "random-best", "selected": best["method"],
                     "selected_on": "evaluation blocks" if select_on_eval else "selection split"})
        blocks_out += [{**b, "method": "random-best"} for b in blocks_out
                       if b["method"] == best["method"] and b["budget"] == point]
    return pd.DataFrame(rows), pd.DataFrame(blocks_out)
