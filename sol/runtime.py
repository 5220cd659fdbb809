"""The step runtime: dense prefill, then decode steps whose actions a controller picks, with optional dense refresh.

``Runtime.rollout(blocks, controller, budget)`` is the one loop every experiment uses (training episodes, perplexity,
MMLU continuations, baselines, oracles). A block of ``C + T + 1`` tokens is processed as in the reference:

    prefill blocks[:, :C] densely                      (no action argument exists for a prefill)
    for t in 0..T-1:  action = controller(state)       (state: previous hidden, current token, budget, usage, ...)
                      step blocks[:, C+t] under action → log p(blocks[:, C+t+1])
                      every `episode` steps: rewind the KV cache to the episode start and replay the episode's
                      tokens densely (removes KV pollution), then reset the controller's episode state

Steps with kv_len <= sinks + window + 1 are forced dense and excluded from budget averages. Everything the
controller does not decide is identical for every controller.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sol.actions import ActionGrid
from sol.controllers import Controller, StepState
from sol.cost import CostModel
from sol.engine import Engine, KVCache
from sol.prefix import CONTEXTS, dense_prefix


@dataclass
class Rollout:
    """Per-step records of one batch of teacher-forced (or generated) steps."""

    logprobs: torch.Tensor       # [B, T] log p(next token) under the step's action
    actions: torch.Tensor        # [B, T] effective action ids (dense where the step was not effective)
    effective: torch.Tensor      # [T] bool
    flop_keep: torch.Tensor      # [B, T] realised FLOP keep of each step (LM only)
    dense_macs: torch.Tensor     # [B, T] dense step MACs at each step's (row's) key length
    controller_macs: int         # per step, spent by the controller itself
    hidden: torch.Tensor | None = None   # [B, T, D] hidden states the controller saw (if recorded)
    extras: dict = field(default_factory=dict)

    @property
    def nll(self) -> torch.Tensor:
        return -self.logprobs

    def mean_flop_keep(self) -> torch.Tensor:
        """[B] mean realised FLOP keep over effective steps (LM only)."""
        eff = self.effective.float()
        return (self.flop_keep * eff).sum(1) / eff.sum().clamp_min(1)

    def mean_total_keep(self) -> torch.Tensor:
        """[B] like mean_flop_keep but with the controller's own MACs added to every step."""
        eff = self.effective.float()
        extra = self.controller_macs / self.dense_macs
        return ((self.flop_keep + extra) * eff).sum(1) / eff.sum().clamp_min(1)


def rows_for_memory(engine: Engine, capacity: int, memory_gb: float) -> int:
    """Batch rows that fit in ``memory_gb``: each row holds its KV cache at ``capacity`` slots and a few
    vocabulary-sized step buffers (logits, log-softmax). At least 1."""
    el = torch.finfo(engine.dtype).bits // 8
    per_row = 2 * len(engine.layers) * engine.n_kv * engine.head_dim * capacity * el
    per_row += 8 * engine.lm_head.out_features * 4
    return max(1, int(memory_gb * 2 ** 30 // per_row))


class Runtime:
    def __init__(self, engine: Engine, grid: ActionGrid, cost: CostModel | None = None, timer=None):
        self.engine = engine
        self.timer = timer  # sol.bench.StepTimer: record each decode step's wall-clock (controller included)
        self.grid = grid
        self.cost = cost or CostModel.for_engine(engine)
        t = grid.tensors()
        self._tk, self._pk, self._bits = t["token_keep"], t["prune_keep"], t["bits"]
        self._keep_tables: dict[int, torch.Tensor] = {}
        self._dense: dict[int, float] = {}

    def axis_usage(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-axis keep ratios (κ, ρ, b/16) of grid action ids, same shape as ``actions``."""
        return {"token_keep": self._tk[actions].double(), "prune_keep": self._pk[actions].double(),
                "bit_ratio": self._bits[actions].double() / 16}

    def keep_table(self, kv_len: int) -> torch.Tensor:
        if kv_len not in self._keep_tables:
            self._keep_tables[kv_len] = self.cost.keep_table(self.grid, kv_len).float()
        return self._keep_tables[kv_len]

    def _dense_macs(self, kv_len: int) -> float:
        if kv_len not in self._dense:
            self._dense[kv_len] = float(self.cost.dense_macs(kv_len))
        return self._dense[kv_len]

    def _row_tables(self, lengths: list[int]) -> torch.Tensor:
        """[B, A] keep table of every row at its own key length."""
        if len(set(lengths)) == 1:
            return self.keep_table(lengths[0]).expand(len(lengths), -1)
        return torch.stack([self.keep_table(n) for n in lengths])

    def _prefill_ragged(self, blocks: torch.Tensor, pad: torch.Tensor, context: int, capacity: int,
                        min_shared: int = 8):
        """Left-padded prefill. Every distinct context is prefilled once (batch 1, no pad compute) into one of its
        rows and copied into the others; contexts are visited in token order, and the prefix a context shares with the
        previous one (≥ ``min_shared`` tokens: a task header, few-shot exemplars) is copied instead of recomputed —
        RoPE positions count from each row's first token, so a prefix's keys do not depend on the padding. A context
        prefilled before in this process (by another controller: ``sol.prefix.CONTEXTS``) is copied, not recomputed.
        Returns (cache with ``pad``, last logits [B, V], last hidden [B, D])."""
        e = self.engine
        B = blocks.shape[0]
        cache = e.new_cache(B, capacity)
        cache.pad, cache.length = pad.to(e.device), context
        logits = hidden = None
        groups: dict[tuple, list[int]] = {}
        for r in range(B):
            groups.setdefault((tuple(blocks[r, int(pad[r]):context].tolist()), int(pad[r])), []).append(r)
        prev = None  # (tokens, row) of the previous context in token order
        for ctx, p in sorted(groups):
            rows = groups[(ctx, p)]
            r = rows[0]
            hit = CONTEXTS.get(e, ctx)  # prefilled before, by another controller of this process
            if hit is not None:
                kv, lg, hid = hit
                for full, src in zip(cache.k + cache.v, kv):
                    full[rows, :, :p] = 0
                    full[rows, :, p:context] = src
                if logits is None:
                    logits, hidden = lg.new_empty(B, lg.shape[-1]), hid.new_empty(B, hid.shape[-1])
                logits[rows], hidden[rows] = lg, hid
                prev = (ctx, r)
                continue
            shared = len(os.path.commonprefix([ctx, prev[0]])) if prev else 0
            shared = min(shared, len(ctx) - 1) if shared >= min_shared else 0  # ≥ 1 token left to compute
            one = cache.rows(r, r + 1)  # a view: the prefill writes into row r itself
            one.length = p + shared
            for t in one.k + one.v:
                t[:, :, :p] = 0  # pad slots: never attended to, but must be finite (0 · NaN = NaN)
            if shared:
                q, pq = prev[1], int(pad[prev[1]])
                for full in cache.k + cache.v:
                    full[r, :, p:p + shared] = full[q, :, pq:pq + shared]
            lg, hid = e.extend(blocks[r:r + 1, p + shared:context], one, last_only=True)
            if logits is None:
                logits, hidden = lg.new_empty(B, lg.shape[-1]), hid.new_empty(B, hid.shape[-1])
            logits[rows], hidden[rows] = lg[0, -1], hid[0, -1]
            if len(rows) > 1:
                others = torch.tensor(rows[1:], dtype=torch.long, device=e.device)
                for t in cache.k + cache.v:
                    t[others, :, :context] = t[r, :, :context]
            CONTEXTS.put(e, ctx, [t[r, :, p:context].clone() for t in cache.k + cache.v], lg[0, -1].clone(),
                         hid[0, -1].clone())
            prev = (ctx, r)
        return cache, logits, hidden

    @torch.no_grad()
    def rollout(self, blocks: torch.Tensor, controller: Controller, budget: torch.Tensor | float,
                context: int, episode: int | None = None, record_hidden: bool = False,
                free_running: bool = False, rollouts: int = 1, keep_distributions: bool = False,
                pad: torch.Tensor | None = None, steps: torch.Tensor | None = None, start: tuple | None = None,
                n_steps: int | None = None, row_ids: torch.Tensor | None = None, offset: int = 0,
                stepwise: bool = False, dry: bool = False) -> Rollout:
        """Teacher-forced decode of ``blocks [B, context + T + 1]``; see the module docstring.

        With ``free_running`` each step's greedy token is written into ``blocks`` as the next input (in place).
        With ``rollouts = K`` every block is prefilled once and decoded as K rows (row r is block r // K): the K
        counterfactual schedules of GRPO. ``keep_distributions`` stores every step's full log-softmax.
        ``pad [B]`` runs a ragged batch: row b's context is left-padded with ``pad[b]`` filler tokens that no query
        attends to (RoPE positions start at its first real token), so each row computes what it computes alone; FLOP
        keep is charged at each row's own key length. A step is effective when it is for the shortest row.
        ``steps [B]``: row b is scored on its first ``steps[b]`` steps only (the rest is padding), so its episodes end
        there: a controller sees the episode length row b would see if its block ended at ``steps[b]``. Records past
        a row's end are undefined (log-prob 0). With ``steps`` non-increasing the LM skips finished rows entirely.
        ``start = (cache, last logits, last hidden)``: the dense state after ``context`` tokens, already computed (a
        :class:`sol.prefix.DensePrefix` episode start); no prefill is run. ``n_steps``: decode only the first
        ``n_steps`` steps (later tokens stay readable by lookahead probes). ``row_ids [B]`` (default: the row's block
        within ``blocks``) and ``offset`` (the first step's index within its block) are handed to the controller.
        An open-loop controller (``Controller.open_loop``: dense, uniform, static, matched, random) reads no LM output,
        so each episode is decided first and its steps run as one causal call, ``Engine.step(ids [B, S])``: the same
        maths as S single steps (fp64-exact; in fp32 a fake-quantised value on a rounding boundary may round the other
        way, as it may between two batchings), with the KV cache read once per episode and GEMMs over B·S rows
        (simulate mode, untimed, teacher-forced). ``stepwise`` runs it step by step anyway (the reference path).
        ``dry`` (open-loop controllers only): decide every step and keep the books (actions, keeps, MACs) without
        running the LM: what a schedule would spend on these rows (log-probs are 0).
        """
        e = self.engine
        host = blocks  # controllers and records live on the CPU; the LM runs on e.device
        blocks = blocks.to(e.device)
        prefill = blocks[:, :context]
        row_ids = torch.arange(blocks.shape[0]) if row_ids is None else row_ids.cpu()
        if rollouts > 1:
            row_ids = row_ids.repeat_interleave(rollouts)
        if pad is not None and rollouts > 1:
            raise ValueError("pad and rollouts > 1 cannot be combined")
        if (start is None and pad is None and rollouts == 1 and blocks.shape[0] > 1
                and bool((prefill == prefill[:1]).all())):
            prefill, rollouts = prefill[:1], blocks.shape[0]  # rows share their context: prefill it once
        elif rollouts > 1:
            blocks = blocks.repeat_interleave(rollouts, 0)
        B, n = blocks.shape
        T = n - context - 1
        if T < 1:
            raise ValueError("blocks must hold at least context + 2 tokens")
        T = min(T, n_steps or T)
        budget = torch.as_tensor(budget, dtype=torch.float32).expand(B).clone()
        episode = episode or T
        row_steps = torch.full((B,), T) if steps is None else steps.cpu().long().clamp(1, T)
        shrink = steps is not None and bool((row_steps[:-1] >= row_steps[1:]).all())  # finished rows are a suffix
        if dry and (not controller.open_loop or free_running):
            raise ValueError("a dry rollout needs an open-loop controller and teacher forcing")
        if dry:  # key lengths only: no KV, no LM state
            cache, prev_logits, h = KVCache.lengths_only(B, context, pad), torch.empty(B, 0), torch.empty(B, 0)
            rollouts = 1
        elif start is not None:
            cache, prev_logits, h = start
        elif pad is not None:
            cache, prev_logits, h = self._prefill_ragged(blocks, pad, context, n + 1)
        else:
            cache = e.new_cache(prefill.shape[0], n + 1)
            logits, hidden = e.extend(prefill, cache, last_only=True)
            h, prev_logits = hidden[:, -1], logits[:, -1]
        if rollouts > 1:
            cache = cache.repeat_rows(rollouts)
            h, prev_logits = h.repeat_interleave(rollouts, 0), prev_logits.repeat_interleave(rollouts, 0)
        dists = torch.empty(B, T, prev_logits.shape[-1]) if keep_distributions else None
        step_ms = torch.zeros(T, dtype=torch.float64)
        logp = torch.empty(B, T)
        greedy = torch.empty(B, T, dtype=torch.long)
        acts = torch.empty(B, T, dtype=torch.long)
        keep = torch.empty(B, T)
        eff_all = torch.empty(T, dtype=torch.bool)
        dense = torch.empty(B, T, dtype=torch.float64)
        seen = torch.empty(B, T, h.shape[-1]) if record_hidden else None
        ep_start, spent, n_eff, prev = 0, torch.zeros(B), 0, torch.full((B,), -1, dtype=torch.long)
        # an open-loop controller reads no LM output: each episode is decided first, then run as one causal LM call
        open_loop = dry or (controller.open_loop and not stepwise and self.timer is None and not free_running
                            and e.mode == "simulate")
        controller.start_episode(B, budget)

        def decide(u: int) -> None:
            """Step u's action and its bookkeeping (budget spent, keeps, MACs: only the keep tables are needed)."""
            nonlocal spent, n_eff, prev
            pos = context + u
            lengths = cache.real_lengths(pos + 1)
            effective = e.settings.effective(min(lengths))
            table = self._row_tables(lengths)
            tok = blocks[:, pos]
            lm = not open_loop  # what only a step-by-step run can hand over
            state = StepState(t=u - ep_start, episode_len=(row_steps - ep_start).clamp(1, episode), kv_len=pos + 1,
                              effective=effective, hidden=h.float().cpu() if lm else None, token=tok.cpu(),
                              embedding=e.embed(tok).float().cpu() if lm else None,
                              prev_logits=prev_logits.cpu() if lm else None, budget=budget, spent=spent.clone(),
                              n_effective=n_eff, prev_action=prev.clone(), keep_table=table,
                              probe=self._prober(blocks, cache, pos) if getattr(controller, "needs_probe", False)
                              else None, rows=row_ids, offset=offset + ep_start)
            a = controller.act(state) if effective else None
            a = torch.full((B,), self.grid.dense_index, dtype=torch.long) if a is None else a
            acts[:, u], eff_all[u] = a, effective
            dense[:, u] = torch.tensor([self._dense_macs(n_) for n_ in lengths], dtype=torch.float64)
            keep[:, u] = table.gather(1, a[:, None])[:, 0]
            if seen is not None and lm:
                seen[:, u] = state.hidden
            if effective:
                spent += keep[:, u]
                n_eff += 1
            prev = a

        def advance(t: int, stop: int, live: int) -> None:
            """Decide steps t..stop−1, then run them as one LM call ([rows, S, ·]) on rows 0..live−1 (rows past their
            end keep their last state), split by rows so that its logits stay within the vocabulary-sized buffers per
            row that ``rows_for_memory`` budgets."""
            nonlocal h, prev_logits
            for u in range(t, stop):
                decide(u)
            if dry:
                cache.length = context + stop
                logp[:, t:stop] = 0.0
                return
            S = stop - t
            chunk = live if S == 1 else max(1, 8 * B // S)
            new_h, new_logits = (None, None) if chunk >= B else (h.clone(), prev_logits.clone())
            for i in range(0, live, chunk):
                j = min(live, i + chunk)
                a = acts[i:j, t:stop]
                sub = cache if (i, j) == (0, B) else cache.rows(i, j)
                lg, hd = e.step(blocks[i:j, context + t:context + stop], sub, self._tk[a], self._pk[a], self._bits[a])
                lp = lg.float().log_softmax(-1)
                top = lp.argmax(-1)
                greedy[i:j, t:stop] = top.cpu()
                if free_running:  # one step at a time
                    blocks[i:j, context + t + 1] = top[:, 0]
                logp[i:j, t:stop] = lp.gather(2, blocks[i:j, context + t + 1:context + stop + 1, None])[..., 0].cpu()
                if dists is not None:
                    dists[i:j, t:stop] = lp.cpu()
                if seen is not None and open_loop:  # what each step's controller would have seen: the previous position
                    seen[i:j, t:stop] = torch.cat([h[i:j, None], hd[:, :-1]], 1).float().cpu()
                if new_h is None:
                    new_h, new_logits = hd[:, -1], lg[:, -1]
                else:
                    new_h[i:j], new_logits[i:j] = hd[:, -1], lg[:, -1]
            cache.length = context + stop
            logp[live:, t:stop] = 0.0
            if seen is not None and open_loop and live < B:
                seen[live:, t:stop] = h[live:, None].float().cpu()
            h, prev_logits = (h, prev_logits) if new_h is None else (new_h, new_logits)

        t = 0
        while t < T:
            stop = min(ep_start + episode, T) if open_loop else t + 1  # steps of this LM call
            live = int((row_steps > t).sum()) if shrink else B  # rows 0..live-1 are still scored
            if self.timer is None:
                advance(t, stop, live)
            else:
                step_ms[t] = self.timer(lambda: advance(t, stop, live))
            t = stop
            if t - ep_start == episode and t < T:  # dense refresh of the finished episode
                if not dry:
                    cache.length = context + ep_start
                    live = int((row_steps > t).sum()) if shrink else B
                    sub = cache if live == B else cache.rows(0, live)
                    logits_r, hid_r = e.extend(blocks[:live, context + ep_start:context + t], sub, last_only=True)
                    cache.length = sub.length
                    h = torch.cat([hid_r[:, -1], h[live:]])
                    prev_logits = torch.cat([logits_r[:, -1], prev_logits[live:]])
                ep_start, spent, n_eff = t, torch.zeros(B), 0
                prev = torch.full((B,), -1, dtype=torch.long)
                controller.start_episode(B, budget)
        if free_running:
            host.copy_(blocks.cpu())
        extras = {"greedy": greedy}
        if dists is not None:
            extras["log_distributions"] = dists
        if self.timer is not None:
            extras["step_ms"] = step_ms
        return Rollout(logp, acts, eff_all, keep, dense, controller.step_macs(), seen, extras)

    @torch.no_grad()
    def score(self, blocks: torch.Tensor, controller: Controller, budget: torch.Tensor | float, context: int,
              episode: int | None = None, max_rows: int = 64, rollouts: int = 1, keep_distributions: bool = False,
              record_hidden: bool = False, prefix=None, desc: str | None = None) -> Rollout:
        """What ``rollout(blocks, ...)`` computes, with the dense prefix shared (``sol.prefix``): every episode starts
        from the dense cache of its block, so the (block, episode) pairs run as the rows of batches of at most
        ``max_rows`` rows, episode by episode, and no controller re-runs the prefill or the dense replays. Records
        come back as ``[N·rollouts, T]`` in block order, as from ``rollout``. ``budget``: a float or one per row.

        Falls back to chunked sequential rollouts (same numbers) when the first steps are forced dense (context ≤
        sinks + window + 1: an episode's effective steps would then depend on where it starts) or when steps are
        timed (a timed step is one step of ``max_rows // rollouts`` blocks, as before)."""
        N, n = blocks.shape
        T = n - context - 1
        E = min(episode or T, T)
        per = max(1, max_rows // rollouts)  # blocks per batch, balanced: 128 blocks in 2 batches of 64, not 125 + 3
        per = -(-N // -(-N // per))
        budget = torch.as_tensor(budget, dtype=torch.float32)
        part = lambda rows: budget if budget.numel() == 1 else budget.view(N, rollouts)[rows].reshape(-1)  # noqa: E731
        kw = dict(rollouts=rollouts, keep_distributions=keep_distributions, record_hidden=record_hidden)
        if self.timer is not None or not self.engine.settings.effective(context + 1):
            parts = [self.rollout(blocks[i:i + per], controller, part(slice(i, i + per)), context, episode=E,
                                  row_ids=torch.arange(i, min(N, i + per)), **kw) for i in range(0, N, per)]
            return _concat(parts)
        pre = prefix or dense_prefix(self.engine, blocks, context, E)
        B = N * rollouts
        logp, keep, greedy = torch.empty(B, T), torch.empty(B, T), torch.empty(B, T, dtype=torch.long)
        acts, dense = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.float64)
        dists = hidden = None
        macs = 0
        bar = tqdm(total=pre.n_episodes * -(-N // per), desc=desc, leave=False, disable=desc is None)
        for k in range(pre.n_episodes):
            L, S, t0 = pre.episode_start(k), pre.episode_steps(k), k * E
            for i in range(0, N, per):
                bar.update()
                rows = torch.arange(i, min(N, i + per))
                ro = self.rollout(blocks[rows], controller, part(rows), L, episode=E, n_steps=S, row_ids=rows,
                                  offset=t0, start=pre.start(self.engine, rows, k, n + 1), **kw)
                out = slice(i * rollouts, (i + len(rows)) * rollouts)
                for dst, src in ((logp, ro.logprobs), (keep, ro.flop_keep), (greedy, ro.extras["greedy"]),
                                 (acts, ro.actions), (dense, ro.dense_macs)):
                    dst[out, t0:t0 + S] = src
                if keep_distributions:
                    if dists is None:
                        dists = torch.empty(B, T, ro.extras["log_distributions"].shape[-1])
                    dists[out, t0:t0 + S] = ro.extras["log_distributions"]
                if record_hidden:
                    if hidden is None:
                        hidden = torch.empty(B, T, ro.hidden.shape[-1])
                    hidden[out, t0:t0 + S] = ro.hidden
                macs = ro.controller_macs
        bar.close()
        extras = {"greedy": greedy} | ({"log_distributions": dists} if keep_distributions else {})
        return Rollout(logp, acts, torch.ones(T, dtype=torch.bool), keep, dense, macs, hidden, extras)

    def _prober(self, blocks: torch.Tensor, cache, pos: int) -> "_Prober":
        return _Prober(self, blocks, cache, pos)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, controller: Controller, budget: float | torch.Tensor,
                 episode: int | None = None) -> tuple[torch.Tensor, Rollout]:
        """Greedy free-running decode of ``n_new`` tokens after ``prompt [B, P]`` (P >= 2) under a controller.

        The last prompt token is processed under control (as in scoring); each step's argmax is the next input.
        """
        B, P = prompt.shape
        blocks = torch.cat([prompt, prompt.new_zeros(B, n_new)], 1)
        ro = self.rollout(blocks, controller, budget, P - 1, episode, free_running=True)
        return blocks[:, P:], ro


def _concat(parts: list[Rollout]) -> Rollout:
    """Rollouts of consecutive row chunks (same steps) as one."""
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    extras = {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras if k != "step_ms"}
    if "step_ms" in parts[0].extras:
        extras["step_ms"] = torch.stack([p.extras["step_ms"] for p in parts]).mean(0)
    return Rollout(cat("logprobs"), cat("actions"), parts[0].effective, cat("flop_keep"), cat("dense_macs"),
                   parts[0].controller_macs, cat("hidden") if parts[0].hidden is not None else None, extras)


class _Prober:
    """Scores candidate actions for the step at ``pos`` by teacher-forced lookahead (the oracles' ``StepState.probe``).

    A probe writes the cache slots pos.. and then rewinds ``cache.length`` to pos: slots at or beyond the length are
    scratch that the real step overwrites before anything reads them, so no copy of the cache is needed."""

    batched = True  # False: damage() runs one probe per candidate (the reference path, for tests)

    def __init__(self, runtime: Runtime, blocks: torch.Tensor, cache, pos: int):
        self.rt, self.blocks, self.cache, self.pos = runtime, blocks, cache, pos

    def __call__(self, actions: torch.Tensor, horizon: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(NLL [B] of the true tokens over the lookahead, each lookahead step's log-softmax [B, V])."""
        e, rt, blocks, cache, pos = self.rt.engine, self.rt, self.blocks, self.cache, self.pos
        nll = torch.zeros(blocks.shape[0])
        one = torch.ones(blocks.shape[0])
        dists = []
        for k in range(min(horizon, blocks.shape[1] - pos - 1)):
            if k == 0:
                logits, _ = e.step(blocks[:, pos], cache, rt._tk[actions], rt._pk[actions], rt._bits[actions])
            else:
                logits, _ = e.step(blocks[:, pos + k], cache, one, one, torch.full_like(one, 16))
            lp = logits.float().log_softmax(-1)
            dists.append(lp.cpu())
            nll -= lp.gather(1, blocks[:, pos + k + 1:pos + k + 2]).squeeze(1).cpu()
        cache.length = pos
        return nll, dists

    def damage(self, candidates: list[int], reference: int, buffer_mb: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """One-step damage of every candidate action (horizon 1): (NLL of the true next token [B, C],
        KL(reference ‖ candidate) [B, C]), with ``reference`` a grid action (the dense one). The candidates run as
        the rows of one call (``Engine.step_alternatives``; as many rows of B·C at a time as keep one [rows, V]
        logits buffer within ``buffer_mb``) where the engine allows it, else one probe each; the same numbers either
        way (fp64; in fp32 a fake-quantised value on a rounding boundary may round the other way)."""
        e, B = self.rt.engine, self.blocks.shape[0]
        if not (self.batched and e.can_step_alternatives(self.cache)):
            out = {a: self(torch.full((B,), a)) for a in dict.fromkeys([reference, *candidates])}  # each probed once
            ref = out[reference][1][0]
            nll = torch.stack([out[a][0] for a in candidates], 1)
            kl = torch.stack([torch.zeros(B) if a == reference else (ref.exp() * (ref - out[a][1][0])).sum(-1)
                              for a in candidates], 1)
            return nll, kl
        acts = torch.tensor([reference] + list(candidates))                       # the reference first
        C = len(acts)
        target = self.blocks[:, self.pos + 1].cpu()
        nll, kl = torch.empty(B, C - 1), torch.empty(B, C - 1)
        chunk = max(1, buffer_mb * 2 ** 20 // (4 * e.lm_head.out_features * C))
        for i in range(0, B, chunk):
            j = min(B, i + chunk)
            a = acts.expand(j - i, C)
            logits, _ = e.step_alternatives(self.blocks[i:j, self.pos], self.cache.rows(i, j), self.rt._tk[a],
                                            self.rt._pk[a], self.rt._bits[a])
            lp = logits.float().log_softmax(-1).cpu()                             # [rows, C, V]
            ref = lp[:, :1]
            nll[i:j] = -lp[:, 1:].gather(2, target[i:j, None, None].expand(-1, C - 1, 1))[..., 0]
            kl[i:j] = (ref.exp() * (ref - lp[:, 1:])).sum(-1)
        kl[:, torch.tensor(candidates) == reference] = 0.0  # the reference against itself: exactly 0
        return nll, kl
