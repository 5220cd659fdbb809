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
