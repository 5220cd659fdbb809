"""MMLU scoring throughput: our scheme vs the reference's, same machine, same model, same questions.

Ours (``SolLM.loglikelihood``): each context is prefilled once for its 4 choices, and ``--batch-groups`` questions
with the same longest continuation decode together as one ragged batch (left-padded contexts, per-row actions).
Reference (policy_harness.py): every (context, choice) pair is scored on its own, batch 1, re-prefilling the context.
Both through the same runtime and controller, so accuracies must be identical; prints questions/s and the ratios
(also for ours without cross-question batching, ``--batch-groups 1``).

    python benchmarks/mmlu_throughput.py --model smollm2-135m --questions 60 [--subjects 57] [--shots 0|5]

Questions are drawn from ``--subjects`` random subjects (as an lm-eval run scores whole subjects; with few-shot
contexts the exemplar prefix of a subject is computed once per batch).
"""
from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

import torch

from sol.lm_eval_model import SolLM
from sol.mmlu import load_dev, load_test


def prompt(q, dev, shots):
    desc = f"The following are questions (with answers) about {q['subject'].replace('_', ' ')}.\n\n"
    ex = "".join(f"Question: {d['question'].strip()}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in dev[:shots])
    return desc + ex + f"Question: {q['question'].strip()}\nAnswer:"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--controller", default="dense")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subjects", type=int, default=57, help="draw the questions from this many random subjects")
    ap.add_argument("--batch-groups", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    rng = random.Random(args.seed)
    test = load_test()
    subjects = set(rng.sample(sorted({q["subject"] for q in test}), args.subjects))
    qs = rng.sample([q for q in test if q["subject"] in subjects], args.questions)
    dev = load_dev()
    lm = SolLM(model=args.model, controller=args.controller, budget=args.budget)
    items = [(prompt(q, dev.get(q["subject"], []), args.shots), [" " + c for c in q["choices"]], q["answer"]) for q in qs]
    reqs = [SimpleNamespace(args=(ctx, c)) for ctx, ch, _ in items for c in ch]

    def ours(groups):
        lm.batch_groups = groups
        t0 = time.perf_counter()
        res = lm.loglikelihood(reqs, disable_tqdm=True)
        return [res[4 * i:4 * i + 4] for i in range(len(items))], time.perf_counter() - t0

    batched, t_batched = ours(args.batch_groups)
    single, t_single = ours(1)
    t0 = time.perf_counter()
    ref = [[lm._score_group(*(lambda p: (p[0], [p[1]]))(lm._encode_pair(ctx, c)))[0] for c in ch] for ctx, ch, _ in items]
    t_ref = time.perf_counter() - t0

    acc = lambda res: sum(max(range(4), key=lambda i: r[i][0]) == a for r, (_, _, a) in zip(res, items)) / len(items)  # noqa: E731
    maxdiff = max(abs(o[i][0] - r[i][0]) for res in (batched, single) for o, r in zip(res, ref) for i in range(4))
    n = len(items)
    print(f"model={args.model} controller={args.controller} questions={n} subjects={args.subjects} shots={args.shots} "
          f"threads={torch.get_num_threads()}")
    print(f"ours, {args.batch_groups} questions/batch: {n / t_batched:.2f} q/s  acc={acc(batched):.4f}")
    print(f"ours, 1 question/batch:  {n / t_single:.2f} q/s  acc={acc(single):.4f}")
    print(f"reference (re-prefill per choice, batch 1): {n / t_ref:.2f} q/s  acc={acc(ref):.4f}")
    print(f"throughput ratio vs reference: {t_ref / t_batched:.2f}x (batched), {t_ref / t_single:.2f}x (1 question)"
          f"   max |loglik difference| = {maxdiff:.2e}")

if __name__ == "__main__":
    main()
