rule train:
    """GRPO training of the policy (resumes from its latest checkpoint after an interruption)."""
    priority: 10  # the critical path (train → eval_policy → eval_baselines → report) starts first
    input:
        CONFIG_FILE,
    output:
        f"{OUT}/policy/policy.pt",
    log:
        f"{OUT}/logs/train.log",
    benchmark:
        f"{OUT}/benchmarks/train.tsv",
    threads: SLOT
    params:
        env=env(),
        out=f"{OUT}/policy",
    shell:
        "{params.env} sol train --config {input} --out {params.out} > {log} 2>&1"
