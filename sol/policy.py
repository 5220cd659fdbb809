"""The SOL policy: a small causal transformer run one step per decode step, with its own KV cache.

Inputs at decision step t (taken *before* the LM processes token x_t):
  h      LM final-norm hidden state of the previous position          [D_lm]
  e      LM input embedding of the current token                      [D_lm]
  s      scalars: (t+1)/T, effective flag, budgets c, running realised usage − c   [2 + 2·n_budget]
         (+ with ``difficulty_vocab`` > 0: the entropy and the top-1 probability of the LM's previous logits, signals
         of how hard the step is; ours, not the paper's; their softmax over the vocabulary counts as V MACs a step)
  a_prev previous (effective) action id, BOS = A at the episode start
x = obs_proj([h ‖ e ‖ scalar_proj(s) ‖ action_emb(a_prev)]) + pos_emb[t] → pre-LN blocks → ln_f
logits = (pi(x) + budget_head(c)) / τ

``n_budget`` is 1 in FLOP-keep mode (the single scalar budget) and 3 in paper mode (token keep, prune keep, b/16).
:meth:`Policy.forward_sequence` (all T steps with a causal mask, used by the update) and :meth:`Policy.step` (one
step with a KV cache, used in rollouts and at inference) compute the same logits (test).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sol.actions import ActionGrid
from sol.controllers import Controller
from sol.errors import SolError


@dataclass
class PolicyConfig:
    d_lm: int
    n_actions: int
    n_budget: int = 1
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 1
    max_len: int = 1024
    action_dim: int = 32
    scalar_hidden: int = 64
    temperature: float = 1.3
    difficulty_vocab: int = 0  # > 0: two difficulty inputs from the LM's previous logits over this vocabulary

    @property
    def scalar_dim(self) -> int:
        return 2 + 2 * self.n_budget + (2 if self.difficulty_vocab else 0)

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache: dict | None = None):
        """x [B, T, d]. With ``cache`` (a dict holding 'k', 'v' of earlier steps) attend to them too."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        causal = cache is None or T > 1
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal and k.shape[2] == T)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class Policy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.scalar_proj = nn.Sequential(nn.Linear(cfg.scalar_dim, cfg.scalar_hidden), nn.GELU(),
                                         nn.LayerNorm(cfg.scalar_hidden))
        self.action_emb = nn.Embedding(cfg.n_actions + 1, cfg.action_dim)  # id n_actions = BOS
        self.obs_proj = nn.Linear(2 * cfg.d_lm + cfg.scalar_hidden + cfg.action_dim, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.pi = nn.Linear(cfg.d_model, cfg.n_actions)
        self.budget_head = nn.Sequential(nn.Linear(cfg.n_budget, 32), nn.GELU(), nn.Linear(32, cfg.n_actions))
        nn.init.zeros_(self.pi.bias)

    @property
    def bos(self) -> int:
        return self.cfg.n_actions

    def _embed(self, h, e, s, prev, t0: int):
        T = h.shape[1]
        prev = torch.where(prev < 0, torch.full_like(prev, self.bos), prev)
        x = self.obs_proj(torch.cat([h, e, self.scalar_proj(s), self.action_emb(prev)], -1))
        pos = torch.arange(t0, t0 + T, device=h.device).clamp(max=self.cfg.max_len - 1)
        return x + self.pos_emb(pos)

    def _head(self, x, budgets):
        logits = self.pi(self.ln_f(x)) + self.budget_head(budgets).unsqueeze(-2)
        return logits / self.cfg.temperature

    def forward_sequence(self, h, e, s, prev, budgets):
        """h, e [B,T,D_lm]; s [B,T,S]; prev [B,T] long; budgets [B,n_budget] → logits [B,T,A]."""
        x = self._embed(h, e, s, prev, 0)
        for blk in self.blocks:
            x = blk(x)
        return self._head(x, budgets)

    def forward(self, h, e, s, prev, budgets):  # what DDP wraps
        return self.forward_sequence(h, e, s, prev, budgets)

    def new_state(self) -> dict:
        return {"t": 0, "caches": [dict() for _ in self.blocks]}

    def step(self, state: dict, h, e, s, prev, budgets):
        """One step: h, e [B,D_lm]; s [B,S]; prev [B]; budgets [B,n_budget] → logits [B,A]. Updates ``state``."""
        x = self._embed(h.unsqueeze(1), e.unsqueeze(1), s.unsqueeze(1), prev.unsqueeze(1), state["t"])
        for blk, c in zip(self.blocks, state["caches"]):
            x = blk(x, c)
        state["t"] += 1
        return self._head(x, budgets)[:, 0]

    def step_macs(self, context: int = 16) -> int:
        """MACs of one step: every Linear once + attention over ``context`` cached steps."""
        lin = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return lin + 2 * self.cfg.d_model * context * len(self.blocks) + self.cfg.difficulty_vocab


def size_for(d_lm: int, n_actions: int, lm_step_macs: float, max_fraction: float = 0.02, **kw) -> PolicyConfig:
    """The largest d_model in {512, 384, 256, 192, 128, 96, 64} whose step MACs are ≤ max_fraction of the LM's."""
    for d in (512, 384, 256, 192, 128, 96, 64):
        cfg = PolicyConfig(d_lm=d_lm, n_actions=n_actions, d_model=d, **kw)
        if Policy(cfg).step_macs() <= max_fraction * lm_step_macs:
            return cfg
    return PolicyConfig(d_lm=d_lm, n_actions=n_actions, d_model=64, **kw)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



class PolicyController(Controller):
    """Runs a :class:`Policy` as a controller. ``budget_mode="flop"``: conditioned on the requested FLOP keep
    (``state.budget``); ``"paper"``: on per-axis targets (token keep, prune keep, b/16) set with :meth:`set_targets`.

    With ``record=True`` it keeps every step's inputs, actions and log-probs for the GRPO update.
    With a ``teacher`` (a controller, e.g. the greedy KL oracle) the teacher picks every action and the policy is not
    run: the recorded inputs are what the policy would see along the teacher's trajectory, the labels of oracle
    supervision (``sol.train``: ``oracle_init_blocks``).
    """

    name = "policy"

    def __init__(self, policy: Policy, grid: ActionGrid, budget_mode: str = "flop", greedy: bool = True,
                 generator: torch.Generator | None = None, record: bool = False, bias: dict | None = None,
                 track_budget: bool = False, teacher: Controller | None = None):
        super().__init__(grid)
        self.track_budget = track_budget
        self.teacher = teacher
        self.needs_probe = getattr(teacher, "needs_probe", False)
        if budget_mode not in ("flop", "paper"):
            raise SolError(f"unknown budget_mode '{budget_mode}': use flop or paper")
        self.policy, self.budget_mode, self.greedy, self.gen, self.record = policy, budget_mode, greedy, generator, record
        t = grid.tensors()
        self.axis_values = torch.stack([t["token_keep"], t["prune_keep"], t["bits"] / 16], -1).float()  # [A, 3]
        self.targets = None
        self.bias = torch.zeros(len(grid))
        for axis, strength in (bias or {}).items():  # positive strength favours cheaper actions on that axis
            v = self.axis_values[:, ("token_keep", "prune_keep", "bits").index(axis)]
            self.bias -= strength * (v - v.min()) / (v.max() - v.min()).clamp_min(1e-9)
        self.trace: list[dict] = []

    def set_targets(self, targets: torch.Tensor) -> None:
        """Paper mode: per-row targets [B, 3] = (token keep, prune keep, bits/16)."""
        self.targets = targets.float()

    def start_episode(self, n_rows, budget):
        if self.teacher is not None:
            self.teacher.start_episode(n_rows, budget)
        self.state = self.policy.new_state()
        self.sums = torch.zeros(n_rows, self.policy.cfg.n_budget)
        self.n = 0
        self.c = budget.float().view(-1, 1) if self.budget_mode == "flop" else self.targets
        if self.c is None:
            raise SolError("paper budget mode needs per-axis targets (set_targets) before a rollout")

    def act(self, state):
        c = self.c
        dev = self.sums / self.n - c if self.n else torch.zeros_like(c)
        t_frac = ((state.t + 1) / state.episode_len.float()).view(-1, 1)
        s = torch.cat([t_frac, torch.ones(state.batch, 1), c, dev], -1)
        if self.policy.cfg.difficulty_vocab:
            s = torch.cat([s, difficulty(state.prev_logits)], -1)
        if self.teacher is not None:  # the teacher acts; record what the policy would have seen
            a = self.teacher.act(state)
            self.trace.append(dict(h=state.hidden, e=state.embedding, s=s, prev=state.prev_action.clone(), a=a))
        else:
            with torch.no_grad():
                raw = self.policy.step(self.state, state.hidden, state.embedding, s, state.prev_action, c) + self.bias
            logits = raw
            if self.track_budget and self.budget_mode == "flop":
                logits = tilt_to_budget(raw, state.keep_table, self.c[:, 0], self.sums[:, 0], self.n, state.remaining)
            if self.greedy:
                a = logits.argmax(-1)
            else:
                a = torch.multinomial(logits.softmax(-1), 1, generator=self.gen).squeeze(-1)
            if self.record:
                self.trace.append(dict(h=state.hidden, e=state.embedding, s=s, prev=state.prev_action.clone(), a=a,
                                       tilt=logits - raw,
                                       logp=logits.log_softmax(-1).gather(-1, a[:, None]).squeeze(-1)))
        used = state.keep_table.gather(1, a[:, None]) if self.budget_mode == "flop" else self.axis_values[a]
        self.sums += used
        self.n += 1
        return a

    def step_macs(self) -> int:
        return self.policy.step_macs()


def difficulty(logits: torch.Tensor) -> torch.Tensor:
    """[B, 2]: entropy (nats) and top-1 probability of the LM's next-token distribution from ``logits [B, V]``."""
    lp = logits.float().log_softmax(-1)
    return torch.stack([-(lp.exp() * lp).sum(-1), lp.max(-1).values.exp()], -1)


def tilt_to_budget(logits: torch.Tensor, keep: torch.Tensor, budget: torch.Tensor, spent: torch.Tensor, n: int,
                   remaining: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Budget tracking on top of a policy (``policy-tracked``): per row (``keep`` [B, A]), the required keep for the rest of the episode
    c_req = (c·(n + R) − spent)/R and the tilt λ with E_{softmax(z − λ·keep)}[keep] = c_req (bisection); returns the
    tilted logits z − λ·keep. The policy still ranks actions (where compute goes); the tilt only enforces how much,
    like the budget-tracking chooser the EMC/DAC baselines use (reference §8.4). A row whose required keep is at or
    below the grid's cheapest action (at or above its costliest) gets that action outright: no finite tilt guarantees
    it against large logit gaps, and a budget below the floor must realise the floor."""
    R = torch.as_tensor(remaining).clamp(min=1).float()
    need = (budget * (n + R) - spent) / R
    lo_keep, hi_keep = keep.min(-1).values, keep.max(-1).values
    req = torch.minimum(torch.maximum(need, lo_keep), hi_keep)
    lo = torch.full_like(req, -200.0)
    hi = torch.full_like(req, 200.0)
    z = logits.float()
    for _ in range(iters):
        lam = (lo + hi) / 2
        mean = ((z - lam[:, None] * keep).softmax(-1) * keep).sum(-1)
        too_expensive = mean > req
        lo = torch.where(too_expensive, lam, lo)
        hi = torch.where(too_expensive, hi, lam)
    out = z - ((lo + hi) / 2)[:, None] * keep
    # outright at the ends: the other actions get a large finite penalty (−inf would make 0·log 0 = NaN in training)
    floor = (need <= lo_keep + 1e-9)[:, None] & (keep > lo_keep[:, None] + 1e-9)
    ceiling = (need >= hi_keep - 1e-9)[:, None] & (keep < hi_keep[:, None] - 1e-9)
    return out - 1e4 * (floor | ceiling)
