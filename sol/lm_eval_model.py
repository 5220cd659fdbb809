"""lm-eval model ``sol``: any controller (dense, baselines, policy) scored through the SOL runtime.

    sol lm-eval --model sol --model_args model=smollm2-135m,controller=policy:run/policy.pt,budget=0.7 \\
        --tasks sol_mmlu_continuation --include_path <tasks>

(``sol lm-eval`` is lm-eval's own CLI with this module imported first: lm-eval 0.4.13 discovers models only through
its registry, not entry points.) From Python: ``lm_eval.simple_evaluate(model=SolLM(...), ...)`` or
``model="sol"`` after ``import sol.lm_eval_model``.

Scoring semantics (identical for every controller): the context minus its last token is prefilled densely **once**
and shared by all choices of a request group; the last context token and every continuation token are processed
under the controller, with a dense refresh every ``episode`` steps (the reference's scheme, with its fixed-baseline
refresh bug §12.4 fixed: nothing ever loses context). Tokenisation follows lm-eval's HF model (context trailing
spaces move to the continuation; the continuation is the tail of the jointly encoded string), so the dense
controller reproduces ``--model hf``.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

# lm-eval's own models (hf, ...) first: lm-eval fills its model registry lazily, and only while the registry is
# empty, so registering `sol` into it first would hide them
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from sol.actions import ActionSettings
from sol.engine import Engine
from sol.evaluate import transformed
from sol.models import load
from sol.registry import Built, build
from sol.runtime import Runtime


@register_model("sol")
class SolLM(LM):
    def __init__(self, model: str = "smollm2-135m", controller: str = "dense", budget: float = 1.0,
                 episode: int = 16, dtype: str = "float32", max_length: int = 2048, criterion: str = "quest",
                 page_size: int = 8, sinks: int = 4, window: int = 8, faithful: bool = False, pretrained=None,
                 tokenizer=None, device: str = "cpu", batch_groups: int = 16, **kwargs):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            print(f"sol: device '{device}' (lm-eval's default) is not available; using the CPU", file=sys.stderr)
            device = "cpu"
        if pretrained is not None:  # an in-memory model (tests, notebooks)
            self.model, self.tok, self.model_name = pretrained, tokenizer, model
        else:
            self.model, self.tok = load(model, dtype=dtype, device=device)
            self.model_name = model
        self.built = controller if isinstance(controller, Built) else build(controller, self.model_name)
        settings = ActionSettings(criterion, int(page_size), int(sinks), int(window), _bool(faithful))
        self.runtime = Runtime(Engine(transformed(self.model, self.built, None), settings), self.built.grid)
        self.budget, self.episode, self.max_length = float(budget), int(episode), int(max_length)
        self.batch_groups = max(1, int(batch_groups))  # request groups (questions) scored as one ragged batch
        self.stats = defaultdict(float)
        self.scored: list[tuple] = []  # the ragged batches scored since reset_usage(): (blocks, pad, steps, context)

    # --- tokenisation as lm-eval's HFLM does it ---------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    def _prefix(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    # --- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_groups(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """Score request groups ``(context, [continuations])`` as one ragged batch (one row per continuation).

        Contexts are left-padded to the longest (pad slots are never attended to, RoPE starts at each row's first
        token) and each distinct context is prefilled once.
        Every row's episodes end with its own continuation (``steps``), so a row sees exactly what it sees scored
        alone, whatever it is batched with (the reference scored each choice on its own)."""
        prepared = []
        for ctx, conts in items:
            if len(ctx) < 2:
                ctx = [self._prefix()] + ctx
            prepared.append((ctx[-(self.max_length - max(len(c) for c in conts)):], conts))
        L = max(len(ctx) for ctx, _ in prepared)
        T = max(len(c) for _, conts in prepared for c in conts)
        fill = self.tok.pad_token_id or 0
        # one row per continuation, longest first: finished rows form a suffix the runtime stops computing
        order = sorted(((g, j) for g, (_, conts) in enumerate(prepared) for j in range(len(conts))),
                       key=lambda gj: -len(prepared[gj[0]][1][gj[1]]))
        rows, pads, steps = [], [], []
        for g, j in order:
            ctx, c = prepared[g][0], prepared[g][1][j]
            rows.append([fill] * (L - len(ctx)) + ctx + c + [fill] * (T - len(c)))
            pads.append(L - len(ctx))
            steps.append(len(c))
        blocks = torch.tensor(rows)
        batch = (blocks, torch.tensor(pads) if len(prepared) > 1 else None, torch.tensor(steps), L - 1)
        ro = self.runtime.rollout(blocks, self.built.controller, self.budget, batch[3], episode=self.episode,
                                  pad=batch[1], steps=batch[2])
        self.scored.append(batch)
        out = [[None] * len(conts) for _, conts in prepared]
        for i, ((g, j), n) in enumerate(zip(order, steps)):
            target = blocks[i, L:L + n]
            out[g][j] = (float(ro.logprobs[i, :n].sum()), bool((ro.extras["greedy"][i, :n] == target).all()))
            self._count(ro, i, n)
        return out

    def _count(self, ro, i: int, n: int) -> None:
        """Add row i's first n steps to the usage statistics (FLOP keep, per-axis keeps)."""
        eff = ro.effective[:n]
        self.stats["steps"] += int(eff.sum())
        self.stats["flop_keep_sum"] += float(ro.flop_keep[i, :n][eff].sum())
        self.stats["total_keep_sum"] += float((ro.flop_keep[i, :n] + ro.controller_macs / ro.dense_macs[i, :n])[eff].sum())
        for axis, v in self.runtime.axis_usage(ro.actions[i, :n][eff]).items():
            self.stats[f"{axis}_sum"] += float(v.sum())

    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        return self._score_groups([(ctx, conts)])[0]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.args[0]].append(i)
        encoded = []
        for context, idx in groups.items():
            pairs = [self._encode_pair(context, requests[i].args[1]) for i in idx]
            encoded.append((idx, pairs[0][0], [p[1] for p in pairs]))
        results = [None] * len(requests)
        bar = tqdm(total=len(encoded), desc=f"sol {self.built.controller.name}", disable=disable_tqdm)
        for batch in self._batches(encoded):
            for (idx, _, _), scores in zip(batch, self._score_groups([(ctx, conts) for _, ctx, conts in batch])):
                for i, s in zip(idx, scores):
                    results[i] = s
            bar.update(len(batch))
        bar.close()
        return results

    def _batches(self, encoded):
        """``batch_groups`` request groups at a time. Contexts sharing a long prefix (≥ 64 tokens: few-shot exemplars
        of one task) are batched together so the prefill computes it once; within such a cluster and among the rest,
        groups are ordered by longest continuation (little step padding). Contexts too short for every step to be
        effective are scored alone (a ragged step is effective for all rows or none)."""
        s = self.runtime.engine.settings
        short = [g for g in encoded if len(g[1]) < s.sinks + s.window + 2]
        rest = sorted((g for g in encoded if len(g[1]) >= s.sinks + s.window + 2), key=lambda g: g[1])
        clusters: list[list] = []
        for g in rest:
            if clusters and len(os.path.commonprefix([clusters[-1][-1][1], g[1]])) >= 64:
                clusters[-1].append(g)
            else:
                clusters.append([g])
        loose = [c[0] for c in clusters if len(c) == 1]
        for g in short:
            yield [g]
        by_len = lambda g: (max(len(c) for c in g[2]), len(g[1]))  # noqa: E731
        for cluster in [c for c in clusters if len(c) > 1] + [loose]:
            cluster = sorted(cluster, key=by_len)
            for j in range(0, len(cluster), self.batch_groups):
                yield cluster[j:j + self.batch_groups]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for r in tqdm(requests, disable=disable_tqdm):
            ids = self._encode(r.args[0])
            out.append(self._score_group([self._prefix()], [ids])[0][0])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        outs = []
        for r in tqdm(requests, disable=disable_tqdm):
            context, kw = r.args
            ids = self._encode(context) or [self._prefix()]
            if len(ids) < 2:
                ids = [self._prefix()] + ids
            new, _ = self.runtime.generate(torch.tensor([ids]), int(kw.get("max_gen_toks", 64)),
                                           self.built.controller, self.budget, self.episode)
            text = self.tok.decode(new[0], skip_special_tokens=True)
            for stop in kw.get("until", []) or []:
                text = text.split(stop)[0]
            outs.append(text)
        return outs

    def reset_usage(self) -> None:
        self.stats.clear()
        self.scored.clear()

    def spend(self, controller) -> dict:
        """What an open-loop ``controller`` (matched, random, uniform) would spend on the very rows scored since
        ``reset_usage()``: the usage of a dry rollout over the same ragged batches (no LM runs)."""
        saved, self.stats = self.stats, defaultdict(float)
        try:
            for blocks, pad, steps, context in self.scored:
                ro = self.runtime.rollout(blocks, controller, self.budget, context, episode=self.episode, pad=pad,
                                          steps=steps, dry=True)
                for i, n in enumerate(steps.tolist()):
                    self._count(ro, i, n)
            return self.usage()
        finally:
            self.stats = saved

    def usage(self) -> dict:
        n = max(self.stats["steps"], 1)
        return {"steps": int(self.stats["steps"]), **{k: self.stats[f"{k}_sum"] / n for k in
                ("flop_keep", "total_keep", "token_keep", "prune_keep", "bit_ratio")}}


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
