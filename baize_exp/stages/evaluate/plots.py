"""The eval stage's charts, drawn from the rows and files the stage wrote."""

from __future__ import annotations

from pathlib import Path


def plot_scores(rows: list[dict], path: Path, mode: str) -> None:
    """Bars per category (one per model) with 95% interval whiskers, for one judge mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mode"] == mode]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats) * max(1, len(models))), 4))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        by = {r["category"]: r for r in rows if r["model"] == m and r["n"]}
        xs = [i + k * width for i in range(len(cats))]
        means = [by[c]["mean"] if c in by else 0 for c in cats]
        err = [[max(0, by[c]["mean"] - by[c]["ci_low"]) if c in by else 0 for c in cats],
               [max(0, by[c]["ci_high"] - by[c]["mean"]) if c in by else 0 for c in cats]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=Path(m).name or m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    if mode == "pairwise":
        ax.set_ylabel("win rate vs opponent (tie = 0.5), 95% CI")
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    else:
        ax.set_ylabel(f"judge score 1-10 ({mode}), 95% CI")
        ax.set_ylim(0, 10)
    ax.set_title(f"eval: {mode}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
