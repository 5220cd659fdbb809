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

import sys
from collections import defaultdict

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
                 tokenizer=None, device: str = "cpu", **kwargs):
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
        self.stats = defaultdict(float)

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
    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        if len(ctx) < 2:
            ctx = [self._prefix()] + ctx
        keep = self.max_length - max(len(c) for c in conts)
        ctx = ctx[-keep:]
        T = max(len(c) for c in conts)
        pad = self.tok.pad_token_id or 0
        blocks = torch.tensor([ctx + c + [pad] * (T - len(c)) for c in conts])
        ro = self.runtime.rollout(blocks, self.built.controller, self.budget, len(ctx) - 1, episode=self.episode,
                                  keep_distributions=True)
        out = []
        greedy = ro.extras["log_distributions"].argmax(-1)
        for i, c in enumerate(conts):
            n = len(c)
            lp = ro.logprobs[i, :n]
            target = blocks[i, len(ctx):len(ctx) + n]
            out.append((float(lp.sum()), bool((greedy[i, :n] == target).all())))
            eff = ro.effective[:n]
            self.stats["steps"] += int(eff.sum())
            self.stats["flop_keep_sum"] += float(ro.flop_keep[i, :n][eff].sum())
            self.stats["total_keep_sum"] += float((ro.flop_keep[i, :n] + ro.controller_macs / ro.dense_macs[:n])[eff].sum())
            for axis, v in self.runtime.axis_usage(ro.actions[i, :n][eff]).items():
                self.stats[f"{axis}_sum"] += float(v.sum())
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.args[0]].append(i)
        results = [None] * len(requests)
        for context, idx in tqdm(groups.items(), desc=f"sol {self.built.controller.name}", disable=disable_tqdm):
            pairs = [self._encode_pair(context, requests[i].args[1]) for i in idx]
            scores = self._score_group(pairs[0][0], [p[1] for p in pairs])
            for i, s in zip(idx, scores):
                results[i] = s
        return results

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

    def usage(self) -> dict:
        n = max(self.stats["steps"], 1)
        return {"steps": int(self.stats["steps"]), **{k: self.stats[f"{k}_sum"] / n for k in
                ("flop_keep", "total_keep", "token_keep", "prune_keep", "bit_ratio")}}


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
