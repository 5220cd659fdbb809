"""The controller interface shared by the policy, the baselines and the oracles.

Before every decode step the runtime hands a controller one :class:`StepState` (a batch of rows) and gets back one
action id per row. Everything else — prefill, KV cache, dense refresh, forcing non-effective steps dense, cost
accounting — is the runtime's job and identical for every controller, so comparisons differ only in the controller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sol.actions import Action, ActionGrid


@dataclass
class StepState:
    t: int                     # step index within the current episode
    episode_len: torch.Tensor  # [B] steps in this episode per row (dense refresh after each; shorter at a row's end)
    kv_len: int                # cache slots the step attends over (current token included; rows of a ragged
                               # batch may hold fewer tokens, see Runtime.rollout(pad=...))
    effective: bool            # False: the runtime forces the dense action (kv_len <= sinks + window + 1)
    hidden: torch.Tensor       # [B, D] LM final-norm hidden state of the previous position
    token: torch.Tensor        # [B] current input token ids
    embedding: torch.Tensor    # [B, D] LM input embedding of the current token
    prev_logits: torch.Tensor  # [B, V] LM logits of the previous position (predicting the current token)
    budget: torch.Tensor       # [B] requested mean FLOP keep
    spent: torch.Tensor        # [B] sum of realised FLOP keep over this episode's effective steps so far
    n_effective: int           # effective steps so far in this episode
    prev_action: torch.Tensor  # [B] previous (effective) action id, -1 at the episode start
    keep_table: torch.Tensor   # [B, A] FLOP keep of every grid action at each row's key length
    probe: object = None       # oracles only: probe(actions [B], horizon) → (NLL [B], log-softmax per step) of this
                               # step + horizon−1 dense teacher-forced steps (non-causal: it reads future tokens)
    rows: torch.Tensor | None = None  # [B] which block of the scored set each row decodes (same for every batching)
    offset: int = 0            # step index, within its block, of this episode's first step

    @property
    def batch(self) -> int:
        return self.token.shape[0]

    @property
    def remaining(self) -> torch.Tensor:
        """[B] effective steps left in the episode, this one included (assumes the rest are effective), ≥ 1."""
        return (self.episode_len - self.t).clamp(min=1)


class Controller:
    """Base class: override :meth:`act`; :meth:`start_episode` is called before each episode's first step."""

    name = "controller"
    open_loop = False  # True: act() reads no LM output (hidden, embedding, prev_logits, probe are None for it), so
                       # the runtime may decide a whole episode first and run its steps as one causal LM call

    def __init__(self, grid: ActionGrid):
        self.grid = grid

    def start_episode(self, n_rows: int, budget: torch.Tensor) -> None:  # noqa: D401 - hook
        """Reset per-episode state (the policy resets its own KV cache here)."""

    def act(self, state: StepState) -> torch.Tensor:
        raise NotImplementedError

    def step_macs(self) -> int:
        """MACs the controller itself spends per decode step (counted into the total cost)."""
        return 0


class Dense(Controller):
    name = "dense"
    open_loop = True

    def act(self, state: StepState) -> torch.Tensor:
        return torch.full((state.batch,), self.grid.dense_index, dtype=torch.long)


class FixedAction(Controller):
    """The same grid action at every step (true uniform compression when the action is one level per axis)."""

    open_loop = True

    def __init__(self, grid: ActionGrid, action: Action):
        super().__init__(grid)
        self.action = action
        self.index = grid.index(action)
        self.name = f"fixed:{action.tag}"

    def act(self, state: StepState) -> torch.Tensor:
        return torch.full((state.batch,), self.index, dtype=torch.long)
