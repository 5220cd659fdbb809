"""Controllers by name: one spec string selects the policy, a baseline or dense everywhere (CLI, configs, lm-eval).

=================================================  ==================================================================
spec                                               controller
=================================================  ==================================================================
``dense``                                          the dense action at every step
``uniform:K,P,B``                                  true uniform compression: action (κ=K, ρ=P, bits=B) at every step
``matched:token_keep=…,prune_keep=…,bits=…``       the reference's fixed two-level mix matched per axis (``grid=``
                                                   names the grid, default J-FL)
``random:…,seed=S``                                the matched multiset randomly permuted per row (seeded)
``emc:…`` / ``dac:…``                              entropy / hidden-drift controllers with the budget-tracking chooser
``policy:PATH``                                    a trained SOL policy (greedy), conditioned on ``--budget``
``policy-tracked:PATH``                            the same policy with budget tracking: its logits are tilted by
                                                   λ·keep so the expected keep meets the episode's remaining budget
                                                   (the policy decides where, the tracker how much)
``policy-os:PATH``                                 ours: a policy pre-trained on the greedy KL oracle's actions, then
                                                   GRPO (train key ``oracle_init_blocks``); the paper's recipe is
                                                   ``policy``
``weights:bits=4,group=128``                       static group-wise RTN weight quantisation (dense actions)
``heads:keep=0.75``                                fixed head pruning: keep the most important 75 % of query heads
                                                   per layer (importance from the validation split)
``oracle-greedy:grid=default,horizon=2,score=kl``  non-causal bound: per step the action minimising lookahead damage
                                                   (KL to dense, or ``score=nll``) + λ·keep under budget tracking
``oracle-ranked:axis=prune_keep,low=0.5,high=1``   non-causal bound: high level at the most damaged positions
=================================================  ==================================================================

Options may be separated by ``;`` or ``/`` instead of ``,`` (lm-eval's ``--model_args`` splits on commas):
``controller=uniform:1/0.5/8`` or ``controller=matched:grid=J-3L;prune_keep=0.7``. A ``policy:PATH`` must not
contain commas (it is taken verbatim).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sol.actions import Action, ActionGrid, grid_from
from sol.controllers import Controller, Dense, FixedAction
from sol.errors import SolError
from sol.methods import POLICY_KINDS

KINDS = ("dense", "uniform", "matched", "random", "emc", "dac", *POLICY_KINDS, "weights", "heads", "oracle-greedy",
         "oracle-ranked")


@dataclass
class Built:
    controller: Controller
    grid: ActionGrid
    weight_bits: int = 16
    group_size: int = 128
    head_keep: float = 1.0
    uses_budget: bool = False   # True for the policy: --budget conditions it

    @property
    def transform(self) -> tuple:
        """The static model transform this controller runs on (shared by specs with equal transforms)."""
        return (self.weight_bits, self.group_size, self.head_keep)


def _parts(text: str) -> list[str]:
    """Spec options are separated by ',' or, where commas are taken (lm-eval's --model_args), by ';' or '/'."""
    return [p for p in re.split(r"[,;/]", text) if p]


def _kv(text: str) -> dict:
    out = {}
    for part in _parts(text):
        if "=" not in part:
            raise SolError(f"bad controller option '{part}': write key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build(spec: str, model_name: str | None = None) -> Built:
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise SolError(f"unknown controller '{kind}': use one of {', '.join(KINDS)}")
    if kind == "dense":
        g = ActionGrid()
        return Built(Dense(g), g)
    if kind == "uniform":
        try:
            k, p, b = _parts(rest)
            a = Action(float(k), float(p), int(b))
        except ValueError:
            raise SolError(f"bad uniform spec '{spec}': write uniform:token_keep,prune_keep,bits") from None
        g = ActionGrid(token_keep=(a.token_keep, 1.0), prune_keep=(a.prune_keep, 1.0), bits=(a.bits, 16))
        c = FixedAction(g, a)
        c.name = f"uniform:{a.tag}"
        return Built(c, g)
    if kind in POLICY_KINDS:
        from sol.policy import PolicyController
        from sol.train import load_policy

        policy, meta = load_policy(rest, model_name)
        variant = meta.get("variant", "policy")
        if (kind == "policy-os") != (variant == "policy-os"):
            raise SolError(f"{rest} is a '{variant}' checkpoint: use "
                           + ("policy-os:PATH" if variant == "policy-os" else "policy:PATH or policy-tracked:PATH"))
        g = ActionGrid.from_config(meta["grid"])
        track = kind == "policy-tracked" or meta.get("track_budget", False)  # trained with its tracker: always on
        c = PolicyController(policy, g, meta["budget_mode"], greedy=True, track_budget=track)
        c.name = kind
        return Built(c, g, uses_budget=True)
    if kind == "weights":
        opts = _kv(rest)
        g = ActionGrid()
        c = Dense(g)
        bits, group = int(opts.pop("bits", 4)), int(opts.pop("group", 128))
        if opts:
            raise SolError(f"unknown weights option '{sorted(opts)[0]}': use bits, group")
        c.name = f"weights:int{bits}-g{group}"
        return Built(c, g, weight_bits=bits, group_size=group)
    if kind in ("oracle-greedy", "oracle-ranked"):
        from sol.oracles import GreedyOracle, RankedOracle

        opts = _kv(rest)
        if kind == "oracle-greedy":
            g = grid_from(opts.pop("grid", "default"))
            score = opts.pop("score", "kl")
            if score not in ("kl", "nll"):
                raise SolError(f"unknown oracle-greedy score '{score}': use kl or nll")
            c = GreedyOracle(g, horizon=int(opts.pop("horizon", 2)), score=score)
        else:
            axis = opts.pop("axis", "prune_keep")
            low, high = float(opts.pop("low")), float(opts.pop("high", 1.0 if axis != "bits" else 16))
            cast = int if axis == "bits" else float
            g = ActionGrid(**{axis: (cast(low), cast(high))})
            c = RankedOracle(g, Action(**{axis: cast(low)}), Action(**{axis: cast(high)}))
        if opts:
            raise SolError(f"unknown {kind} option '{sorted(opts)[0]}'")
        c.name = kind
        return Built(c, g, uses_budget=True)
    if kind == "heads":
        opts = _kv(rest)
        keep = float(opts.pop("keep", 0.75))
        if opts:
            raise SolError(f"unknown heads option '{sorted(opts)[0]}': use keep")
        g = ActionGrid()
        c = Dense(g)
        c.name = f"heads:keep={keep:g}"
        return Built(c, g, head_keep=keep)
    from baselines.schedules import DriftController, EntropyController, Matched, RandomPermutation

    opts = _kv(rest)
    g = grid_from(opts.pop("grid", "J-FL"))
    seed = int(opts.pop("seed", 0))
    gamma = opts.pop("gamma", None)
    targets = {k: float(v) for k, v in opts.items()}
    if kind == "matched":
        c = Matched(g, targets)
    elif kind == "random":
        c = RandomPermutation(g, targets, seed=seed)
    else:
        cls = EntropyController if kind == "emc" else DriftController
        c = cls(g, targets) if gamma is None else cls(g, targets, float(gamma))
    c.name = spec
    return Built(c, g)
