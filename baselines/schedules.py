"""The reference's schedule baselines as controllers (reference-spec §8): matched two-level mixtures, random
permutations of the same mixture, and the entropy (EMC) / hidden-drift (DAC) controllers.

All of them target **per-axis** mean keeps over each episode's effective steps — token keep κ, prune keep ρ and bit
ratio b/16 — as the reference does, and pick per axis between the two grid levels that bracket the target:

* :class:`Matched` — content-agnostic error diffusion: at every step the level that keeps the running mean closest to
  the target. This is the paper's "fixed" baseline, a near-uniform two-level mix that hits the target within one grid
  step. (With a target exactly on a grid level it is true uniform compression.)
* :class:`RandomPermutation` — per row and axis exactly round(p_hi·R) high-level steps among R, randomly placed
  (seeded); the same multiset as the matched mix, different positions.
* :class:`EntropyController` (EMC) and :class:`DriftController` (DAC) — the budget-tracking chooser of §8.4 with a
  content signal u ∈ [0, 1]: p' = clip(p + γ·(u − ½)), choose high iff p' ≥ ½, clamped to the feasible band so the
  target stays reachable.
"""
from __future__ import annotations

import math

import torch

from sol.actions import Action, ActionGrid, DENSE_BITS
from sol.controllers import Controller, StepState
from sol.errors import SolError

AXES = ("token_keep", "prune_keep", "bits")


def axis_values(grid: ActionGrid, axis: str) -> list[float]:
    """Levels of one axis as keep ratios (bits → b/16), ascending."""
    levels = getattr(grid, axis)
    return [b / DENSE_BITS for b in levels] if axis == "bits" else list(levels)


def _bracket(levels: list[float], target: float) -> tuple[float, float]:
    lo = max([v for v in levels if v <= target + 1e-9], default=levels[0])
    hi = min([v for v in levels if v >= target - 1e-9], default=levels[-1])
    return lo, hi


class _PerAxis(Controller):
    """Shared plumbing: per-axis targets, per-row running sums, mapping per-axis choices back to a grid index."""

    def __init__(self, grid: ActionGrid, targets: dict[str, float]):
        super().__init__(grid)
        unknown = set(targets) - set(AXES)
        if unknown:
            raise SolError(f"unknown target axis '{sorted(unknown)[0]}': use token_keep, prune_keep, bits")
        self.levels = {a: axis_values(grid, a) for a in AXES}
        self.targets = {}
        for a in AXES:
            t = targets.get(a, 1.0 if a != "bits" else max(grid.bits))
            t = t / DENSE_BITS if a == "bits" else t
            lo, hi = self.levels[a][0], self.levels[a][-1]
            if not (lo - 1e-9 <= t <= hi + 1e-9):
                raise SolError(f"target {a}={targets.get(a)} is outside the grid's range [{lo:g}, {hi:g}] "
                               f"({'as b/16' if a == 'bits' else 'keep ratio'})")
            self.targets[a] = t
        self._index = {_key(a.token_keep, a.prune_keep, a.bits / DENSE_BITS): i for i, a in enumerate(grid.actions)}

    def start_episode(self, n_rows: int, budget: torch.Tensor) -> None:
        self.sums = {a: torch.zeros(n_rows, dtype=torch.float64) for a in AXES}
        self.n = 0

    def _emit(self, chosen: dict[str, torch.Tensor]) -> torch.Tensor:
        for a in AXES:
            self.sums[a] += chosen[a]
        self.n += 1
        rows = zip(*(chosen[a].tolist() for a in AXES))
        return torch.tensor([self._index[_key(k, p, q)] for k, p, q in rows], dtype=torch.long)


def _key(*values: float) -> tuple:
    return tuple(round(v, 6) for v in values)


class BudgetTracker(_PerAxis):
    """The §8.4 chooser; with no signal (γ = 0) it is error diffusion, i.e. the matched mixture."""

    name = "matched"

    def __init__(self, grid: ActionGrid, targets: dict[str, float], gamma: float = 0.0):
        super().__init__(grid, targets)
        self.gamma = gamma

    @property
    def open_loop(self) -> bool:
        """Without a content signal the mix depends on its own history only."""
        return self.gamma == 0 and type(self).signal is BudgetTracker.signal

    def signal(self, state: StepState) -> torch.Tensor:
        """Per-row difficulty u ∈ [0, 1] (½ = no information)."""
        return torch.full((state.batch,), 0.5, dtype=torch.float64)

    def act(self, state: StepState) -> torch.Tensor:
        u = self.signal(state).double()
        R = state.remaining.double()
        chosen = {}
        for a in AXES:
            levels, target, spent = self.levels[a], self.targets[a], self.sums[a]
            vmin, vmax = levels[0], levels[-1]
            total = target * (self.n + R)
            req = ((total - spent) / R).clamp(vmin, vmax)
            lo_hi = [_bracket(levels, float(r)) for r in req]
            lo = torch.tensor([x[0] for x in lo_hi], dtype=torch.float64)
            hi = torch.tensor([x[1] for x in lo_hi], dtype=torch.float64)
            p = torch.where(hi > lo, (req - lo) / (hi - lo).clamp_min(1e-12), torch.ones_like(req))
            p = (p + self.gamma * (u - 0.5)).clamp(0, 1)
            pick = torch.where(p >= 0.5, hi, lo)
            # feasible band: the remaining R-1 steps must still be able to reach the episode total
            band_lo = total - spent - vmax * (R - 1)
            band_hi = total - spent - vmin * (R - 1)
            pick = torch.where(pick < band_lo - 1e-9, hi, pick)
            pick = torch.where(pick > band_hi + 1e-9, lo, pick)
            chosen[a] = pick
        return self._emit(chosen)


class Matched(BudgetTracker):
    name = "matched"


class EntropyController(BudgetTracker):
    """EMC: u = normalised entropy of the LM's previous next-token distribution (uncertain → more compute)."""

    name = "emc"

    def __init__(self, grid, targets, gamma: float = 0.35):
        super().__init__(grid, targets, gamma)

    def signal(self, state: StepState) -> torch.Tensor:
        logp = state.prev_logits.float().log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)
        return (h / math.log(logp.shape[-1])).double()


class DriftController(BudgetTracker):
    """DAC: u = ½(1 − cos(h_{t−1}, h_{t−2})) on final hidden states (a topic shift → more compute)."""

    name = "dac"

    def __init__(self, grid, targets, gamma: float = 0.35):
        super().__init__(grid, targets, gamma)
        self._prev_hidden = None

    def start_episode(self, n_rows, budget):
        super().start_episode(n_rows, budget)
        self._prev_hidden = None

    def signal(self, state: StepState) -> torch.Tensor:
        prev, self._prev_hidden = self._prev_hidden, state.hidden
        ref = prev if prev is not None else state.embedding
        cur = state.hidden if prev is not None else state.embedding  # t = 0: current vs previous token embedding
        return (0.5 * (1 - torch.nn.functional.cosine_similarity(cur, ref, dim=-1))).double()


class RandomPermutation(_PerAxis):
    """The matched multiset per row and axis, randomly permuted (seeded, deterministic). Each (block, episode) draws
    its own permutation from a generator seeded by (seed, block, episode start), so the schedule a block gets does
    not depend on how blocks are batched."""

    name = "random"
    open_loop = True

    def __init__(self, grid: ActionGrid, targets: dict[str, float], seed: int = 0):
        super().__init__(grid, targets)
        self.seed = seed

    def start_episode(self, n_rows, budget):
        super().start_episode(n_rows, budget)
        self._plan = None

    def schedule(self, rows, offset: int, length) -> dict[str, torch.Tensor]:
        """Per axis a [len(rows), max length] table of levels; row r holds exactly round(p_hi·length[r]) high entries
        among its first length[r] (``length``: an int or a tensor per row; the rest, past the row's end, is low).
        ``rows``: the block of each row; ``offset``: the episode's first step within its block."""
        rows = torch.as_tensor(rows).tolist()
        lengths = torch.as_tensor(length).expand(len(rows)).tolist()
        width = max(lengths)
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + r * 7919 + offset) for r in rows]
        plan = {}
        for a in AXES:
            lo, hi = _bracket(self.levels[a], self.targets[a])
            table = []
            for n, g in zip(lengths, gens):
                n_hi = 0 if hi == lo else round((self.targets[a] - lo) / (hi - lo) * n)
                base = torch.tensor([hi] * n_hi + [lo] * (n - n_hi), dtype=torch.float64)
                table.append(torch.cat([base[torch.randperm(n, generator=g)], torch.full((width - n,), lo,
                                                                                       dtype=torch.float64)]))
            plan[a] = torch.stack(table)
        return plan

    def act(self, state: StepState) -> torch.Tensor:
        if self._plan is None:
            rows = state.rows if state.rows is not None else torch.arange(state.batch)
            self._plan = self.schedule(rows, state.offset, state.remaining)
            self._t0 = self.n
        col = self.n - self._t0
        return self._emit({a: self._plan[a][:, col] for a in AXES})


def uniform_action(grid: ActionGrid, targets: dict[str, float]) -> Action:
    """The single grid action nearest to per-axis targets (true uniform compression when the target is a level)."""
    t = {a: targets.get(a, getattr(grid, a)[-1]) for a in AXES}
    return min(grid.actions, key=lambda x: abs(x.token_keep - t["token_keep"]) + abs(x.prune_keep - t["prune_keep"])
               + abs(x.bits - t["bits"]) / DENSE_BITS)


def flop_matched_targets(grid: ActionGrid, targets: dict[str, float], goal: float,
                         keep_tables: list[torch.Tensor] | None = None, episode: int | None = None, make=None,
                         rows: int = 1, iters: int = 40, keep_of=None) -> dict[str, float]:
    """Per-axis targets whose schedule realises mean FLOP keep ``goal`` (the policy's *total* keep: its LM FLOPs plus
    its own MACs), not only the policy's per-axis averages.

    Matching per-axis averages (the reference's rule, ``match="axes"``) leaves the mix 0.001–0.011 FLOP keep below
    the policy on SmolLM2, because FLOP keep is not linear in the three averages, and it ignores the controller's own
    compute. Here every axis target moves by the same fraction λ of its distance to the axis's top level (λ > 0) or
    bottom level (λ < 0), and λ is chosen by bisection on the schedule's simulated FLOP keep: matched and random
    schedules are content-agnostic, so their actions, and with ``keep_tables`` (the FLOP keep of every grid action at
    each scored step's key length, [A] each) their mean FLOP keep, are known before any token is decoded.
    ``make(targets)``: the schedule (default: the matched mix); ``rows``: rows simulated (block ids 0..rows−1, as the
    scored set numbers them: a random schedule differs per block). ``episode``: steps per dense-refresh episode.
    ``keep_of(controller)`` (instead of ``keep_tables``/``episode``): the mean FLOP keep a schedule realises, e.g. a dry
    rollout over MMLU's ragged batches (``SolLM.spend``). Returns targets in the same units as ``targets`` (bits in
    bits)."""
    make = make or (lambda t: Matched(grid, t))
    levels = {a: axis_values(grid, a) for a in AXES}
    base = {a: (targets.get(a, max(grid.bits) if a == "bits" else 1.0) / (DENSE_BITS if a == "bits" else 1.0))
            for a in AXES}

    def shifted(lam: float) -> dict[str, float]:
        out = {}
        for a in AXES:
            lo, hi, t = levels[a][0], levels[a][-1], base[a]
            v = t + lam * ((hi - t) if lam >= 0 else (t - lo))
            out[a] = min(max(v, lo), hi) * (DENSE_BITS if a == "bits" else 1.0)
        return out

    def keep(lam: float) -> float:
        ctrl = make(shifted(lam))
        return keep_of(ctrl) if keep_of else schedule_keep(ctrl, keep_tables, episode, rows)

    lo, hi = -1.0, 1.0
    if keep(hi) <= goal:
        return shifted(hi)
    if keep(lo) >= goal:
        return shifted(lo)
    for _ in range(iters):  # invariant: keep(lo) < goal <= keep(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if keep(mid) < goal else (lo, mid)
    return shifted(min((lo, hi), key=lambda x: abs(keep(x) - goal)))


def schedule_keep(ctrl: Controller, keep_tables: list[torch.Tensor], episode: int, rows: int = 1) -> float:
    """Mean FLOP keep of a content-agnostic schedule (matched, random) over ``rows`` blocks whose steps have these
    per-step keep tables, episodes of ``episode`` steps (every step effective, as at any context past the sinks and
    window)."""
    from types import SimpleNamespace

    total, T = 0.0, len(keep_tables)
    ids = torch.arange(rows)
    for start in range(0, T, episode):
        n = min(episode, T - start)
        ctrl.start_episode(rows, torch.ones(rows))
        for t in range(n):
            state = SimpleNamespace(batch=rows, remaining=torch.full((rows,), n - t), rows=ids, offset=start)
            total += float(keep_tables[start + t][ctrl.act(state)].sum())
    return total / (T * rows)
