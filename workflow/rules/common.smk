# Shared settings. Every command string is built here in Python, so rules stay one line of `sol ...` each.
CONFIG_FILE = str(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "workflow/configs/default.yaml"
OUT = config["out"]
MODEL = config["model"]
EV = config["eval"]
MM = config["mmlu"]
ST = config["studies"]
DEVICE = config.get("device", "cpu")


def env(threads):
    """A rule's threads set its OpenMP threads (two processes spinning on 2 cores slow each other ~40x)."""
    return f"OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE={1 if config.get('offline', True) else 0}"


def words(xs):
    return " ".join(str(x) for x in xs)


def quoted(xs):
    return " ".join(f"'{x}'" for x in xs)


TEXT = (f"--model {MODEL} --data {config['data']} --context {EV['context']} --steps {EV['steps']} "
        f"--episode {EV['episode']} --blocks {EV['blocks']} --batch {EV['batch']} --device {DEVICE}")
CMD = {
    "eval_ppl": f"sol eval ppl {TEXT} --budget {words(EV['budgets'])} --paper-baselines {EV['random_trials']}",
    "eval_uniform": f"sol eval ppl {TEXT} --controller dense {quoted(EV['uniform'])}",
    "eval_mmlu": (f"sol eval mmlu --model {MODEL} --budget {words(MM['budgets'])} --paper-baselines --style "
                  f"{MM['style']} --shots {MM['shots']} --per-subject {MM['per_subject']} --episode {EV['episode']} "
                  f"--device {DEVICE}"),
    "bench": (f"sol bench --model {MODEL} --kv-len {words(config['bench']['kv_len'])} "
              f"--steps {config['bench']['steps']} --device {DEVICE}"),
    "profile": (f"sol profile --model {MODEL} --data {config['data']} --context {EV['context']} "
                f"--steps {EV['steps']} --blocks {ST['profile_blocks']} --device {DEVICE} --out {OUT}"),
    "kv_pollution": (f"sol study kv-pollution --model {MODEL} --data {config['data']} --context {EV['context']} "
                     f"--blocks {ST['kv_blocks']} --tail {ST['kv_tail']} --device {DEVICE} --out {OUT}"),
    "timeline": (f"sol timeline --model {MODEL} --data {config['data']} --context {EV['context']} --steps {EV['steps']} "
                 f"--episode {EV['episode']} --budget {ST['timeline_budget']} --device {DEVICE} --out {OUT}"),
    # all blocks in one batch: the oracle's |grid|·H probe steps per decode step dominate, wider steps amortise them
    "eval_oracle": (f"sol eval ppl {TEXT} --batch {EV['blocks']} --budget {words(EV.get('oracle_budgets', EV['budgets']))} "
                    f"--controller '{EV.get('oracle', '')}'"),
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
