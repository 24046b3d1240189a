"""The report's human-vote sections: the blind arena's win rates and the judge's agreement with the votes
(computed in `baize_exp.human`). Each call first refreshes the run's eval/scores.csv and paired.csv, so votes cast
after the eval stage reach the CSVs and the tables the report shows next."""

from __future__ import annotations

from pathlib import Path

from baize_exp import human
from baize_exp.stages.report.page import Block, Heading, Table, Text
from baize_exp.stages.report.runs import fmt


def _ci(d: dict) -> str:
    return f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]" if d.get("n") else "-"


def agreement_text(a: dict) -> str:
    w, wo = a["with_ties"], a["without_ties"]
    left = "; ".join(f"{n} {why}" for why, n in a["left_out"].items())
    left = f" Not compared: {left}." if left else ""
    if not w["n"]:
        return f"No vote is on a pair the judge judged, so its agreement with people is unknown.{left}"
    return (
        f"The judge agrees with people on **{fmt(w['rate'])}** {_ci(w)} of {w['n']} votes on the pairs it judged "
        f"(ties count), **{fmt(wo['rate'])}** {_ci(wo)} of {wo['n']} without ties (FastChat's MT-bench "
        f"definition; 95% Wilson).{left}"
    )


def human_blocks(run_dir: Path) -> list[Block]:
    """The run's votes: win rate per pair of models and the judge's agreement; one line when there are none."""
    human.refresh(run_dir)
    s = human.summary(run_dir)
    if not s["votes"]:
        return [Text(human.NO_VOTES.format(run=run_dir))]
    rows = [
        [
            p["model"],
            p["opponent"],
            str(p["n"]),
            str(p["wins"]),
            str(p["ties"]),
            str(p["losses"]),
            str(p["both_bad"]),
            fmt(p["win_rate"]),
            _ci(p),
            p["paired"]["verdict"],
        ]
        for p in s["pairs"]
    ]
    header = ["model", "vs", "votes", "wins", "ties", "losses", "both bad", "win rate", "95% CI", "verdict"]
    return [
        Heading("Human votes (blind arena)"),
        Text(
            f"{s['votes']} votes in `eval/{human.VOTES_FILE}`. Win rate of the model against the one it is paired "
            "with, ties and 'both bad' counting half (95% Wilson); the verdict is the paired bootstrap over votes."
        ),
        Table(header, rows),
        Text(agreement_text(s["agreement"])),
    ]


def runs_blocks(runs: list[Path]) -> list[Block]:
    """Across runs: each run's votes and its judge's agreement with them; one line when no run has votes."""
    rows = []
    for run in runs:
        human.refresh(run)
        s = human.summary(run)
        if s["votes"]:
            a = s["agreement"]
            rows.append(
                [run.name, str(s["votes"])]
                + [
                    f"{fmt(a[k]['rate'])} {_ci(a[k])} n={a[k]['n']}" if a[k]["n"] else "- (no vote on a pair it judged)"
                    for k in ("with_ties", "without_ties")
                ]
            )
    if not rows:
        return [Text("Human votes: none in these runs (`baize-chat <run>` opens the blind arena).")]
    header = ["run", "votes", "judge-human agreement (ties count)", "without ties"]
    return [Heading("Human votes (blind arena)"), Table(header, rows)]
