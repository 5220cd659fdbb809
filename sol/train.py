"""GRPO training of the SOL policy on teacher-forced counterfactual schedules (``sol train --config ...``).

One update:
  1. sample ``blocks_per_update`` train blocks of context + episode + 1 tokens and a budget per block;
  2. dense prefill of each block once, decode it as ``rollouts`` = K rows (K counterfactual schedules sampled from the
     policy, per-row actions, teacher forcing: the token path is fixed, only the actions differ);
  3. reward r_t = ``logp_weight``·log p(y_t) under the approximated step − ``kl_weight``·KL(dense ‖ approx) (KL is
     the label-free, lower-variance damage signal the KL oracle uses; the reference used log p alone); returns
     G_t = Σ_k γ^(k−t) r_k; one budget penalty per rollout, α·max(|realised − target| − tol, 0)², on FLOP keep
     (``budget_mode: flop``) or summed per axis (``paper``), subtracted at every t;
     With ``track_budget: true`` the rollouts use the budget tracker (``policy-tracked``): the policy's logits are
     tilted by λ·keep so that each episode meets its budget, the tilt is recorded and added again in the update (it
     is part of the sampling distribution, so the PPO ratio stays exact). The penalty then hardly ever fires and the
     policy learns only *where* to spend; a checkpoint trained this way always runs with its tracker.
  4. advantages centred within each group of K (per step: ``process``; or on the episode total: ``outcome``), then
     whitened over the batch;
  5. PPO-clip surrogate + entropy bonus, ``ppo_epochs`` passes over ``minibatches`` minibatches, an AdamW step per
     minibatch, so the importance ratio really moves. ``faithful_update: true`` reproduces the reference instead:
     one pass, gradients accumulated over all minibatches, a single step (the ratio is then ≡ 1).

All randomness of update u comes from a generator seeded with (seed, rank, u), so a run resumed from a checkpoint
reproduces the uninterrupted run bitwise on CPU. Checkpoints are written atomically every ``checkpoint_every``
updates and hold the config, model id, action grid and settings; loading one against another model or grid fails.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sol.actions import GRIDS, ActionGrid, ActionSettings, grid_from
from sol.config import config_hash, from_dict, load_yaml
from sol import prefix
from sol.cost import CostModel
from sol.engine import Engine
from sol.errors import SolError
from sol.io import atomic_path, write_csv, write_text
from sol.policy import Policy, PolicyConfig, PolicyController, n_params, size_for
from sol.runtime import Runtime

DEFAULT_GRID = GRIDS["default"]
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    data: str = "enwiki"
    context: int = 256
    episode: int = 16
    blocks_per_update: int = 4
    rollouts: int = 8
    updates: int = 150
    grid: dict | str = field(default_factory=lambda: dict(DEFAULT_GRID))
    criterion: str = "quest"
    page_size: int = 8
    sinks: int = 4
    window: int = 8
    faithful_actions: bool = False
    budget_mode: str = "flop"
    budget_range: list[float] = field(default_factory=lambda: [0.55, 1.0])
    paper_ranges: dict[str, list[float]] = field(default_factory=lambda: {"token_keep": [0.1, 1.0], "prune_keep": [0.4, 1.0],
                                                         "bits": [5, 16]})
    gamma: float = 0.85
    logp_weight: float = 1.0
    kl_weight: float = 0.0
    track_budget: bool = False
    penalty: float = 200.0
    tolerance: float = 0.02
    advantage: str = "process"
    whiten: bool = True
    ppo_epochs: int = 2
    minibatches: int = 4
    clip: float = 0.2
    entropy: float = 0.01
    lr: float = 3e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 1.3
    d_model: int | None = None
    n_layers: int = 1
    n_heads: int = 4
    faithful_update: bool = False
    checkpoint_every: int = 25
    seed: int = 0
    threads: int | None = None
    tensorboard: bool = False
    device: str = "cpu"        # the LM's device; the policy and the GRPO bookkeeping stay on the CPU
    # Oracle supervision (ours, not the paper's; 0 = the paper's recipe): before GRPO, label this many train blocks
    # (one episode each, a budget drawn from budget_range per block) with the greedy KL oracle's actions and pre-train
    # the policy on (its inputs along the oracle's trajectory → the oracle's action) by cross-entropy. The checkpoint
    # is then the `policy-os` variant.
    difficulty_inputs: bool = False  # ours: the policy also reads the entropy and top-1 probability of the LM's
                                     # previous logits (PolicyConfig.difficulty_vocab)
    oracle_init_blocks: int = 0
    oracle_init_epochs: int = 30
    oracle_init_lr: float = 1e-3

    def __post_init__(self):
        checks = [
            (self.budget_mode in ("flop", "paper"), f"budget_mode '{self.budget_mode}' (use flop or paper)"),
            (self.advantage in ("process", "outcome"), f"advantage '{self.advantage}' (use process or outcome)"),
            (self.context >= 1 and self.episode >= 1, "context and episode must be >= 1"),
            (self.rollouts >= 2, "rollouts must be >= 2 (advantages are centred within each group)"),
            (len(self.budget_range) == 2 and 0 < self.budget_range[0] <= self.budget_range[1] <= 1,
             f"budget_range {self.budget_range} must be [lo, hi] within (0, 1]"),
            (self.rollouts * self.blocks_per_update >= self.minibatches, "fewer sequences than minibatches"),
            (self.oracle_init_blocks >= 0 and self.oracle_init_epochs >= 1 and self.oracle_init_lr > 0,
             "oracle_init_blocks must be >= 0, oracle_init_epochs >= 1 and oracle_init_lr > 0"),
            (not self.oracle_init_blocks or self.budget_mode == "flop",
             "oracle supervision labels FLOP-keep budgets only (budget_mode: flop)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SolError(f"bad train config: {msg}")

    def settings(self) -> ActionSettings:
        return ActionSettings(self.criterion, self.page_size, self.sinks, self.window, self.faithful_actions)

    def action_grid(self) -> ActionGrid:
        return grid_from(self.grid)


def load_config(path: str | None, overrides: dict | None = None) -> TrainConfig:
    data = load_yaml(path) if path else {}
    data = dict(data.get("train", data))
    data.update(overrides or {})
    return from_dict(TrainConfig, data, "train config")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, policy: Policy, optimizer, update: int, cfg: TrainConfig, meta: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "policy": policy.state_dict(),
               "optimizer": optimizer.state_dict() if optimizer is not None else None, "update": update,
               "train_config": dataclasses.asdict(cfg), "policy_config": policy.cfg.to_dict(), **meta}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SolError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise SolError(f"corrupt checkpoint {path}: {type(e).__name__}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "policy" not in ck:
        raise SolError(f"corrupt checkpoint {path}: not a SOL policy checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def load_policy(path: str | Path, model_name: str | None = None, grid: ActionGrid | None = None
                ) -> tuple[Policy, dict]:
    """A trained policy and its checkpoint metadata; refuses a checkpoint made for another model or grid."""
    ck = read_checkpoint(path)
    if model_name is not None and ck["model"] != model_name:
        raise SolError(f"policy {path} was trained for model '{ck['model']}', not '{model_name}'")
    if grid is not None and ck["grid"] != grid.to_config():
        raise SolError(f"policy {path} was trained on action grid {ck['grid']}, not {grid.to_config()}")
    policy = Policy(PolicyConfig(**ck["policy_config"]))
    try:
        policy.load_state_dict(ck["policy"])
    except RuntimeError as e:
        raise SolError(f"corrupt checkpoint {path}: {str(e).splitlines()[0]}") from None
    return policy.eval(), ck


# ------------------------------------------------------------------------------------------------------------------
# The update
# ------------------------------------------------------------------------------------------------------------------

def discounted_returns(r: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k≥t} γ^(k−t) r_k over the last dimension."""
    out = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + gamma * acc
        out[..., t] = acc
    return out


def advantages(R: torch.Tensor, K: int, level: str, whiten: bool) -> torch.Tensor:
    """R [B·K, T] (rows grouped by block) → advantages centred within each group of K, optionally whitened."""
    BK, T = R.shape
    g = R.view(BK // K, K, T)
    if level == "outcome":
        total = g.sum(-1, keepdim=True)
        A = (total - total.mean(1, keepdim=True)).expand(-1, -1, T)
    else:
        A = g - g.mean(1, keepdim=True)
    A = A.reshape(BK, T)
    if whiten:
        A = (A - A.mean()) / A.std().clamp_min(1e-8)
    return A


def budget_penalty(realised: torch.Tensor, target: torch.Tensor, alpha: float, tol: float) -> torch.Tensor:
    """α·max(|realised − target| − tol, 0)², summed over axes (last dim)."""
    return (alpha * ((realised - target).abs() - tol).clamp_min(0) ** 2).sum(-1)


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, model=None, tokenizer=None, model_name: str | None = None):
        from sol import data
        from sol.models import load

        self.cfg, self.out = cfg, Path(out)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        if model is None:
            model, tokenizer = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.model_name = model_name or cfg.model
        self.grid = cfg.action_grid()
        self.engine = Engine(model, cfg.settings(), mode="simulate")
        self.runtime = Runtime(self.engine, self.grid)
        self.cost = self.runtime.cost
        self.blocks = torch.from_numpy(data.blocks(cfg.data, "train", tokenizer, cfg.context + cfg.episode + 1))
        lm_macs = self.cost.dense_macs(cfg.context + cfg.episode)
        n_budget = 1 if cfg.budget_mode == "flop" else 3
        kw = dict(n_budget=n_budget, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=max(64, cfg.episode),
                  temperature=cfg.temperature,
                  difficulty_vocab=model.config.vocab_size if cfg.difficulty_inputs else 0)
        pcfg = (PolicyConfig(d_lm=model.config.hidden_size, n_actions=len(self.grid), d_model=cfg.d_model, **kw)
                if cfg.d_model else size_for(model.config.hidden_size, len(self.grid), lm_macs, **kw))
        torch.manual_seed(cfg.seed)
        self.policy = Policy(pcfg)
        self.module = self.policy
        if self.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(self.policy)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.update = 0
        self.meta = {"model": self.model_name, "grid": self.grid.to_config(),
                     "settings": dataclasses.asdict(cfg.settings()), "budget_mode": cfg.budget_mode,
                     "track_budget": cfg.track_budget,
                     "variant": "policy-os" if cfg.oracle_init_blocks else "policy",
                     "config_hash": config_hash(cfg), "policy_macs": self.policy.step_macs(),
                     "lm_dense_macs": lm_macs, "policy_params": n_params(self.policy)}
        self.metrics: list[dict] = []

    # --- checkpoints --------------------------------------------------------------------------------------------
    @property
    def latest(self) -> Path:
        return self.out / "policy_latest.pt"

    def try_resume(self) -> bool:
        if not self.latest.is_file():
            return False
        ck = read_checkpoint(self.latest)
        if ck.get("config_hash") != self.meta["config_hash"]:
            raise SolError(f"{self.latest} was written by a different config; use another --out or remove it")
        self.policy.load_state_dict(ck["policy"])
        self.opt.load_state_dict(ck["optimizer"])
        self.update = ck["update"]
        self.metrics = ck.get("metrics", [])
        if "oracle_init" in ck:
            self.meta["oracle_init"] = ck["oracle_init"]
        return True

    def checkpoint(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.latest, self.policy, self.opt, self.update, self.cfg,
                            {**self.meta, "metrics": self.metrics})
            self._write_metrics()

    def _write_metrics(self):
        if not self.metrics:
            return
        with atomic_path(self.out / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.metrics[0]))
                w.writeheader()
                w.writerows(self.metrics)

    # --- one update ---------------------------------------------------------------------------------------------
    def sample_budgets(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-block FLOP-keep budgets [n], and per-axis targets [n, 3] in paper mode."""
        c = self.cfg
        lo, hi = c.budget_range
        flop = lo + (hi - lo) * torch.rand(n, generator=g)
        if c.budget_mode == "flop":
            return flop, None
        cols = []
        for axis in ("token_keep", "prune_keep", "bits"):
            a, b = c.paper_ranges[axis]
            if axis == "bits":
                a, b = a / 16, b / 16
            cols.append(a + (b - a) * torch.rand(n, generator=g))
        return flop, torch.stack(cols, -1)

    def collect(self, g: torch.Generator):
        c, K = self.cfg, self.cfg.rollouts
        idx = torch.randperm(len(self.blocks), generator=g)[: c.blocks_per_update]
        blocks = self.blocks[idx]
        flop, targets = self.sample_budgets(g, len(idx))
        ctrl = PolicyController(self.policy, self.grid, c.budget_mode, greedy=False, generator=g, record=True,
                                track_budget=c.track_budget)
        if targets is not None:
            targets = targets.repeat_interleave(K, 0)
            ctrl.set_targets(targets)
        budget = flop.repeat_interleave(K, 0)
        # one dense prefill per block serves its K rollouts and the dense reference of the KL reward
        pre = prefix.compute(self.engine, blocks, c.context, c.episode, progress=False)  # per update: no bar
        ro = self.runtime.score(blocks, ctrl, budget, c.context, c.episode, max_rows=len(budget), rollouts=K,
                                keep_distributions=c.kl_weight > 0, prefix=pre)
        r = c.logp_weight * ro.logprobs
        if c.kl_weight > 0:
            p_dense = prefix.dense_log_distributions(self.engine, pre, blocks).repeat_interleave(K, 0)
            kl = (p_dense.exp() * (p_dense - ro.extras["log_distributions"])).sum(-1)
            r = r - c.kl_weight * kl
        if c.budget_mode == "flop":
            realised, target = ro.mean_flop_keep().view(-1, 1), budget.view(-1, 1)
        else:
            realised, target = ctrl.sums / max(ctrl.n, 1), ctrl.targets
        pen = budget_penalty(realised, target, c.penalty, c.tolerance)
        R = discounted_returns(r, c.gamma) - pen.view(-1, 1)
        A = advantages(R, K, c.advantage, c.whiten)
        trace = {k: torch.stack([s[k] for s in ctrl.trace], 1) for k in ctrl.trace[0]}
        cond = budget.view(-1, 1) if c.budget_mode == "flop" else target
        return trace, A, cond, dict(logp=ro.logprobs.mean().item(), budget_err=(realised - target).abs().mean().item(),
                                    penalty=pen.mean().item(), flop_keep=ro.mean_flop_keep().mean().item())

    def learn(self, g: torch.Generator, trace, A, cond) -> dict:
        c = self.cfg
        n = A.shape[0]
        epochs = 1 if c.faithful_update else c.ppo_epochs
        stats = {"loss": [], "entropy": [], "ratio_max_dev": [], "clip_frac": []}
        self.policy.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            if c.faithful_update:
                self.opt.zero_grad()
            for mb in perm.chunk(c.minibatches):
                logits = (self.module(trace["h"][mb], trace["e"][mb], trace["s"][mb], trace["prev"][mb], cond[mb])
                          + trace["tilt"][mb])
                logp_all = logits.log_softmax(-1)
                logp = logp_all.gather(-1, trace["a"][mb].unsqueeze(-1)).squeeze(-1)
                ratio = (logp - trace["logp"][mb]).exp()
                adv = A[mb]
                surr = torch.min(ratio * adv, ratio.clamp(1 - c.clip, 1 + c.clip) * adv)
                ent = -(logp_all.exp() * logp_all).sum(-1)
                loss = -surr.mean() - c.entropy * ent.mean()
                if c.faithful_update:
                    (loss / c.minibatches).backward()
                else:
                    self.opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                    self.opt.step()
                stats["loss"].append(loss.item())
                stats["entropy"].append(ent.mean().item())
                stats["ratio_max_dev"].append((ratio - 1).abs().max().item())
                stats["clip_frac"].append(((ratio - 1).abs() > c.clip).float().mean().item())
            if c.faithful_update:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.opt.step()
        self.policy.eval()
        return {"loss": float(np.mean(stats["loss"])), "entropy": float(np.mean(stats["entropy"])),
                "ratio_max_dev": float(np.max(stats["ratio_max_dev"])), "clip_frac": float(np.mean(stats["clip_frac"]))}

    # --- oracle supervision (ours) -------------------------------------------------------------------------------
    def oracle_labels(self, rows: int = 32) -> dict[str, torch.Tensor]:
        """The policy's inputs along the greedy KL oracle's trajectory on ``oracle_init_blocks`` train blocks (one
        episode each, a seeded budget per block), and the oracle's actions: h, e [N, T, D], s [N, T, S], prev, a
        [N, T], cond [N, 1]. The oracle runs its candidates as rows (``Engine.step_alternatives``)."""
        from sol.oracles import GreedyOracle

        c = self.cfg
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + 999_983)  # apart from every update's stream
        idx = torch.randperm(len(self.blocks), generator=g)[: c.oracle_init_blocks]
        blocks = self.blocks[idx]
        budget, _ = self.sample_budgets(g, len(idx))
        parts = []
        for i in tqdm(range(0, len(blocks), rows), desc="oracle labels", disable=self.rank != 0):
            ctrl = PolicyController(self.policy, self.grid, "flop", teacher=GreedyOracle(self.grid, horizon=1))
            self.runtime.rollout(blocks[i:i + rows], ctrl, budget[i:i + rows], c.context, c.episode)
            parts.append({k: torch.stack([step[k] for step in ctrl.trace], 1) for k in ctrl.trace[0]})
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        data["cond"] = budget.view(-1, 1)
        return data

    def oracle_init(self) -> list[dict]:
        """Pre-train the policy on the oracle's labels (cross-entropy, AdamW, seeded minibatches of 16 episodes);
        per epoch: loss and agreement with the oracle (argmax)."""
        c = self.cfg
        d = self.oracle_labels()
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + 999_979)
        opt = torch.optim.AdamW(self.policy.parameters(), lr=c.oracle_init_lr, weight_decay=c.weight_decay)
        n, log = len(d["a"]), []
        self.policy.train()
        for epoch in range(c.oracle_init_epochs):
            losses, hits = [], []
            for mb in torch.randperm(n, generator=g).split(16):
                logits = self.policy.forward_sequence(d["h"][mb], d["e"][mb], d["s"][mb], d["prev"][mb], d["cond"][mb])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), d["a"][mb].flatten())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                opt.step()
                losses.append(loss.item())
                hits.append((logits.argmax(-1) == d["a"][mb]).float().mean().item())
            log.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "agreement": float(np.mean(hits)),
                        "labels": int(d["a"].numel()), "distinct_oracle_actions": int(d["a"].unique().numel())})
        self.policy.eval()
        return log

    def run(self) -> Path:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        if c.oracle_init_blocks and not resumed:  # once, before GRPO; checkpointed, so a resumed run skips it
            self.meta["oracle_init"] = self.oracle_init()
            write_csv(self.out / "oracle_init.csv", pd.DataFrame(self.meta["oracle_init"]))
            self.checkpoint()
        writer = None
        if c.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.out / "tb")
        kill_after = int(os.environ.get("SOL_TEST_KILL_AFTER", "0"))  # tests: SIGKILL after this update's checkpoint
        bar = tqdm(total=c.updates, initial=self.update, desc=f"train {self.model_name}" + (" (resumed)" if resumed else ""),
                   disable=self.rank != 0)
        while self.update < c.updates:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.rank * 7919 + self.update)
            trace, A, cond, m = self.collect(g)
            m.update(self.learn(g, trace, A, cond))
            steps = A.numel()
            m.update(update=self.update + 1, steps_per_s=steps / (time.perf_counter() - t0))
            self.metrics.append({k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()})
            self.update += 1
            if writer:
                for k, v in m.items():
                    writer.add_scalar(k, v, self.update)
            bar.set_postfix(reward=f"{m['logp']:.3f}", budget_err=f"{m['budget_err']:.3f}",
                            entropy=f"{m['entropy']:.2f}", steps_s=f"{m['steps_per_s']:.0f}")
            bar.update(1)
            if self.update % c.checkpoint_every == 0 or self.update == c.updates:
                self.checkpoint()
                if kill_after and self.update >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        final = self.out / "policy.pt"
        if self.rank == 0:
            save_checkpoint(final, self.policy, None, self.update, c, {**self.meta, "metrics": self.metrics})
            write_text(self.out / "train_config.yaml", _yaml(dataclasses.asdict(c)))
        if writer:
            writer.close()
        return final


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
