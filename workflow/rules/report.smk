FIGURES = ["pareto_ppl", "pareto_mmlu", "pareto_netkeep", "budget_adherence", "random_violin", "kv_pollution",
           "token_difficulty", "action_timeline", "step_cost", "damage_curves"]


rule report:
    """Figures (PDF + PNG), tables (markdown + LaTeX) and claims.{json,md}."""
    input:
        rules.eval_ppl.output,
        rules.eval_uniform.output,
        rules.eval_mmlu.output,
        [f"{OUT}/mmlu_{s}.csv" for s in OTHER_STYLES],
        rules.bench.output,
        rules.profile.output,
        rules.kv_pollution.output,
        rules.timeline.output,
        [rules.eval_oracle.output.csv] if EV["oracle"] else [],
        expand(rules.headroom.output, tag=list(HEADROOM)) if HR.get("in_all", True) else [],
    output:
        claims=f"{OUT}/claims.json",
        claims_md=f"{OUT}/claims.md",
        figures=[f"{OUT}/{f}.pdf" for f in FIGURES],
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv",
    params:
        cmd=CMD["report"],
    shell:
        "{params.cmd} > {log} 2>&1"


rule claims:
    """The claims check CI runs on a fresh run (schema, provenance, verdicts from the data, sanity bounds)."""
    input:
        rules.report.output.claims,
    output:
        f"{OUT}/.claims_checked",  # the sha256 of the claims.json it passed: a new report is a new stamp to commit
    log:
        f"{OUT}/logs/claims.log",
    params:
        cmd=CMD["claims"],
    shell:
        "({params.cmd} > {log} 2>&1 || (cat {log} >&2; exit 1)) && sha256sum {input} > {output}.tmp && "
        "mv {output}.tmp {output}"


rule all:
    default_target: True
    input:
        rules.claims.output,


rule headroom_study:
    """All rows of the headroom study (studies.headroom.rows). With `in_all: false` they are not part of `all` (they
    cost ≈ 12 min per row on one core); run `snakemake headroom_study` and then `snakemake -f report`: the report
    renders whatever rows exist under headroom/."""
    input:
        expand(rules.headroom.output, tag=list(HEADROOM)),
