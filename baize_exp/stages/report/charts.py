"""The report's charts. Each function draws from plain data and returns the PNG it wrote, or None when there was
nothing to draw (no file then: an empty chart would read as a result)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

Series = dict[str, tuple[list[float], list[float]]]  # {"train/loss": (steps, losses), ...}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to whatever sits outside the axes (legends below, verdicts at the right)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path


def finite(v: Any) -> bool:
    """A number that can be drawn (not None, not NaN, not a string)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def _legend_below(fig: Any, ax: Any, handles: list, labels: list[str], title: str | None = None) -> None:
    """A legend under the axes: it never covers a curve, and columns keep many runs short."""
    ncol = max(1, min(len(labels), 3 if max(map(len, labels)) > 24 else 4))
    ax.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=ncol,
        fontsize=8,
        frameon=False,
        title=title,
        title_fontsize=8,
    )


def loss_curves(runs: dict[str, dict[str, Series]], path: Path, title: str = "Loss curves") -> Path | None:
    """One panel per stage (train → v1, sdf → v2: different data, so separate axes); colour = run, solid = train
    loss, dashed = validation loss. `runs` is {run label: {stage: series}}."""
    stages = [s for s in ("train", "sdf") if any(s in by and by[s] for by in runs.values())]
    if not stages:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.2), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(runs)
    for ax, stage in zip(axes[0], stages, strict=True):
        kinds: set[str] = set()
        for k, label in enumerate(labels):
            for name, (steps, losses) in runs[label].get(stage, {}).items():
                kind = "val" if "val" in name else "train"
                kinds.add(kind)
                ax.plot(
                    steps,
                    losses,
                    color=colours[k % len(colours)],
                    ls="--" if kind == "val" else "-",
                    marker="o" if len(steps) < 30 else None,
                    ms=3,
                )
        ax.set_title(f"{stage} ({'v1' if stage == 'train' else 'v2'})")
        ax.ticklabel_format(axis="y", useOffset=False)  # "+1.077e1" above the axis reads as a bug
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if len(labels) == 1 or len(kinds) > 1:  # the line styles need a key when both kinds are drawn
            style = [Line2D([], [], color="k" if len(labels) > 1 else colours[0], ls=ls) for ls in ("-", "--")]
            ax.legend(
                [s for s, k in zip(style, ("train", "val"), strict=True) if k in kinds],
                [f"{k} loss" for k in ("train", "val") if k in kinds],
                fontsize=8,
                loc="upper right",
            )
    if len(labels) > 1:
        handles = [Line2D([], [], color=colours[k % len(colours)], lw=2) for k in range(len(labels))]
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            fontsize=8,
            frameon=False,
            ncol=max(1, min(len(labels), 3 if max(map(len, labels)) > 24 else 4)),
        )
    fig.suptitle(title)
    return _save(fig, path)


def _error_bars(ys: list[float], cis: list | None) -> list[list[float]] | None:
    """matplotlib's [below, above] whisker lengths from intervals, or None unless every point has a finite one."""
    if not (cis and all(c and all(map(finite, c)) for c in cis)):
        return None
    return [
        [max(0, y - c[0]) for y, c in zip(ys, cis, strict=True)],
        [max(0, c[1] - y) for y, c in zip(ys, cis, strict=True)],
    ]


def metric_vs_param(
    xs: list[str], ys: list[float], cis: list | None, param: str, metric: str, path: Path
) -> Path | None:
    """The metric against one swept parameter (numeric x when every value is a number, else categories)."""
    if not ys:
        return None
    plt = _plt()
    nums = [_as_number(x) for x in xs]
    numeric = all(n is not None for n in nums)
    cats = sorted(set(xs), key=lambda x: (_as_number(x) is None, _as_number(x) or 0, x))
    pos = nums if numeric else [cats.index(x) for x in xs]
    fig, ax = plt.subplots(figsize=(6, 4))
    err = _error_bars(ys, cis)
    if err:
        ax.errorbar(pos, ys, yerr=err, fmt="o", capsize=4)
    else:
        ax.plot(pos, ys, "o")
    if numeric and len(set(nums)) > 1 and min(nums) > 0 and max(nums) / min(nums) >= 8:
        ax.set_xscale("log", base=2)  # ranks 4..64, learning rates: even spacing reads better
    if not numeric:
        names = [shorten(c.rstrip("/").rsplit("/", 1)[-1] or c, 18) for c in cats]
        ax.set_xticks(
            range(len(cats)),
            names,
            rotation=35 if len(cats) > 4 else 0,
            ha="right" if len(cats) > 4 else "center",
            fontsize=8 if len(cats) > 8 else 10,
        )
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param} ({len(ys)} runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def metric_per_run(labels: list[str], ys: list[float], cis: list | None, metric: str, path: Path) -> Path | None:
    """One labelled point (with its interval where known) per run: runs given by hand differ in several
    parameters at once, so there is no parameter to put on an axis."""
    if not ys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.42 * len(ys)))
    pos = list(range(len(ys)))[::-1]  # first run on top, as in the table
    err = _error_bars(ys, cis)
    if err:
        ax.errorbar(ys, pos, xerr=err, fmt="o", capsize=4)
    else:
        ax.plot(ys, pos, "o")
    for y, p in zip(ys, pos, strict=True):
        ax.annotate(f"{y:.4g}", (y, p), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yticks(pos, labels)
    ax.set_ylim(-0.7, len(ys) - 0.3)
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per run ({len(ys)} runs)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def win_rates(rows: list[dict], path: Path) -> Path | None:
    """Pairwise win rate per model: raw and length-controlled side by side, 95% intervals, the 0.5 tie line.
    `rows` are scores.csv rows (category "all") of modes pairwise and pairwise_lc."""
    modes = [m for m in ("pairwise", "pairwise_lc") if any(r["mode"] == m for r in rows)]
    rows = [r for r in rows if r["mode"] in modes and finite(r["mean"])]
    if not rows:
        return None
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(models) + 2), 4))
    width = 0.8 / len(modes)
    names = {"pairwise": "raw win rate", "pairwise_lc": "length-controlled"}
    for k, mode in enumerate(modes):
        by = {r["model"]: r for r in rows if r["mode"] == mode}
        xs = [i + (k - (len(modes) - 1) / 2) * width for i, m in enumerate(models) if m in by]
        ms = [by[m] for m in models if m in by]
        err = [
            [max(0, r["mean"] - r["ci_low"]) if finite(r["ci_low"]) else 0 for r in ms],
            [max(0, r["ci_high"] - r["mean"]) if finite(r["ci_high"]) else 0 for r in ms],
        ]
        ax.bar(xs, [r["mean"] for r in ms], width, yerr=err, capsize=4, label=names[mode])
        for x, r in zip(xs, ms, strict=True):
            ax.text(x, 0.02, f"n={r['n']}", ha="center", fontsize=7, color="white")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(models)), [shorten(Path(m).name or m, 16) for m in models])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs opponent (tie = 0.5), 95% CI")
    ax.set_title("Pairwise win rate")
    h, lab = ax.get_legend_handles_labels()
    _legend_below(fig, ax, h, lab)
    fig.tight_layout()
    return _save(fig, path)


METRIC_AXIS = {
    "heldout_loss": "held-out loss difference (nats/token; lower is better)",
    "ref_loglik": "reference log-lik difference (nats/token; higher is better)",
}
VERDICT_COLOUR = {"better": "#176d2c", "worse": "#a11111"}


def forest(rows: list[dict], path: Path, title: str = "Paired differences (a - b), 95% CI") -> Path | None:
    """One row per (comparison, metric): the mean paired difference, its interval, a zero line, and the verdict
    at the right. Metrics have different units, so each metric gets its own panel."""
    rows = [r for r in rows if finite(r.get("diff"))]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    # every run against one baseline: say it once in the title, so the row labels are just the runs
    against = {r["comparison"].rsplit(" vs ", 1)[-1] for r in rows}
    common = f" vs {next(iter(against))}" if len(against) == 1 and all(" vs " in r["comparison"] for r in rows) else ""
    if common:
        title = f"{title}\nagainst {shorten(common[4:], 60)}"
    metrics = list(dict.fromkeys(_panel(r) for r in rows))
    sizes = [sum(_panel(r) == m for r in rows) for m in metrics]
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(8, 0.9 * len(metrics) + 0.38 * sum(sizes) + 0.8),
        height_ratios=[s + 1.2 for s in sizes],
        squeeze=False,
        layout="constrained",
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        sel = [r for r in rows if _panel(r) == metric]
        pos = list(range(len(sel)))[::-1]
        # an unbounded side (a studentized interval at n of 2-3) is drawn to the panel's edge with an arrow
        ends = [v for r in sel for v in (r["diff"], r.get("ci_low"), r.get("ci_high")) if finite(v)]
        span = (max(ends) - min(ends)) or abs(ends[0]) or 1.0
        edge = (min(ends) - 0.08 * span, max(ends) + 0.08 * span)
        for r, p in zip(sel, pos, strict=True):
            shown = r.get("verdict_holm") or r["verdict"]
            colour = VERDICT_COLOUR.get(shown, "#555555")
            lo, hi = r.get("ci_low"), r.get("ci_high")
            if _bound(lo) and _bound(hi):
                x0, x1 = (lo if finite(lo) else edge[0]), (hi if finite(hi) else edge[1])
                ax.plot([x0, x1], [p, p], color=colour, lw=2)
                for x, bounded, mark in ((x0, finite(lo), "<"), (x1, finite(hi), ">")):
                    if not bounded:
                        ax.plot([x], [p], mark, color=colour, ms=6)
            ax.plot([r["diff"]], [p], "o", color=colour)
            holm = f"; Holm: {r['verdict_holm']}" if r.get("verdict_holm") and r["verdict_holm"] != r["verdict"] else ""
            ax.text(
                1.02,
                p,
                f"{r['verdict']}{holm} (n={r['n']})",
                transform=ax.get_yaxis_transform(),
                va="center",
                fontsize=8,
                color=colour,
            )
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # small differences: long tick labels must not collide
        ax.set_yticks(pos, [shorten(r["comparison"].removesuffix(common), 40) for r in sel], fontsize=8)
        ax.set_ylim(-0.7, len(sel) - 0.3)
        base, _, form = metric.partition(" @ ")
        unit = (METRIC_AXIS.get(base, "") + (f", {form} format" if form else "")) or (
            f"{metric} difference (win rate; higher is better)"
            if "pairwise" in metric
            else f"{metric} difference (higher is better)"
        )
        ax.set_xlabel(unit, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _panel(r: dict) -> str:
    """A forest panel per metric and likelihood format ("heldout_loss @ baize"); judge rows by metric alone (their
    format names each model's answer format)."""
    form = r.get("format") or ""
    return (
        f"{r['metric']} @ {form}" if form and not r["metric"].startswith("judge_") and " " not in form else r["metric"]
    )


def _bound(v: Any) -> bool:
    """An interval end that can be drawn: a number, or an infinite one (drawn to the edge); not NaN or missing."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def shorten(s: str, cap: int) -> str:
    """At most `cap` characters, cut in the middle (the start and the end tell runs apart)."""
    if len(s) <= cap:
        return s
    head = (cap - 1) * 2 // 3
    return s[:head] + "…" + s[len(s) - (cap - 1 - head) :]


def _as_number(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
