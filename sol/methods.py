"""Method names shared by the registry, the CLI, the report and the figures (one place, no torch import)."""

POLICY_KINDS = ("policy", "policy-tracked", "policy-os")  # the SOL variants: trained policies, one name each
