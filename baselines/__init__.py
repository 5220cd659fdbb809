"""Baselines: the paper's schedules (``schedules``), static weight quantisation (``weights``), head pruning (``heads``).

``BASELINE_KINDS`` names the groups ``sol eval ppl --paper-baselines`` runs (each can be its own pipeline job):
matched (the matched mix, EMC, DAC), random (N permutations + best-of-N), static (static-best)."""
BASELINE_KINDS = ("matched", "random", "static")
