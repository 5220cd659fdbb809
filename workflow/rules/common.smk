import json
import os

from snakemake.utils import validate

from baselines import BASELINE_KINDS

# The config's contract: workflow/schemas/config.schema.yaml (types, ranges, no unknown keys; defaults filled in).
validate(config, "../schemas/config.schema.yaml")
for key in ("model", "data"):  # the train block trains the model the rest of the pipeline evaluates
    if config["train"].get(key, config[key]) != config[key]:
        raise ValueError(f"config: train.{key} ({config['train'][key]}) differs from {key} ({config[key]})")

# Shared settings. Every command string is built here in Python, so rules stay one line of `sol ...` each.
CONFIG_FILE = str(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "workflow/configs/default.yaml"
OUT = config["out"]
MODEL = config["model"]
EV = config["eval"]
MM = config["mmlu"]
ST = config["studies"]
DEVICE = config["device"]
VARIANTS = list(config.get("train_variants", {}))  # more trained SOL variants (ours), evaluated beside the primary
# MMLU styles: claim 1's (pre-registered) writes mmlu.csv, every other style mmlu_<style>.csv
MMLU_STYLES = [MM["style"]] if isinstance(MM["style"], str) else list(MM["style"])
CLAIM_STYLE = MM.get("claim_style", MMLU_STYLES[0])
if CLAIM_STYLE not in MMLU_STYLES:
    raise ValueError(f"config: mmlu.claim_style {CLAIM_STYLE} is not one of mmlu.style {MMLU_STYLES}")
OTHER_STYLES = [s for s in MMLU_STYLES if s != CLAIM_STYLE]


# Threads. Small decode ops run slower with more intra-op threads on CPU (one eval, measured on the 2-core machine:
# 25.8 s with 1 thread, 33.1 s with 2, 40.3 s with 8), so every rule runs `threads` (config key, default 1, set by
# that measurement) and rules run side by side. A job claims SLOT scheduler cores: with --cores above this machine's
# CPU count (`snakemake --cores 8` on a 2-core machine) each job claims cores/CPUs of them, so at most one job per CPU
# runs at a time and the machine is never oversubscribed.
THREADS = config["threads"]
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
SLOT = max(1, -(-workflow.cores // CPUS) * THREADS) if workflow.cores else THREADS


def env(threads=THREADS):
    """A rule's OpenMP threads (two processes spinning on 2 cores slow each other ~40x)."""
    return f"OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE={1 if config['offline'] else 0}"


def words(xs):
    return " ".join(str(x) for x in xs)


def quoted(xs):
    return " ".join(f"'{x}'" for x in xs)


TEXT = (f"--model {MODEL} --data {config['data']} --context {EV['context']} --steps {EV['steps']} "
        f"--episode {EV['episode']} --blocks {EV['blocks']} --batch {EV['batch']} --memory-gb {EV['memory_gb']} "
        f"--device {DEVICE}")
CMD = {
    "eval_policy": f"sol eval ppl {TEXT} --budget {words(EV['budgets'])}",
    "eval_baselines": (f"sol eval ppl {TEXT} --paper-baselines {EV['random_trials']} "
                       f"--selection-blocks {EV['selection_blocks']} --match {EV['match']}"),
    "eval_uniform": f"sol eval ppl {TEXT} --controller dense {quoted(EV['uniform'])}",
    "eval_mmlu": (f"sol eval mmlu --model {MODEL} --budget {words(MM['budgets'])} --paper-baselines "
                  f"--shots {MM['shots']} --per-subject {MM['per_subject']} --episode {EV['episode']} "
                  f"--match {EV['match']} --device {DEVICE}"),
    "bench": (f"sol bench --model {MODEL} --kv-len {words(config['bench']['kv_len'])} "
              f"--steps {config['bench']['steps']} --device {DEVICE}"),
    "profile": (f"sol profile --model {MODEL} --data {config['data']} --context {EV['context']} "
                f"--steps {EV['steps']} --blocks {ST['profile_blocks']} --device {DEVICE} --out {OUT}"),
    "kv_pollution": (f"sol study kv-pollution --model {MODEL} --data {config['data']} --context {EV['context']} "
                     f"--blocks {ST['kv_blocks']} --tail {ST['kv_tail']} --device {DEVICE} --out {OUT}"),
    "timeline": (f"sol timeline --model {MODEL} --data {config['data']} --context {EV['context']} --steps {EV['steps']} "
                 f"--episode {EV['episode']} --budget {ST['timeline_budget']} --device {DEVICE} --out {OUT}"),
    # all blocks in one batch: the oracle's |grid|·H probe steps per decode step dominate, wider steps amortise them
    # the oracle scores the first oracle_blocks blocks of the same seeded sample (block ids pair with the others)
    "eval_oracle": (f"sol eval ppl {TEXT} --blocks {EV.get('oracle_blocks', EV['blocks'])} "
                    f"--budget {words(EV.get('oracle_budgets', EV['budgets']))} --controller '{EV['oracle']}'"),
    "headroom": (f"sol study headroom --model {MODEL} --data {config['data']} --device {DEVICE} "
                 f"--out {OUT}/headroom"),
    "report": f"sol report --results {OUT} --config {CONFIG_FILE} --model {MODEL} --primary {EV['primary']}",
    "claims": f"sol claims --check {OUT} --config {CONFIG_FILE} --sanity",
}


# Headroom study rows (studies.headroom): output tag -> CLI options (the tag is how `sol study headroom` names files).
HR = ST.get("headroom", {})
HEADROOM = {f"{r['axis']}_{r['low']}_{r['high']}": (
    f"--axis {r['axis']} --low {r['low']} --high {r['high']} --mid {r['mid']} --hi-share {r['hi_share']} "
    f"--blocks {HR['blocks']} --context {HR['context']} --steps {HR['steps']} --batch {HR['batch']}")
    for r in HR.get("rows", [])}
