rule eval_policy:
    """The policy at every budget (and the trained variants of train_variants), and dense."""
    priority: 9  # the critical path (train → eval_policy → eval_baselines → report) starts first
    input:
        policy=rules.train.output,
        variants=[f"{OUT}/{v}/policy.pt" for v in VARIANTS],
    output:
        csv=f"{OUT}/parts/ppl_policy.csv",
        blocks=f"{OUT}/parts/ppl_policy.blocks.csv",
    log:
        f"{OUT}/logs/eval_policy.log",
    benchmark:
        f"{OUT}/benchmarks/eval_policy.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_policy"],
        primary=EV["primary"],
        secondary=lambda wc, input: f"{EV['secondary']}:{input.policy}" if EV.get("secondary") else "",
        variants=lambda wc, input: " ".join(f"{v}:{p}" for v, p in zip(VARIANTS, input.variants)),
    shell:
        "{params.env} {params.cmd} --controller {params.primary}:{input.policy} {params.secondary} {params.variants} "
        "dense --out {output.csv} > {log} 2>&1"


rule eval_baselines:
    """One kind of the paper's baselines at every policy operating point, matched to the policy's total keep:
    matched (matched mix, EMC, DAC), random (best-of-N permutations), static (static-best). Kinds run side by side."""
    priority: 8
    input:
        policy=rules.train.output,
        summary=rules.eval_policy.output.csv,
    output:
        csv=f"{OUT}/parts/ppl_{{kind}}.csv",
        blocks=f"{OUT}/parts/ppl_{{kind}}.blocks.csv",
    wildcard_constraints:
        kind="|".join(BASELINE_KINDS),
    log:
        f"{OUT}/logs/eval_baselines_{{kind}}.log",
    benchmark:
        f"{OUT}/benchmarks/eval_baselines_{{kind}}.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_baselines"],
        primary=EV["primary"],
    shell:
        "{params.env} {params.cmd} --controller {params.primary}:{input.policy} --baselines {wildcards.kind} "
        "--match-summary {input.summary} --out {output.csv} > {log} 2>&1"


rule eval_ppl:
    """ppl.csv: the policy, dense and every paper baseline in one summary (and one per-block file)."""
    input:
        [f"{OUT}/parts/ppl_{kind}.csv" for kind in ("policy", *BASELINE_KINDS)],
    output:
        csv=f"{OUT}/ppl.csv",
        blocks=f"{OUT}/ppl.blocks.csv",
    log:
        f"{OUT}/logs/eval_ppl.log",
    params:
        env=env(),
    shell:
        "{params.env} sol eval merge {input} --out {output.csv} > {log} 2>&1"


rule eval_uniform:
    """True uniform compression levels, static int-k weights, fixed head pruning, dense."""
    output:
        csv=f"{OUT}/ppl_uniform.csv",
        blocks=f"{OUT}/ppl_uniform.blocks.csv",
    log:
        f"{OUT}/logs/eval_uniform.log",
    benchmark:
        f"{OUT}/benchmarks/eval_uniform.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_uniform"],
    shell:
        "{params.env} {params.cmd} --out {output.csv} > {log} 2>&1"


rule eval_oracle:
    """The greedy lookahead oracle (eval.oracle) at the policy's budgets on the same blocks: a non-causal bound."""
    output:
        csv=f"{OUT}/ppl_oracle.csv",
        blocks=f"{OUT}/ppl_oracle.blocks.csv",
    log:
        f"{OUT}/logs/eval_oracle.log",
    benchmark:
        f"{OUT}/benchmarks/eval_oracle.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_oracle"],
    shell:
        "{params.env} {params.cmd} --out {output.csv} > {log} 2>&1"


rule headroom:
    """One row of the headroom study (U/R/E/O two-level schedules on one axis), studies.headroom.rows."""
    output:
        f"{OUT}/headroom/headroom_{{tag}}.csv",
    log:
        f"{OUT}/logs/headroom_{{tag}}.log",
    benchmark:
        f"{OUT}/benchmarks/headroom_{{tag}}.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["headroom"],
        opts=lambda wc: HEADROOM[wc.tag],
    shell:
        "{params.env} {params.cmd} {params.opts} > {log} 2>&1"


rule eval_mmlu:
    """MMLU (offline, lm-eval) for the policy, the matched mix at its realised averages, uniform levels and dense."""
    priority: 5  # the critical path (train → eval_ppl → report) starts first
    input:
        policy=rules.train.output,
    output:
        csv=f"{OUT}/mmlu.csv",
        questions=f"{OUT}/mmlu.questions.csv",
    log:
        f"{OUT}/logs/eval_mmlu.log",
    benchmark:
        f"{OUT}/benchmarks/eval_mmlu.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_mmlu"],
        style=CLAIM_STYLE,
        uniform=quoted(MM["uniform"]),
        primary=EV["primary"],
    shell:
        "{params.env} {params.cmd} --style {params.style} --controller {params.primary}:{input.policy} dense "
        "{params.uniform} --out {output.csv} > {log} 2>&1"


rule eval_mmlu_style:
    """The same MMLU run in each other style of mmlu.style (claim 1's rule reported on it as a secondary line)."""
    priority: 5
    input:
        policy=rules.train.output,
    output:
        csv=f"{OUT}/mmlu_{{style}}.csv",
        questions=f"{OUT}/mmlu_{{style}}.questions.csv",
    wildcard_constraints:
        style="|".join(OTHER_STYLES) or "no-style",
    log:
        f"{OUT}/logs/eval_mmlu_{{style}}.log",
    benchmark:
        f"{OUT}/benchmarks/eval_mmlu_{{style}}.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["eval_mmlu"],
        uniform=quoted(MM["uniform"]),
        primary=EV["primary"],
    shell:
        "{params.env} {params.cmd} --style {wildcards.style} --controller {params.primary}:{input.policy} dense "
        "{params.uniform} --out {output.csv} > {log} 2>&1"


rule bench:
    """FLOPs and wall-clock per decode step for each action (1 thread, and it claims every scheduler core: timings
    need a quiet machine)."""
    output:
        f"{OUT}/bench.csv",
    log:
        f"{OUT}/logs/bench.log",
    benchmark:
        f"{OUT}/benchmarks/bench.tsv",
    threads: workflow.cores
    params:
        env=env(),
        cmd=CMD["bench"],
    shell:
        "{params.env} {params.cmd} --out {output} > {log} 2>&1"


rule profile:
    """Token difficulty of the workload under the dense model."""
    output:
        f"{OUT}/token_difficulty.csv",
    log:
        f"{OUT}/logs/profile.log",
    benchmark:
        f"{OUT}/benchmarks/profile.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["profile"],
    shell:
        "{params.env} {params.cmd} > {log} 2>&1"


rule kv_pollution:
    output:
        f"{OUT}/kv_pollution.csv",
    log:
        f"{OUT}/logs/kv_pollution.log",
    benchmark:
        f"{OUT}/benchmarks/kv_pollution.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["kv_pollution"],
    shell:
        "{params.env} {params.cmd} > {log} 2>&1"


rule timeline:
    input:
        policy=rules.train.output,
    output:
        f"{OUT}/action_timeline.csv",
    log:
        f"{OUT}/logs/timeline.log",
    benchmark:
        f"{OUT}/benchmarks/timeline.tsv",
    threads: SLOT
    params:
        env=env(),
        cmd=CMD["timeline"],
        primary=EV["primary"],
    shell:
        "{params.env} {params.cmd} --controller {params.primary}:{input.policy} > {log} 2>&1"
