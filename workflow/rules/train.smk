rule train:
    """GRPO training of the policy (resumes from its latest checkpoint after an interruption)."""
    priority: 10  # the critical path (train → eval_policy → eval_baselines → report) starts first
    output:
        f"{OUT}/policy/policy.pt",
    log:
        f"{OUT}/logs/train.log",
    benchmark:
        f"{OUT}/benchmarks/train.tsv",
    threads: SLOT
    params:
        env=env(),
        out=lambda wc, output: os.path.dirname(output[0]),
        config=CONFIG_FILE,
        # the train block itself is the rerun trigger (a params change): editing any other key of the config file
        # does not retrain
        train=json.dumps(config["train"], sort_keys=True),
    shell:
        "{params.env} sol train --config {params.config} --out {params.out} > {log} 2>&1"


rule train_variant:
    """A trained SOL variant of train_variants (ours, e.g. policy-os: oracle supervision before GRPO): the train block
    with the variant's keys changed, evaluated beside the primary policy."""
    output:
        f"{OUT}/{{variant}}/policy.pt",
    wildcard_constraints:
        variant="|".join(VARIANTS) or "no-variant",
    log:
        f"{OUT}/logs/train_{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_{{variant}}.tsv",
    threads: SLOT
    params:
        env=env(),
        out=lambda wc, output: os.path.dirname(output[0]),
        config=CONFIG_FILE,
        sets=lambda wc: " ".join(f"'{k}={json.dumps(v)}'" for k, v in config["train_variants"][wc.variant].items()),
        train=lambda wc: json.dumps({**config["train"], **config["train_variants"][wc.variant]}, sort_keys=True),
    shell:
        "{params.env} sol train --config {params.config} --set {params.sets} --out {params.out} > {log} 2>&1"
