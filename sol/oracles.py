"""Oracle controllers: non-causal upper bounds on per-token allocation. **Not deployable methods** — they read the
tokens they are about to be scored on. They run through the same runtime and cost model as every other controller.

* :class:`GreedyOracle` (``oracle-greedy``) — at each step, for every candidate action, score this step plus H−1
  dense teacher-forced lookahead steps in the live KV cache, rewound afterwards (the reference's dead "SFT teacher",
  §6.5, made usable), then pick argmin(damage + λ·keep) with λ set so that the pick spends the keep still required
  to finish the episode on budget (the budget-tracking rule of the other controllers). Damage: KL to the dense model
  (default) or the true tokens' NLL. Cost: ((|candidates| + 1)·H + 1) LM steps per decode step — e.g. the 75-action
  default grid with H=1 ≈ 77× a plain rollout. With H=1 the candidates of a step run as the rows of one LM call
  (``Engine.step_alternatives``: each candidate's query sees the cache and its own key), so the GEMMs are wide.
* :class:`RankedOracle` (``oracle-ranked``) — two levels and a budget: one rollout at the low level and one at the high
  level give each position's damage (NLL_low − NLL_high); the high level goes to the most damaged positions, as many
  as the budget allows (the headroom study's "O"). Cost: 3 rollouts.
"""
from __future__ import annotations

import torch

from sol.actions import Action, ActionGrid
from sol.controllers import Controller, FixedAction, StepState


class GreedyOracle(Controller):
    """``score="kl"`` (default): damage = KL(dense ‖ approx) over the lookahead — how much an action distorts the LM,
    the allocation bound. ``score="nll"``: damage = the true next tokens' NLL; picking among many perturbed models the
    one that happens to predict the label best exploits label noise (it beats *dense*), so it bounds nothing useful
    for allocation; kept for comparison with the reference's teacher."""

    name = "oracle-greedy"
    needs_probe = True

    def __init__(self, grid: ActionGrid, horizon: int = 2, candidates: list[int] | None = None, score: str = "kl"):
        super().__init__(grid)
        if score not in ("kl", "nll"):
            raise ValueError(f"oracle score '{score}': use kl or nll")
        self.horizon, self.score = horizon, score
        self.candidates = candidates or list(range(len(grid)))

    def act(self, state: StepState) -> torch.Tensor:
        B = state.batch
        cand = torch.tensor(self.candidates)
        dense = self.grid.dense_index
        if self.horizon == 1:  # every candidate as rows of one call (Engine.step_alternatives)
            nll, kl = state.probe.damage(self.candidates, dense)
            loss = kl if self.score == "kl" else nll                                                  # [B, C]
        elif self.score == "kl":
            _, ref = state.probe(torch.full((B,), dense), self.horizon)

            def kl(a: int) -> torch.Tensor:  # the dense candidate is the reference itself: KL 0, no second probe
                if a == dense:
                    return torch.zeros(B)
                return sum((r.exp() * (r - q)).sum(-1) for r, q in zip(ref, state.probe(torch.full((B,), a),
                                                                                           self.horizon)[1]))
            loss = torch.stack([kl(int(a)) for a in cand], 1)                                          # [B, C]
        else:
            loss = torch.stack([state.probe(torch.full((B,), int(a)), self.horizon)[0] for a in cand], 1)
        keep = state.keep_table[:, cand]                                                             # [B, C]
        R = state.remaining.float()
        req = (state.budget * (state.n_effective + R) - state.spent) / R
        req = torch.minimum(torch.maximum(req, keep.min(1).values), keep.max(1).values)
        # the smallest λ (negative: spend more) whose argmin(loss + λ·keep) fits the required keep, so each step
        # spends as much of the remaining budget as it may (bisection; keep(λ) is non-increasing in λ)
        lo, hi = torch.full((B,), -1e4), torch.full((B,), 1e4)
        for _ in range(50):
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

    def prepare(self, runtime, blocks: torch.Tensor, budget: float, context: int, episode: int | None,
                max_rows: int = 64) -> None:
        """The plan for every block of the scored set (rows are found by ``StepState.rows``)."""
        lo = runtime.score(blocks, FixedAction(self.grid, self.grid[self.low]), 1.0, context, episode, max_rows)
        hi = runtime.score(blocks, FixedAction(self.grid, self.grid[self.high]), 1.0, context, episode, max_rows)
        damage = lo.nll - hi.nll                                                         # [B, T]
        k_lo, k_hi = lo.mean_flop_keep().mean().item(), hi.mean_flop_keep().mean().item()
        share = 0.0 if k_hi == k_lo else min(max((budget - k_lo) / (k_hi - k_lo), 0.0), 1.0)
        n_hi = round(share * damage.shape[1])
        plan = torch.full(damage.shape, self.low, dtype=torch.long)
        if n_hi:
            top = damage.topk(n_hi, dim=1).indices
            plan.scatter_(1, top, self.high)
        self.plan = plan

    def act(self, state: StepState) -> torch.Tensor:
        return self.plan[state.rows, state.offset + state.t]
