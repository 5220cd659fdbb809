"""Figures (seaborn, black-and-white readable: every series has its own marker and line style), PDF + PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from sol.io import atomic_path  # noqa: E402

plt.rcParams.update({"pdf.fonttype": 42, "figure.dpi": 110, "font.size": 9})
sns.set_theme(style="whitegrid", context="paper")
MARKERS = {"policy": "o", "policy-tracked": "P", "policy-os": "p", "matched": "s", "uniform": "^", "random": "x", "emc": "D", "dac": "v", "dense": "*",
           "weights": "P", "heads": "X", "oracle": "d", "static-best": "h"}
COLORS = {"policy": "#5e3c99", "policy-tracked": "#2d004b", "policy-os": "#c51b7d", "matched": "#e66101", "uniform": "#1b7837", "random": "#4393c3", "emc": "#b2abd2",
          "dac": "#fdb863", "dense": "black", "weights": "#8c510a", "heads": "#01665e", "oracle": "#7f7f7f",
          "static-best": "#7fbc41"}


def family(method: str) -> str:
    return method.split(":")[0]


def save(fig, path: str | Path) -> None:
    """Write ``path`` (.pdf) and a PNG beside it, atomically."""
    path = Path(path)
    for p in (path, path.with_suffix(".png")):
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=p.suffix[1:], bbox_inches="tight")
    plt.close(fig)


def token_difficulty(df: pd.DataFrame, path, title: str = "") -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.6))
    sns.histplot(df.top1, bins=40, ax=axes[0], color="0.3")
    axes[0].axvline(0.9, ls="--", c="k", lw=0.8)
    axes[0].set_xlabel("dense top-1 probability")
    sns.histplot(df.entropy, bins=40, ax=axes[1], color="0.3")
    axes[1].set_xlabel("dense entropy (nats)")
    fig.suptitle(title or f"token difficulty: {(df.top1 > 0.9).mean():.1%} of steps have top-1 > 0.9")
    save(fig, path)


def kv_pollution(summary: pd.DataFrame, path) -> None:
    axes_names = ["token_keep", "prune_keep", "bits"]
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.6))
    for ax, axis in zip(axes, axes_names):
        d = summary[summary.axis == axis].sort_values("level")
        for col, m, ls, label in (("direct_mean", "o", "-", "corrupt region"), ("tail_mean", "D", "--", "mean tail"),
                                  ("tail_peak_p90", "p", ":", "P90 tail peak")):
            ax.plot(d.level, d[col], marker=m, ls=ls, c="k", label=label)
        ax.set_yscale("symlog", linthresh=1)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel({"token_keep": "token keep κ", "prune_keep": "prune keep ρ", "bits": "bits"}[axis])
    axes[0].set_ylabel("Δ perplexity (%)")
    axes[0].legend(fontsize=7)
    save(fig, path)


def pareto(df: pd.DataFrame, path, x: str = "flop_keep", y: str = "ppl", ylabel: str = "perplexity",
           lower_is_better: bool = True, dense_line: float | None = None, oracle: pd.DataFrame | None = None,
           chance: float | None = None) -> None:
    """Quality vs cost: every point faded, each family's Pareto front opaque; CIs as error bars. Left: every level
    (far-off perplexities clipped); right: a zoom on the policy's operating points, where the fronts compete. The
    legend sits outside both."""
    from sol.compare import pareto_front

    df = df.assign(family=df.method.map(family))
    pol = df[df.family.str.startswith("policy")]
    zoom = pol[x].nunique() > 1  # one operating point: nothing to zoom on
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(8.4 if zoom else 4.6, 3.2), squeeze=False)
    fronts = []
    for ax in axes[0]:
        for fam, d in df.groupby("family"):
            c, m = COLORS.get(fam, "0.5"), MARKERS.get(fam, ".")
            ax.scatter(d[x], d[y], c=c, marker=m, alpha=0.25, s=18)
            front = pareto_front(d, x, y, lower_is_better)
            fronts.append(front)
            lo, hi = f"{y}_lo", f"{y}_hi"
            if lo in front:
                ax.errorbar(front[x], front[y], yerr=[front[y] - front[lo], front[hi] - front[y]], fmt="none",
                            ecolor=c, alpha=0.6, lw=0.8)
            ax.plot(front[x], front[y], marker=m, c=c, label=fam, ls="-" if fam.startswith("policy") else "--", ms=5)
        if oracle is not None and len(oracle):
            o = oracle.sort_values(x)
            ax.plot(o[x], o[y], c="0.45", ls=(0, (6, 3)), lw=1.4, marker=MARKERS["oracle"], ms=4,
                    label="greedy oracle (non-causal, not a bound)")
        if dense_line is not None:  # the dense point is in the legend already
            ax.axhline(dense_line, c="k", ls="-.", lw=0.8)
        if chance is not None:
            ax.axhline(chance, c="0.6", ls=":", lw=1.0, label=f"chance ({chance:g})")
        ax.set_xlabel({"flop_keep": "FLOP keep (bit-weighted, fvcore)", "net_keep": "net keep (κ+ρ+b/16)/3"}.get(x, x))
    main = axes[0][0]
    main.set_ylabel(ylabel)
    if lower_is_better:  # perplexity: the region where the fronts compete; far-off levels (damage curves) clipped
        lo = df[y].min()
        main.set_ylim(lo * 0.99, min(df[y].max() * 1.02, lo * 1.3))
    if zoom:  # the operating points: x from just below the policy's cheapest point, y over the fronts seen there
        ax = axes[0][1]
        x0 = pol[x].min() - 0.03
        pts = pd.concat(fronts + ([oracle] if oracle is not None else []), ignore_index=True)
        pts = pts[pts[x] >= x0]
        near = (pts[y] <= 1.05 * pol[y].max()) if lower_is_better else (pts[y] >= 0.95 * pol[y].min())
        pts = pts[near]  # far-off levels in this range (a damaging transform) would flatten the rest
        y0, y1 = pts[y].min(), pts[y].max()
        pad = 0.08 * max(y1 - y0, 1e-3 * abs(y1))
        ax.set_xlim(x0, df[x].max() + 0.02)
        ax.set_ylim(y0 - pad, y1 + pad)
        ax.set_title("zoom: the operating points", fontsize=8)
    handles, labels = main.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    save(fig, path)


def budget_adherence(df: pd.DataFrame, path) -> None:
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.plot([0, 1], [0, 1], ls="--", c="k", lw=0.8)
    ax.fill_between([0, 1], [-0.03, 0.97], [0.03, 1.03], color="0.85", label="±0.03")
    for (method, d), m in zip(df.groupby("method"), ("o", "s")):
        total = d.total_keep if "total_keep" in d else d.flop_keep
        ax.plot(d.budget, total, marker=m, c=COLORS["policy"], ls="-" if method == "policy" else "--",
                label=f"{method}: total (LM + own MACs)")
        ax.plot(d.budget, d.flop_keep, marker=m, mfc="none", c="0.5", ls=":", lw=0.8, label=f"{method}: LM only")
    if "keep_floor" in df and df.keep_floor.notna().any():  # below it no schedule on the grid can go
        ax.axhline(df.keep_floor.max(), c="0.3", lw=0.8, ls="-.", label=f"grid floor {df.keep_floor.max():.3f}")
    floor = df.keep_floor.max() if "keep_floor" in df and df.keep_floor.notna().any() else 1.0
    lo, hi = min(df.budget.min(), floor) - 0.05, 1.0
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("requested FLOP keep (budget)")
    ax.set_ylabel("realised keep")
    ax.legend(fontsize=7)
    save(fig, path)


def action_timeline(df: pd.DataFrame, path, block: int = 0) -> None:
    d = df[df.block == block]
    fig, ax1 = plt.subplots(figsize=(7, 2.4))
    ax1.step(d.step, d.flop_keep, where="mid", c="k", label="FLOP keep of the chosen action")
    ax1.set_ylabel("FLOP keep")
    ax2 = ax1.twinx()
    ax2.plot(d.step, d.dense_entropy, c="0.5", ls=":", marker=".", label="dense entropy")
    ax2.set_ylabel("dense entropy (nats)")
    ax1.set_xlabel("decode step")
    fig.legend(fontsize=7, loc="upper right")
    save(fig, path)


def step_cost(bench: pd.DataFrame, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    d = bench.copy()
    d["kv_len"] = d.kv_len.astype(str)
    sns.barplot(d, x="action", y="flop_keep", hue="kv_len", ax=axes[0], palette="Greys")
    sns.barplot(d, x="action", y="time_ratio", hue="kv_len", ax=axes[1], palette="Greys")
    for ax, lab in zip(axes, ("FLOP keep", "time / dense")):
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.axhline(1.0, c="k", lw=0.8)
        ax.set_ylabel(lab)
    save(fig, path)


def random_violin(df: pd.DataFrame, path) -> None:
    """Normalised ppl per operating point: random trials (violin), best-of-N, matched, heuristics, policy."""
    fig, ax = plt.subplots(figsize=(5, 3))
    pts = sorted(df.point.unique())
    rnd = df[df.kind == "random"]
    sns.violinplot(rnd, x="point", y="norm_ppl", ax=ax, color="0.85", inner=None, cut=0)
    for kind, m in (("best_random", "x"), ("matched", "s"), ("emc", "D"), ("dac", "v"), ("policy", "*")):
        d = df[df.kind == kind]
        ax.scatter([pts.index(p) for p in d.point], d.norm_ppl, marker=m, c="k", s=40 if m == "*" else 22, label=kind,
                   zorder=3)
    ax.set_xlabel("operating point (budget)")
    ax.set_ylabel("normalised perplexity (0 = best)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # never over a marker
    save(fig, path)



AXES = (("token_keep", "token keep κ"), ("prune_keep", "prune keep ρ"), ("bit_ratio", "bits b / 16"))


def single_axis_levels(df: pd.DataFrame) -> pd.DataFrame:
    """True-uniform rows (and dense) as (axis, level, …): the rows where exactly one axis is compressed."""
    rows = []
    for _, r in df[df.method.str.startswith("uniform:") | (df.method == "dense")].iterrows():
        low = [a for a, _ in AXES if r[a] < 1 - 1e-9]
        for a, _ in AXES:
            if low in ([a], []):
                rows.append({**r.to_dict(), "axis": a, "level": r[a]})
    return pd.DataFrame(rows)


def damage_curves(ppl: pd.DataFrame, mmlu: pd.DataFrame | None, path) -> None:
    """Quality of true-uniform levels across each axis's range: the convexity that decides whether mixing levels
    can pay (a mix of two levels lies on the chord; it beats the middle level only where the curve is concave).
    Perplexity on a log axis, where the chord is exactly the mix (its mean NLL is linear in the mix share)."""
    panels = [("ppl", "perplexity", ppl)] + ([("acc", "MMLU accuracy", mmlu)] if mmlu is not None else [])
    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 2.6 * len(panels)), squeeze=False, layout="constrained")
    for row, (y, label, df) in enumerate(panels):
        d = single_axis_levels(df)
        for col, (axis, xlabel) in enumerate(AXES):
            ax = axes[row, col]
            s = d[d.axis == axis].sort_values("level") if len(d) else d
            ax.set_xlabel(xlabel)
            if len(s) < 2:  # dense alone is no curve
                ax.text(0.5, 0.5, "no compressed level\non this axis", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.plot(s.level, s[y], marker="o", c="k")  # (block CIs of absolute ppl are wide: see the tables)
            # the chord between the extreme levels: what a two-level mix of them would give
            ax.plot(s.level.iloc[[0, -1]], s[y].iloc[[0, -1]], ls=":", c="0.5", lw=0.8)
            if y == "ppl":  # log scale: a two-level mix's mean NLL is linear in its share, so its chord is straight
                ax.set_yscale("log")
                if s[y].max() < 10 * s[y].min():  # less than a decade: plain ticks, or there would be none
                    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle("damage curves: true uniform compression, one axis at a time", fontsize=9)
    save(fig, path)
