# SOL reproduction pipeline. Run: `snakemake --cores 8 all` (default config) or
# `snakemake --cores 2 --configfile workflow/configs/ci.yaml claims`. Rules call the `sol` CLI; see README.
configfile: "workflow/configs/default.yaml"


include: "workflow/rules/checkout.smk"
include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
