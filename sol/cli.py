"""The ``sol`` command line. Every user-facing failure prints one ``error: ...`` line and exits with status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from baselines import BASELINE_KINDS
from sol.errors import SolError
from sol.methods import POLICY_KINDS


def _threads(n: int | None) -> None:
    """Set the intra-op thread count deliberately (two processes with 2 threads each slow each other ~40x)."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)


def cmd_bench(args) -> None:
    import torch

    from sol.actions import Action, ActionSettings
    from sol.bench import DEFAULT_ACTIONS, format_table, run_bench
    from sol.io import write_csv
    from sol.models import load

    _threads(args.threads)
    device = torch.device(args.device)
    settings = ActionSettings(criterion=args.criterion, page_size=args.page_size, sinks=args.sinks,
                              window=args.window, faithful=args.faithful)
    actions = DEFAULT_ACTIONS
    if args.actions:
        actions = [Action()] + [_parse_action(s) for s in args.actions]
    frames = []
    for name in args.model:
        model, _ = load(name, dtype=args.dtype, device=device)
        frames.append(run_bench(model, name, kv_lens=args.kv_len, actions=actions, steps=args.steps,
                                warmup=args.warmup, settings=settings, batch=args.batch, seed=args.seed,
                                counters=not args.no_counters))
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    print(format_table(df))
    if args.out:
        write_csv(args.out, df)
        print(f"wrote {args.out}")


def _check_budgets(budgets) -> None:
    for b in budgets:
        if not 0 < b <= 1:
            raise SolError(f"budget {b} out of range: a budget is a mean FLOP keep in (0, 1]")


def cmd_train(args) -> None:
    from sol.train import Trainer, load_config

    overrides = dict(kv.split("=", 1) for kv in args.set or [])
    cfg = load_config(args.config, {k: _yaml_value(v) for k, v in overrides.items()})
    _threads(args.threads or cfg.threads)
    out = Trainer(cfg, args.out).run()
    print(f"wrote {out}")


def cmd_eval_ppl(args) -> None:
    import pandas as pd
    import torch

    from sol import data
    from sol.actions import ActionSettings
    from sol.evaluate import eval_ppl
    from sol.io import write_csv
    from sol.models import load

    _threads(args.threads)
    _check_budgets(args.budget)
    if args.match_summary and not args.paper_baselines:
        raise SolError("--match-summary only makes sense with --paper-baselines")
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    blocks = _text_blocks(args, tok, args.context + args.steps + 1)
    settings = ActionSettings(args.criterion, args.page_size, args.sinks, args.window, args.faithful)
    calibration = None
    if any(c.startswith("heads") for c in args.controller):  # head importance from the validation split
        calibration = torch.from_numpy(data.blocks(args.data, "validation", tok, args.context + args.steps + 1,
                                                   max_blocks=16))
    if args.match_summary:  # the policy was scored by an earlier job: read its summary, run the baselines only
        summary, per_block = _read_summary(args.match_summary), pd.DataFrame()
    else:
        summary, per_block = eval_ppl(model, args.model, blocks, args.controller, args.budget, args.context,
                                      args.episode or args.steps, args.batch, settings, args.seed, calibration,
                                      time_steps=args.time, mode=args.mode, memory_gb=args.memory_gb)
    if args.paper_baselines:
        from sol.evaluate import paper_baselines
        from sol.registry import build

        pols = [c for c in args.controller if c.split(":", 1)[0] in POLICY_KINDS]
        if not pols:
            raise SolError("--paper-baselines needs a policy:PATH, policy-tracked:PATH or policy-os:PATH controller")
        if not (summary.method == pols[0].split(":", 1)[0]).any():
            raise SolError(f"{args.match_summary} has no '{pols[0].split(':', 1)[0]}' rows to match")
        grid = build(pols[0], args.model).grid  # baselines match the first policy listed
        selection = _sample(torch.from_numpy(data.blocks(args.data, "validation", tok, args.context + args.steps + 1)),
                            args.selection_blocks, args.seed)
        extra, extra_blocks = paper_baselines(model, args.model, summary, blocks, selection, grid,
                                              args.context, args.episode or args.steps, args.batch,
                                              args.paper_baselines, settings, args.seed, args.select_on_eval,
                                              primary=pols[0].split(":", 1)[0], memory_gb=args.memory_gb,
                                              kinds=args.baselines, match=args.match)
        if args.match_summary:  # only the baselines: the policy's rows stay in its own job's file
            summary, per_block = extra, extra_blocks
        else:
            summary = pd.concat([summary, extra], ignore_index=True)
            per_block = pd.concat([per_block, extra_blocks], ignore_index=True)
    cols = ["method", "budget", "ppl", "ppl_lo", "ppl_hi", "flop_keep", "total_keep", "net_keep", "tokens"]
    cols += ["step_ms", "time_ratio"] if args.time else []
    print(summary[cols].to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        write_csv(args.out, summary)
        write_csv(_blocks_path(args.out), per_block)
        print(f"wrote {args.out}")


def _read_summary(path: str):
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise SolError(f"cannot read summary {path}: {e}") from None
    missing = {"method", "budget", "token_keep", "prune_keep", "bit_ratio", "total_keep"} - set(df.columns)
    if missing:
        raise SolError(f"{path} is not an eval ppl summary (no column '{sorted(missing)[0]}')")
    return df


def cmd_eval_merge(args) -> None:
    """Concatenate eval ppl summaries (and their per-block files) written by separate jobs into one."""
    import pandas as pd

    from sol.io import write_csv

    parts = [(_read_summary(p), _read_blocks(p)) for p in args.parts]
    summary = pd.concat([s for s, _ in parts], ignore_index=True)
    dup = summary[summary.duplicated(["method", "budget"], keep=False)]
    if len(dup):
        raise SolError(f"method '{dup.method.iloc[0]}' at budget {dup.budget.iloc[0]} appears in two parts")
    write_csv(_blocks_path(args.out), pd.concat([b for _, b in parts], ignore_index=True))
    write_csv(args.out, summary)
    print(f"wrote {args.out} ({len(summary)} rows from {len(parts)} parts)")


def _read_blocks(path: str):
    import pandas as pd

    try:
        return pd.read_csv(_blocks_path(path))
    except (OSError, ValueError) as e:
        raise SolError(f"cannot read per-block file {_blocks_path(path)}: {e}") from None


def cmd_eval_mmlu(args) -> None:
    import pandas as pd

    from sol import mmlu
    from sol.io import write_csv, write_json
    from sol.lm_eval_model import SolLM
    from sol.models import cache_dir, load

    _threads(args.threads)
    _check_budgets(args.budget)
    tasks = mmlu.prepare(cache_dir() / "mmlu")
    group = f"sol_mmlu_{args.style}" + (f"_{args.shots}shot" if args.shots else "")
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    rows, per_q, subjects = [], [], {}

    def run(lm, budget):
        lm.budget = budget if budget == budget else 1.0
        lm.reset_usage()
        summary, questions = mmlu.evaluate(lm, tasks, group, args.per_subject or None, args.seed)
        name = lm.built.controller.name
        rows.append({"method": name, "budget": budget, "acc": summary["acc"], "acc_norm": summary["acc_norm"],
                     "questions": summary["questions"], **lm.usage(), "group": group, "model": args.model})
        per_q.extend({"method": name, "budget": budget, **q} for q in questions)
        subjects[f"{name}@{budget}"] = summary["subjects"]
        return rows[-1]

    for spec in args.controller:
        lm = SolLM(model=args.model, controller=spec, pretrained=model, tokenizer=tok, episode=args.episode)
        for budget in (args.budget if lm.built.uses_budget else [float("nan")]):
            usage = run(lm, budget)
            if args.paper_baselines and lm.built.uses_budget:  # the matched mix at the policy's total keep
                from baselines.schedules import Matched, flop_matched_targets

                from sol.registry import Built

                grid = lm.built.grid
                targets = {"token_keep": usage["token_keep"], "prune_keep": usage["prune_keep"],
                           "bits": usage["bit_ratio"] * 16}
                if args.match == "total":  # on the very questions, batches and episodes just scored (dry runs)
                    targets = flop_matched_targets(grid, targets, usage["total_keep"], iters=30,
                                                   keep_of=lambda ctrl: lm.spend(ctrl)["flop_keep"])
                matched = Built(Matched(grid, targets), grid)
                run(SolLM(model=args.model, controller=matched, pretrained=model, tokenizer=tok,
                          episode=args.episode), budget)
    df = pd.DataFrame(rows)
    print(df[["method", "budget", "acc", "acc_norm", "flop_keep", "questions"]].to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        write_csv(args.out, df)
        write_csv(_suffix(args.out, ".questions.csv"), pd.DataFrame(per_q))
        write_json(_suffix(args.out, ".subjects.json"), subjects)
        print(f"wrote {args.out}")


def cmd_lm_eval(args) -> None:
    """lm-eval's own CLI with the ``sol`` model registered."""
    import lm_eval.__main__

    import sol.lm_eval_model  # noqa: F401 - registers --model sol

    sys.argv = ["lm-eval", *args.rest]
    lm_eval.__main__.cli_evaluate()


def cmd_export(args) -> None:
    from sol.models import export

    print(f"wrote {export(args.model, args.out, args.dtype)}")


def _text_blocks(args, tok, length: int):
    import torch

    from sol import data

    return _sample(torch.from_numpy(data.blocks(args.data, args.split, tok, length)), args.blocks, args.seed)


def _sample(blocks, n: int, seed: int):
    """A seeded random sample of ``n`` blocks (all when n is 0): drawn across the split's documents, not its first."""
    import torch

    if not n:
        return blocks
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]]


def _mmlu_blocks(tok, n: int, seed: int):
    """Token-difficulty workload from MMLU: "Question: …\nAnswer: <correct answer>" (continuation style)."""
    import random

    import torch

    from sol.mmlu import load_test

    rows = random.Random(seed).sample(load_test(), n)
    out = []
    for r in rows:
        ctx = tok.encode(f"Question: {r['question'].strip()}\nAnswer:", add_special_tokens=False)
        cont = tok.encode(" " + r["choices"][r["answer"]], add_special_tokens=False)
        out.append((torch.tensor([ctx + cont]), len(ctx) - 1))
    return out


def cmd_profile(args) -> None:
    import pandas as pd

    from sol import figures
    from sol.engine import Engine
    from sol.io import write_csv, write_json
    from sol.models import load
    from sol.studies import difficulty_summary, token_difficulty

    _threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model)
    if args.data == "mmlu":
        parts = []
        for i, (block, ctx) in enumerate(_mmlu_blocks(tok, args.blocks or 200, args.seed)):
            parts.append(token_difficulty(engine, block, ctx).assign(block=i))
        df = pd.concat(parts, ignore_index=True)
    else:
        df = token_difficulty(engine, _text_blocks(args, tok, args.context + args.steps + 1), args.context)
    summary = difficulty_summary(df) | {"model": args.model, "workload": args.data}
    out = Path(args.out)
    write_csv(out / "token_difficulty.csv", df)
    write_json(out / "token_difficulty.json", summary)
    figures.token_difficulty(df, out / "token_difficulty.pdf", f"{args.model} on {args.data}: "
                             f"{summary['frac_top1_gt_0.9']:.1%} of steps with top-1 > 0.9")
    print(json.dumps(summary, indent=1))


def cmd_kv_pollution(args) -> None:
    from sol import figures
    from sol.engine import Engine
    from sol.io import write_csv
    from sol.models import load
    from sol.studies import kv_pollution

    _threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    blocks = _text_blocks(args, tok, args.context + args.corrupt + args.tail + 1)
    summary, curves = kv_pollution(Engine(model), blocks, args.context, args.corrupt, batch=args.batch)
    out = Path(args.out)
    write_csv(out / "kv_pollution.csv", summary)
    write_csv(out / "kv_pollution_curves.csv", curves)
    figures.kv_pollution(summary, out / "kv_pollution.pdf")
    print(summary.to_markdown(index=False, floatfmt=".3g"))


def cmd_headroom(args) -> None:
    from sol.engine import Engine
    from sol.io import write_csv, write_json
    from sol.models import load
    from sol.studies import headroom, where_it_hurts

    _threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    blocks = _text_blocks(args, tok, args.context + args.steps + 1)
    cast = int if args.axis == "bits" else float
    summary, diag = headroom(Engine(model), blocks, args.context, args.axis, cast(args.low), cast(args.high),
                             cast(args.mid), args.hi_share, args.seeds, args.batch)
    hurts = where_it_hurts(diag)
    out = Path(args.out)
    tag = f"{args.axis}_{args.low}_{args.high}"
    write_csv(out / f"headroom_{tag}.csv", summary)
    write_json(out / f"where_it_hurts_{tag}.json", hurts)
    print(summary[["schedule", "ppl", "gap_closed", "gap_lo", "gap_hi"]].to_markdown(index=False, floatfmt=".3g"))
    print(json.dumps(hurts, indent=1))


def cmd_timeline(args) -> None:
    from sol import figures
    from sol.engine import Engine
    from sol.io import write_csv, write_json
    from sol.models import load
    from sol.registry import build
    from sol.runtime import Runtime
    from sol.studies import action_timeline, timeline_summary

    _threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    built = build(args.controller, args.model)
    blocks = _text_blocks(args, tok, args.context + args.steps + 1)
    df = action_timeline(Runtime(Engine(model), built.grid), built.controller, blocks, args.budget, args.context,
                         args.episode, tok)
    out = Path(args.out)
    write_csv(out / "action_timeline.csv", df)
    figures.action_timeline(df, out / "action_timeline.pdf")
    summary = timeline_summary(df)
    write_json(out / "action_timeline.json", summary)
    print(json.dumps(summary, indent=1))


def cmd_report(args) -> None:
    from sol.report import build_report

    build_report(Path(args.results), Path(args.config), args.model, args.primary)
    print((Path(args.results) / "claims.md").read_text())


def cmd_claims(args) -> None:
    from sol.report import check, sanity

    problems = []
    for res in args.results:
        found = check(Path(res), Path(args.config) if args.config else None)
        if args.sanity:
            found += sanity(Path(res))
        problems += [f"{res}: {p}" for p in found]
    if problems:
        for p in problems:  # one line per discrepancy, then the one error line
            print(p, file=sys.stderr)
        raise SolError(f"claims check failed: {len(problems)} discrepanc{'y' if len(problems) == 1 else 'ies'} "
                       f"(listed above)")
    print(f"claims check passed: {', '.join(args.results)}")


def _suffix(out: str, suffix: str) -> str:
    return (out[:-4] if out.endswith(".csv") else out) + suffix


def _blocks_path(out: str) -> str:
    return out[:-4] + ".blocks.csv" if out.endswith(".csv") else out + ".blocks.csv"


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _parse_action(text: str):
    from sol.actions import Action

    try:
        k, p, b = text.split(",")
        return Action(float(k), float(p), int(b))
    except ValueError:
        raise SolError(f"bad action '{text}': write token_keep,prune_keep,bits, e.g. 0.5,0.5,8") from None


class _Parser(argparse.ArgumentParser):
    """argparse with the suite's failure contract: one ``error:`` line, exit status 2, nothing else printed."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _bounded(kind, lo: float, hi: float | None = None, lo_open: bool = False):
    """An argparse type: ``kind`` within [lo, hi] ((lo, hi] with ``lo_open``)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            span = f"{'(' if lo_open else '['}{lo:g}, {'∞)' if hi is None else f'{hi:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} is out of range {span}")
        return v
    parse.__name__ = kind.__name__
    return parse


# lower bounds of integer options (all others: ≥ 0) and ranges of float options (all others: > 0)
_INT_MIN = {"steps": 1, "context": 1, "batch": 1, "kv_len": 1, "page_size": 1, "threads": 1, "selection_blocks": 1,
            "seeds": 1, "tail": 1, "corrupt": 1}
_FLOAT_RANGE = {"budget": (0.0, 1.0, True), "hi_share": (0.0, 1.0, False)}


def _validate_numbers(parser: argparse.ArgumentParser) -> None:
    """Give every numeric option of every subcommand a bounded type."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _validate_numbers(sub)
        elif action.type is int:
            action.type = _bounded(int, _INT_MIN.get(action.dest, 0))
        elif action.type is float:
            lo, hi, lo_open = _FLOAT_RANGE.get(action.dest, (0.0, None, True))
            action.type = _bounded(float, lo, hi, lo_open)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sol", description="Self-Optimizing Language Models: reproduce and measure.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="FLOPs and wall-clock per decode step for each action (compute path)")
    b.add_argument("--model", nargs="+", default=["smollm2-135m"], help="model names or paths (default smollm2-135m)")
    b.add_argument("--kv-len", type=int, nargs="+", default=[256, 1024], help="key lengths (default 256 1024)")
    b.add_argument("--actions", nargs="*", help="extra actions as token_keep,prune_keep,bits (default: a fixed set)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per action (default 30)")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--dtype", default="float32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default $OMP_NUM_THREADS or 1)")
    b.add_argument("--criterion", default="quest", choices=["quest", "recency"])
    b.add_argument("--page-size", type=int, default=8)
    b.add_argument("--sinks", type=int, default=4)
    b.add_argument("--window", type=int, default=8)
    b.add_argument("--faithful", action="store_true", help="reference semantics (no forced sinks/window, output quant)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-counters", action="store_true",
                   help="skip the fvcore / torch.utils.flop_counter counts (large models at long context)")
    b.add_argument("--out", help="write the table as CSV here")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train a SOL policy with GRPO (resumes from OUT/policy_latest.pt)")
    t.add_argument("--config", help="YAML train config (keys: see README); default: built-in defaults")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. updates=10")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, policy.pt")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate controllers").add_subparsers(dest="what", required=True)
    e = ev.add_parser("ppl", help="perplexity at matched compute on held-out blocks")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--controller", nargs="+", default=["dense"], help="controller specs (see README: dense, "
                   "uniform:K,P,B, matched:..., random:..., emc:..., dac:..., policy:PATH, weights:bits=4)")
    e.add_argument("--budget", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9],
                   help="requested FLOP keep(s) for policies (default 0.6 0.7 0.8 0.9)")
    e.add_argument("--data", default="enwiki", help="enwiki, a .txt file, a folder of .txt files or hf:NAME[/CONFIG]")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--blocks", type=int, default=0, help="number of blocks (seeded sample; default all)")
    e.add_argument("--context", type=int, default=256)
    e.add_argument("--steps", type=int, default=64, help="scored decode steps per block")
    e.add_argument("--episode", type=int, default=16, help="dense refresh every N steps (0: never)")
    e.add_argument("--batch", type=int, default=8, help="blocks per timed step (--time)")
    e.add_argument("--memory-gb", type=float, default=2.0,
                   help="memory for one batch of rows (KV caches + step buffers); sets the rows per batch")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--criterion", default="quest", choices=["quest", "recency"])
    e.add_argument("--page-size", type=int, default=8)
    e.add_argument("--sinks", type=int, default=4)
    e.add_argument("--window", type=int, default=8)
    e.add_argument("--faithful", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--paper-baselines", type=int, default=0, metavar="N",
                   help="at each policy budget also run matched, EMC, DAC and N random permutations (best-of-N "
                        "selected on the validation split)")
    e.add_argument("--selection-blocks", type=int, default=16, help="validation blocks for best-of-N and static-best selection (a seeded sample across documents)")
    e.add_argument("--baselines", nargs="+", default=list(BASELINE_KINDS), choices=BASELINE_KINDS,
                   help="which paper baselines to run: matched (matched, EMC, DAC), random (N trials + best-of-N), "
                        "static (static-best); the pipeline runs each as its own job")
    e.add_argument("--match-summary", metavar="CSV",
                   help="match the baselines to the policy rows of this eval ppl summary (written by an earlier "
                        "job) instead of scoring --controller; writes the baselines' rows only")
    e.add_argument("--match", default="total", choices=["total", "axes"],
                   help="total (default): baselines realise the policy's total keep (LM FLOPs + its own MACs); "
                        "axes: the reference's rule, the policy's per-axis averages as they are")
    e.add_argument("--select-on-eval", action="store_true",
                   help="reference behaviour: pick best-of-N on the evaluation blocks themselves (optimistic)")
    e.add_argument("--time", action="store_true", help="time every decode step; report the ratio to dense")
    e.add_argument("--mode", default="simulate", choices=["simulate", "compute"],
                   help="execution mode (same numbers; compute really skips work, use it with --time)")
    e.add_argument("--out", help="summary CSV; per-block NLLs go to <out>.blocks.csv")
    e.set_defaults(func=cmd_eval_ppl)

    mg = ev.add_parser("merge", help="concatenate eval ppl summaries of separate jobs (and their .blocks.csv)")
    mg.add_argument("parts", nargs="+", help="summary CSVs")
    mg.add_argument("--out", required=True)
    mg.set_defaults(func=cmd_eval_merge)

    m = ev.add_parser("mmlu", help="MMLU through lm-eval (offline data) at matched compute")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--controller", nargs="+", default=["dense"], help="controller specs, as for eval ppl")
    m.add_argument("--budget", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    m.add_argument("--style", default="continuation", choices=["continuation", "letter"])
    m.add_argument("--shots", type=int, default=0, choices=[0, 5], help="0 (exact) or 5 (approximate dev exemplars)")
    m.add_argument("--per-subject", type=int, default=0, help="first N questions per subject (default: all 14,042)")
    m.add_argument("--episode", type=int, default=16)
    m.add_argument("--paper-baselines", action="store_true",
                   help="after each policy budget, run the matched two-level mix at the policy's total keep")
    m.add_argument("--match", default="total", choices=["total", "axes"],
                   help="total (default): the matched mix realises the policy's total keep (LM + its MACs) on the same "
                        "questions; axes: the reference's rule, the policy's per-axis averages as they are")
    m.add_argument("--dtype", default="float32")
    m.add_argument("--device", default="cpu")
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", help="summary CSV; per-question results go to <out>.questions.csv")
    m.set_defaults(func=cmd_eval_mmlu)

    def text_args(q, blocks=32):
        q.add_argument("--model", default="smollm2-135m")
        q.add_argument("--data", default="enwiki")
        q.add_argument("--split", default="test", choices=["train", "validation", "test"])
        q.add_argument("--blocks", type=int, default=blocks)
        q.add_argument("--context", type=int, default=256)
        q.add_argument("--batch", type=int, default=8)
        q.add_argument("--dtype", default="float32")
        q.add_argument("--device", default="cpu")
        q.add_argument("--threads", type=int, default=None)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", required=True, help="output folder")

    pr = sub.add_parser("profile", help="token difficulty: dense top-1 probability and entropy per decode step")
    text_args(pr)
    pr.add_argument("--steps", type=int, default=64)
    pr.set_defaults(func=cmd_profile)

    st = sub.add_parser("study", help="side studies").add_subparsers(dest="study", required=True)
    kv = st.add_parser("kv-pollution", help="corrupt a few steps under one axis, measure the dense tail")
    text_args(kv)
    kv.add_argument("--corrupt", type=int, default=4)
    kv.add_argument("--tail", type=int, default=32)
    kv.set_defaults(func=cmd_kv_pollution)

    hr = st.add_parser("headroom", help="uniform vs random/entropy/oracle two-level schedules on one axis")
    text_args(hr)
    hr.add_argument("--steps", type=int, default=256)
    hr.add_argument("--axis", default="prune_keep", choices=["prune_keep", "bits", "token_keep"])
    hr.add_argument("--low", required=True)
    hr.add_argument("--high", required=True)
    hr.add_argument("--mid", required=True, help="the uniform level U at the same mean cost")
    hr.add_argument("--hi-share", type=float, required=True, help="share of positions at the high level")
    hr.add_argument("--seeds", type=int, default=3)
    hr.set_defaults(func=cmd_headroom)

    tl = sub.add_parser("timeline", help="per-token actions of a controller next to the dense entropy")
    text_args(tl, blocks=2)
    tl.add_argument("--controller", required=True)
    tl.add_argument("--budget", type=float, default=0.7)
    tl.add_argument("--steps", type=int, default=64)
    tl.add_argument("--episode", type=int, default=16)
    tl.set_defaults(func=cmd_timeline)

    rp = sub.add_parser("report", help="figures, tables and claims.{json,md} from a results folder")
    rp.add_argument("--results", required=True)
    rp.add_argument("--config", required=True, help="the pipeline config that produced the results (provenance)")
    rp.add_argument("--model", required=True)
    rp.add_argument("--primary", default="policy", choices=list(POLICY_KINDS),
                    help="the SOL variant the claims are about (the one the paper baselines were matched to)")
    rp.set_defaults(func=cmd_report)

    cl = sub.add_parser("claims", help="check claims.json: schema, provenance, verdicts recomputed from the data")
    cl.add_argument("--check", dest="results", nargs="+", required=True, metavar="RESULTS_DIR")
    cl.add_argument("--config", help="config file whose sha256 the provenance must match")
    cl.add_argument("--sanity", action="store_true", help="also apply loose sanity bounds (fresh CI runs)")
    cl.set_defaults(func=cmd_claims)

    ex = sub.add_parser("export", help="write a model as a plain HF folder (weights, config, tokenizer) that "
                                       "from_pretrained and `lm_eval --model hf` load")
    ex.add_argument("model", help="any model sol loads: a packaged name, a .gguf file, a folder, a hub id")
    ex.add_argument("out", help="the folder to write (must not exist, or be empty)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.set_defaults(func=cmd_export)

    le = sub.add_parser("lm-eval", help="lm-eval's own CLI with --model sol registered", add_help=False)
    le.add_argument("rest", nargs=argparse.REMAINDER)
    le.set_defaults(func=cmd_lm_eval)
    _validate_numbers(p)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        args = argparse.Namespace(func=cmd_lm_eval, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
