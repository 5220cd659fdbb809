"""Oracle controllers: non-causal upper bounds on per-token allocation. **Not deployable methods** — they read the
tokens they are about to be scored on. They run through the same runtime and cost model as every other controller.

* :class:`GreedyOracle` (``oracle-greedy``) — at each step, for every candidate action, score this step plus H−1
  dense teacher-forced lookahead steps from a copy of the KV cache (the reference's dead "SFT teacher", §6.5, made
  usable), then pick argmin(loss + λ·keep) with λ set so that the pick fits the keep still required to finish the
  episode on budget (the budget-tracking rule of the other controllers). Cost: (|candidates|·H + 1) LM steps per
  decode step — e.g. 20 candidates × H=2 ≈ 41× a plain rollout.
* :class:`RankedOracle` (``oracle-ranked``) — two levels and a budget: one rollout at the low level and one at the high
  level give each position's damage (NLL_low − NLL_high); the high level goes to the most damaged positions, as many
  as the budget allows (the headroom study's "O"). Cost: 3 rollouts.
"""
from __future__ import annotations

import torch

from sol.actions import Action, ActionGrid
from sol.controllers import Controller, FixedAction, StepState


class GreedyOracle(Controller):
    name = "oracle-greedy"
    needs_probe = True

    def __init__(self, grid: ActionGrid, horizon: int = 2, candidates: list[int] | None = None):
        super().__init__(grid)
        self.horizon = horizon
        self.candidates = candidates or list(range(len(grid)))

    def act(self, state: StepState) -> torch.Tensor:
        B = state.batch
        cand = torch.tensor(self.candidates)
        loss = torch.stack([state.probe(torch.full((B,), int(a)), self.horizon) for a in cand], 1)  # [B, C]
        keep = state.keep_table[:, cand]                                                             # [B, C]
        R = state.remaining.float()
        req = (state.budget * (state.n_effective + R) - state.spent) / R
        req = torch.minimum(torch.maximum(req, keep.min(1).values), keep.max(1).values)
        # smallest λ ≥ 0 whose argmin(loss + λ·keep) fits the required keep (bisection over λ)
        lo, hi = torch.zeros(B), torch.full((B,), 1e4)
        for _ in range(40):
            lam = (lo + hi) / 2
            fits = keep.gather(1, (loss + lam[:, None] * keep).argmin(1, keepdim=True))[:, 0] <= req + 1e-9
            hi = torch.where(fits, lam, hi)
            lo = torch.where(fits, lo, lam)
        return cand[(loss + hi[:, None] * keep).argmin(1)]


class RankedOracle(Controller):
    """Per row, the high level at the ⌈share·T⌉ most damaged positions (share from the budget); needs ``prepare``."""

    name = "oracle-ranked"

    def __init__(self, grid: ActionGrid, low: Action, high: Action):
        super().__init__(grid)
        self.low, self.high = grid.index(low), grid.index(high)

    def prepare(self, runtime, blocks: torch.Tensor, budget: float, context: int, episode: int | None) -> None:
        lo = runtime.rollout(blocks, FixedAction(self.grid, self.grid[self.low]), 1.0, context, episode=episode)
        hi = runtime.rollout(blocks, FixedAction(self.grid, self.grid[self.high]), 1.0, context, episode=episode)
        damage = lo.nll - hi.nll                                                         # [B, T]
        k_lo, k_hi = lo.mean_flop_keep().mean().item(), hi.mean_flop_keep().mean().item()
        share = 0.0 if k_hi == k_lo else min(max((budget - k_lo) / (k_hi - k_lo), 0.0), 1.0)
        n_hi = round(share * damage.shape[1])
        plan = torch.full(damage.shape, self.low, dtype=torch.long)
        if n_hi:
            top = damage.topk(n_hi, dim=1).indices
            plan.scatter_(1, top, self.high)
        self.plan, self.context = plan, context

    def act(self, state: StepState) -> torch.Tensor:
        return self.plan[:, state.kv_len - 1 - self.context]
