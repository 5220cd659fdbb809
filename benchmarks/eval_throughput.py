"""Scored tokens/s of `sol eval ppl`: the shared dense prefix (Runtime.score) against the sequential path it
replaces and against a plain HF teacher-forced forward over the same blocks, in one run on one thread count.

    python benchmarks/eval_throughput.py --model smollm2-135m --blocks 16 --steps 32 --episode 16

Controllers: dense, one uniform level, the policy (if --policy exists) and the matched mix at the policy's realised
per-axis averages. "sequential" is the path every controller took before: chunks of --batch blocks, each prefilled and
refreshed by its own rollout, step by step. "shared" is today's: the shared dense prefix, (block, episode) rows, and
for open-loop controllers (dense, uniform, matched) one causal LM call per episode; it excludes the one-off dense pass,
which is reported on its own line (it serves every controller, budget and baseline of a run). Prints ratios measured
here; it is not a test.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="enwiki")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--episode", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="blocks per sequential rollout (the old path)")
    ap.add_argument("--max-rows", type=int, default=64, help="rows per batch of the shared path")
    ap.add_argument("--policy", default="results/policy/policy.pt")
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mmlu-per-subject", type=int, default=1, help="MMLU questions per subject (0: skip MMLU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["SOL_PREFIX_CACHE"] = "0"  # time the dense pass, never a disk hit

    from baselines.schedules import Matched
    from sol import data, prefix
    from sol.actions import ActionSettings
    from sol.engine import Engine
    from sol.models import load
    from sol.registry import build
    from sol.runtime import Runtime

    model, tok = load(a.model)
    blocks = torch.from_numpy(data.blocks(a.data, "test", tok, a.context + a.steps + 1, max_blocks=a.blocks))
    N, n = blocks.shape
    scored = N * a.steps

    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, N, a.batch):
            model(blocks[i:i + a.batch])
    hf_tps = N * n / (time.perf_counter() - t0)

    specs = ["dense", "uniform:1,1,8"] + ([f"policy:{a.policy}"] if os.path.isfile(a.policy) else [])
    built = {s: build(s, a.model) for s in specs}
    engine = Engine(model, ActionSettings())

    t0 = time.perf_counter()
    pre = prefix.dense_prefix(engine, blocks, a.context, a.episode)
    t_prefix = time.perf_counter() - t0

    rows = []

    def measure(name, ctrl, grid):
        rt = Runtime(engine, grid)
        t0 = time.perf_counter()
        seq = torch.cat([rt.rollout(blocks[i:i + a.batch], ctrl, a.budget, a.context, episode=a.episode,
                                    row_ids=torch.arange(i, min(N, i + a.batch)), stepwise=True).logprobs
                         for i in range(0, N, a.batch)])
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ro = rt.score(blocks, ctrl, a.budget, a.context, a.episode, max_rows=a.max_rows, prefix=pre)
        t_new = time.perf_counter() - t0
        rows.append((name, scored / t_seq, scored / t_new, (seq - ro.logprobs).abs().max().item()))
        return ro, rt

    for s in specs:
        ro, rt = measure(built[s].controller.name, built[s].controller, built[s].grid)
        if s.startswith("policy:"):
            usage = {k: v.mean().item() for k, v in rt.axis_usage(ro.actions).items()}
            grid = built[s].grid
            targets = {"token_keep": usage["token_keep"], "prune_keep": usage["prune_keep"],
                       "bits": usage["bit_ratio"] * 16}
            measure("matched", Matched(grid, targets), grid)

    print(f"model {a.model}, {N} blocks x {a.steps} scored steps (context {a.context}, episode {a.episode}), "
          f"{a.threads} thread(s), batch {a.batch} (sequential) / {a.max_rows} rows (shared)")
    print(f"plain HF teacher-forced forward: {hf_tps:.1f} tokens/s over {N} x {n} tokens")
    print(f"shared dense pass (once per block set): {t_prefix:.1f} s ({N * (n - 1 - a.steps + (pre.n_episodes - 1) * a.episode) / t_prefix:.1f} tokens/s)")
    print()
    print("| controller | sequential scored tok/s | shared scored tok/s | speedup | shared / HF | max |Δ log p| |")
    print("|---|---|---|---|---|---|")
    for name, old, new, diff in rows:
        print(f"| {name} | {old:.1f} | {new:.1f} | {new / old:.2f}x | {new / hf_tps:.3f} | {diff:.1e} |")

    mmlu_rows = []
    if a.mmlu_per_subject:
        from sol import mmlu
        from sol.lm_eval_model import SolLM
        from sol.models import cache_dir

        tasks = mmlu.prepare(cache_dir() / "mmlu")
        for keep in (False, True):  # today: every controller prefills every question; shared: the first one does
            prefix.CONTEXTS.clear()
            for s in specs:
                if not keep:
                    prefix.CONTEXTS.clear()
                lm = SolLM(model=a.model, controller=s, pretrained=model, tokenizer=tok, episode=a.episode)
                lm.budget = a.budget
                t0 = time.perf_counter()
                summary, _ = mmlu.evaluate(lm, tasks, "sol_mmlu_continuation", a.mmlu_per_subject)
                mmlu_rows.append((keep, lm.built.controller.name, summary["questions"] / (time.perf_counter() - t0),
                                  summary["acc"]))

    if mmlu_rows:
        print()
        print("| MMLU controller | questions/s, each prefills | questions/s, contexts shared | speedup | acc (same) |")
        print("|---|---|---|---|---|")
        half = len(mmlu_rows) // 2
        for (_, name, old, acc0), (_, _, new, acc1) in zip(mmlu_rows[:half], mmlu_rows[half:]):
            print(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f}x | {acc0:.4f} / {acc1:.4f} |")
        print("(the first controller of an invocation prefills every context either way)")


if __name__ == "__main__":
    main()
