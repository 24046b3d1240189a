"""The eval stage's charts, drawn from the rows and files the stage wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _num(v: object) -> float:
    """A scores row's field as a float: rows come from the stage (numbers) or from scores.csv (strings)."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _short(s: str, cap: int = 22) -> str:
    return s if len(s) <= cap else s[: cap - 8] + "…" + s[-7:]


def plot_scores(rows: list[dict], path: Path, mode: str) -> None:
    """Bars per category (one per model) with 95% interval whiskers, for one judge mode (see `draw_scores`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = {r["category"] for r in rows if r["mode"] == mode}
    models = {r["model"] for r in rows if r["mode"] == mode}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats) * max(1, len(models))), 4))
    draw_scores(ax, rows, mode)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": the legend outside the axes is kept
    plt.close(fig)


def draw_scores(ax: Any, rows: list[dict], mode: str) -> None:
    """Draw `plot_scores`'s bars on `ax`. A category where a model has no judged answer (n=0: every reply
    unparsable) gets no bar, only "n=0" where the bar would be: a zero-height bar would read as a score of 0."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in rows if r["mode"] == mode]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    win_rate = mode.startswith("pairwise")  # pairwise and pairwise_lc: a share in [0, 1]
    top = 1.0 if win_rate else 10.0
    width = 0.8 / max(1, len(models))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = 0
    for k, m in enumerate(models):
        by = {r["category"]: r for r in rows if r["model"] == m}
        drawn = [c for c in cats if c in by and _num(by[c]["n"]) > 0 and math.isfinite(_num(by[c]["mean"]))]
        means = [_num(by[c]["mean"]) for c in drawn]
        err = [
            [_gap(by[c]["mean"], by[c]["ci_low"]) for c in drawn],
            [_gap(by[c]["ci_high"], by[c]["mean"]) for c in drawn],
        ]
        colour = colours[k % len(colours)]
        ax.bar([cats.index(c) + k * width for c in drawn], means, width, yerr=err, capsize=3, color=colour)
        bars += len(drawn)
        for c in cats:
            if c in by and c not in drawn:
                ax.text(
                    cats.index(c) + k * width, 0.02 * top, "n=0", ha="center", va="bottom", fontsize=7, color=colour
                )
    if not bars:
        ax.text(
            0.5,
            0.5,
            "no answer could be judged (every judge reply unparsable)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#a11111",
        )
    # fixed limits: with few or no bars, autoscaling would put the outer "n=0" labels on the frame
    ax.set_xlim(-width / 2 - 0.15, len(cats) - 1 + (len(models) - 0.5) * width + 0.15)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    if win_rate:
        ax.set_ylabel("win rate vs opponent (tie = 0.5), 95% CI")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    else:
        ax.set_ylabel(f"judge score 1-10 ({mode}), 95% CI")
    ax.set_ylim(0, top)
    ax.set_title(f"eval: {mode}")
    # outside the axes, at the right: a legend inside would cover the bars of the last categories
    # (handles built here: an empty bar series, a model with nothing judged, would get the default colour)
    ax.legend(
        [Patch(color=colours[k % len(colours)]) for k in range(len(models))],
        [_short(Path(m).name or m) for m in models],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )


def _gap(hi: object, lo: object) -> float:
    """A whisker's length; 0 where a bound is missing."""
    d = _num(hi) - _num(lo)
    return max(0.0, d) if math.isfinite(d) else 0.0
