"""Dense `--model sol` vs lm-eval's own `hf` model on the same weights and the same MMLU questions.

    python benchmarks/mmlu_hf_agreement.py --model smollm2-135m --per-subject 5 --style continuation
"""
from __future__ import annotations

import argparse
import os

import lm_eval
import numpy as np
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from sol import mmlu
from sol.lm_eval_model import SolLM
from sol.models import cache_dir, load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-subject", type=int, default=5)
    ap.add_argument("--style", default="continuation", choices=["continuation", "letter"])
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tasks = mmlu.prepare(cache_dir() / "mmlu")
    model, tok = load(args.model)
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    group = f"sol_mmlu_{args.style}"
    kw = dict(tasks=[group], task_manager=tm, limit=args.per_subject, bootstrap_iters=0, log_samples=True)
    hf = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8), **kw)
    ours = lm_eval.simple_evaluate(model=SolLM(model=args.model, pretrained=model, tokenizer=tok), **kw)
    a, b = hf["results"][group], ours["results"][group]
    diffs = [abs(x[0][0] - y[0][0]) for t in hf["samples"] for s, u in zip(hf["samples"][t], ours["samples"][t])
             for x, y in zip(s["resps"], u["resps"])]
    n = sum(len(v) for v in hf["samples"].values())
    print(f"{args.model} {group} ({n} questions, first {args.per_subject} per subject)")
    print(f"hf : acc={a['acc,none']:.4f} acc_norm={a['acc_norm,none']:.4f}")
    print(f"sol: acc={b['acc,none']:.4f} acc_norm={b['acc_norm,none']:.4f}")
    print(f"|Δacc| = {100 * abs(a['acc,none'] - b['acc,none']):.2f} points; max |Δ loglik| = {np.max(diffs):.2e}")


if __name__ == "__main__":
    main()
