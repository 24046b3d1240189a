"""Human votes from the blind arena (`baize-chat`), and what they say about the models and about the judge.

The votes file is `<run>/eval/human_votes.jsonl`, appended one vote at a time as it is cast (flushed and fsynced,
so a crash loses at most the vote being written). A vote record:

    {"pair_id", "time", "question", "question_id" (an eval question's id, else null), "source": "eval"|"prompt",
     "order": [label shown as A, label shown as B],
     "models": {"A": {"label", "name", "run", "adapter", "adapter_hash"}, "B": {...}},
     "answers": {"A": text, "B": text}, "answer_source": "eval"|"live", "settings": {...},
     "vote": "A"|"B"|"tie"|"both_bad"}

`name` is the model's name in its run (base, v1, v2), `label` what the arena revealed (the name, or `<run>/<name>`
when several runs are compared). What the votes give (`summary`):

- **Human win rates** per pair of models, ties and "both bad" counting half, with a Wilson 95% interval
  (`stats.win_rate`), and the same votes as a paired comparison (each vote an item worth 1, 0.5 or 0 to the
  later model of the pair; `stats.paired_bootstrap`).
- **Judge-human agreement** with and without ties (`stats.judge_human_agreement`, FastChat's MT-bench
  definition) on the same pairs: a vote on an eval question where both answers shown are the answers the eval
  stage judged, and the judge gave a verdict on that pair (single/reference: the higher score wins, equal scores
  tie, as FastChat's study turned single grades into pairs; pairwise: its two orders combined, only against
  `eval.pairwise_against`).

When: the votes file may grow after the eval stage ran, so `refresh` (re)writes the human rows of
`eval/scores.csv` (`human_vs_<model>` and the judge's `human_agreement[_no_ties]` rows) and `eval/paired.csv`
(metric `human_vote`) from whatever votes exist, leaving every other row as it was. The eval stage calls it at its
end and the report (the run's report stage and `baize-report`) every time it runs, so a report written after
voting shows the votes and the CSVs agree with it. W&B gets the same tables when the report stage runs.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from baize_exp import stats as S
from baize_exp.io import JsonlError, read_jsonl

VOTES_FILE = "human_votes.jsonl"
VOTES = ("A", "B", "tie", "both_bad")
MODEL_ORDER = ("base", "v1", "v2")
HUMAN_METRIC = "human_vote"  # paired.csv's metric for the votes
AGREEMENT_MODES = {True: "human_agreement", False: "human_agreement_no_ties"}  # scores.csv, model "judge"
NO_VOTES = "Human votes: none yet (`baize-chat {run}` opens the blind arena; votes go to eval/human_votes.jsonl)."


def votes_path(run_dir: Path) -> Path:
    return Path(run_dir) / "eval" / VOTES_FILE


class VoteLog:
    """The append-only votes file. A torn last line (a crash mid-write) is cut off when the log is opened, so
    the next vote starts on a line of its own; every vote is flushed and fsynced before `append` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = len(read_jsonl(self.path, repair_tail=True))

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


def read_votes(path: Path) -> list[dict]:
    """The votes of a votes file. A last line that does not parse is the vote a dying process was writing (its
    voter never saw it recorded): skipped, and the file left as it is. A corrupt line elsewhere, or a record that
    is not a vote, stops with JsonlError naming the line."""
    lines = Path(path).read_bytes().split(b"\n")
    votes = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            if i == len(lines) - 1:
                break
            raise JsonlError(f"{path}:{i + 1}: not valid JSON; fix or remove that line") from None
        if not (isinstance(rec, dict) and rec.get("vote") in VOTES and set(rec.get("models") or {}) >= {"A", "B"}):
            raise JsonlError(f"{path}:{i + 1}: not a vote record (needs 'vote' in {VOTES} and models A and B)")
        votes.append(rec)
    return votes


def winner_label(vote: dict) -> str:
    """The label of the model the person preferred, or 'tie' (a tie or both bad)."""
    return vote["models"][vote["vote"]]["label"] if vote["vote"] in ("A", "B") else "tie"


def _order(labels: set[str]) -> list[str]:
    """base, v1, v2 first, then the rest by name: a pair's row is always the later model against the earlier."""
    return sorted(labels, key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))


def pair_stats(votes: list[dict]) -> list[dict]:
    """Per pair of models with votes: the later model's (in `_order`) wins, ties (both bad included; also
    counted apart) and losses against the earlier, its win rate with a Wilson interval, and the same votes
    paired (per vote 1 / 0.5 / 0 for the later model) with a bootstrap interval, MDE and verdict."""
    labels = _order({v["models"][s]["label"] for v in votes for s in ("A", "B")})
    rows = []
    for j, later in enumerate(labels):
        for earlier in labels[:j]:
            mine = [v for v in votes if {v["models"]["A"]["label"], v["models"]["B"]["label"]} == {later, earlier}]
            if not mine:
                continue
            won = [winner_label(v) for v in mine]
            rate = S.win_rate(won.count(later), won.count("tie"), won.count(earlier))
            value = {str(k): S.PAIRWISE_VALUE[_side(w, later)] for k, w in enumerate(won)}
            paired = S.paired_bootstrap(value, {k: 1 - x for k, x in value.items()})
            both_bad = sum(v["vote"] == "both_bad" for v in mine)
            rows.append({"model": later, "opponent": earlier, "both_bad": both_bad, **rate, "paired": paired})
    return rows


def _side(winner: str, model: str) -> str:
    return "tie" if winner == "tie" else "model" if winner == model else "opponent"


# --- the judge on the same pairs ----------------------------------------------------------------------------


def judge_verdicts(run_dir: Path) -> tuple[dict[tuple, str], dict[tuple[str, str], str]]:
    """({(question id, first, second): 'a'|'b'|'tie'}, {(model, question id): answer judged}) from a run's
    eval/judgments.jsonl and answers.jsonl. single/reference: the higher score wins, equal scores tie (each
    model's score is the mean of its parsed repeats); pairwise: the two orders combined (disagreement is a tie)
    against the recorded opponent. A parse failure gives no verdict."""
    ev = Path(run_dir) / "eval"
    judgments = read_jsonl(ev / "judgments.jsonl") if (ev / "judgments.jsonl").is_file() else []
    answers = {
        (a["model"], str(a["question_id"])): a["answer"]
        for a in (read_jsonl(ev / "answers.jsonl") if (ev / "answers.jsonl").is_file() else [])
        if a.get("answer") is not None
    }
    verdicts: dict[tuple, str] = {}
    scores: dict[str, dict[str, float]] = {}
    for o in S.outcomes(judgments):
        if o["mode"] in ("single", "reference") and o["value"] is not None:
            scores.setdefault(str(o["question_id"]), {})[o["model"]] = o["value"]
    for qid, by_model in scores.items():
        names = sorted(by_model)
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                vx, vy = by_model[x], by_model[y]
                verdicts[(qid, x, y)] = "a" if vx > vy else "b" if vy > vx else "tie"
    orders: dict[tuple, dict[bool, str | None]] = {}
    for j in judgments:
        if j["mode"] == "pairwise" and j.get("opponent"):
            orders.setdefault((j["model"], str(j["question_id"]), j["opponent"]), {})[bool(j["swap"])] = j.get("winner")
    for (model, qid, opponent), both in orders.items():
        w = S.combine_pairwise(both.get(False), both.get(True))
        if w is not None:
            pair, verdict = S.canonical_vote(model, opponent, {"model": model, "opponent": opponent}.get(w, "tie"))
            verdicts[(qid, *pair)] = verdict
    return verdicts, answers


def _same_run(model: dict, run_dir: Path) -> bool:
    """Whether a vote's model came from `run_dir` (the same dir, or one of that name when it has moved)."""
    run = model.get("run")
    if not run:
        return False
    p = Path(run)
    return p.samefile(run_dir) if p.exists() else p.name == Path(run_dir).name


def agreement(run_dir: Path, votes: list[dict]) -> dict:
    """The judge's agreement with the votes on the pairs it judged (see the module docstring), with and without
    ties, and how many votes could not be compared and why."""
    verdicts, answers = judge_verdicts(run_dir)
    human: list[tuple[tuple, str]] = []
    left_out: dict[str, int] = {}
    for v in votes:
        a, b, qid = v["models"]["A"], v["models"]["B"], v.get("question_id")
        if qid is None:
            why = "free prompt (no eval question)"
        elif not (_same_run(a, run_dir) and _same_run(b, run_dir)):
            why = "a model from another run"
        elif any(
            (answers.get((m["name"], str(qid))) or "").strip() != (v["answers"][s] or "").strip()
            for s, m in (("A", a), ("B", b))
        ):
            why = "answers other than the ones judged"
        else:
            winner = v["models"][v["vote"]]["name"] if v["vote"] in ("A", "B") else "tie"
            pair, verdict = S.canonical_vote(a["name"], b["name"], winner)
            if (str(qid), *pair) in verdicts:
                human.append(((str(qid), *pair), verdict))
                continue
            why = "no judge verdict on that pair"
        left_out[why] = left_out.get(why, 0) + 1
    return {
        "with_ties": S.judge_human_agreement(verdicts, human, with_ties=True),
        "without_ties": S.judge_human_agreement(verdicts, human, with_ties=False),
        "left_out": left_out,
    }


def summary(run_dir: Path) -> dict:
    """{"votes": n, "pairs": pair_stats, "agreement": ...} of the run's votes file ({"votes": 0} without one)."""
    path = votes_path(run_dir)
    votes = read_votes(path) if path.is_file() else []
    if not votes:
        return {"votes": 0, "pairs": []}
    return {"votes": len(votes), "pairs": pair_stats(votes), "agreement": agreement(run_dir, votes)}


# --- into the eval stage's CSVs, its metrics, W&B ----------------------------------------------------------


def score_rows(s: dict) -> list[dict]:
    """scores.csv rows: each pair's win rate (the later model, mode `human_vs_<earlier>`) and the judge's
    agreement with the votes (model `judge`, with and without ties)."""
    rows = [
        {
            "model": p["model"],
            "category": "all",
            "mode": f"human_vs_{p['opponent']}",
            "n": p["n"],
            "mean": p["win_rate"],
            "ci_low": p["ci_low"],
            "ci_high": p["ci_high"],
            "parse_failures": 0,
        }
        for p in s["pairs"]
    ]
    for ties, mode in AGREEMENT_MODES.items():
        a = (s.get("agreement") or {}).get("with_ties" if ties else "without_ties")
        if a and a["n"]:
            rows.append(
                {
                    "model": "judge",
                    "category": "all",
                    "mode": mode,
                    "n": a["n"],
                    "mean": a["rate"],
                    "ci_low": a["ci_low"],
                    "ci_high": a["ci_high"],
                    "parse_failures": 0,
                }
            )
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} | {"note": ""} for r in rows]


def paired_rows(s: dict) -> list[dict]:
    """paired.csv rows (metric `human_vote`): per pair, the later model's mean vote value (1 win, 0.5 tie or
    both bad, 0 loss) against the earlier's on the same votes."""
    return [
        {
            "comparison": f"{p['model']} vs {p['opponent']}",
            "a": p["model"],
            "b": p["opponent"],
            "metric": HUMAN_METRIC,
            **p["paired"],
            "note": f"{p['n']} blind votes, ties count half",
        }
        for p in s["pairs"]
    ]


def _replace_rows(path: Path, mine: Any, rows: list[dict]) -> None:
    """Rewrite the CSV at `path` with the rows `mine` selects replaced by `rows` (others kept byte for byte);
    atomic, and only when something changed. A missing file is left missing (its stage has not run)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, kept = list(reader.fieldnames or []), [r for r in reader if not mine(r)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(kept)
        w.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    if tmp.read_bytes() == path.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, path)


def refresh(run_dir: Path) -> dict:
    """Put the current votes into eval/scores.csv and eval/paired.csv (see the module docstring); returns the
    figures for metrics.json: votes, and the judge's agreement with them where there is any."""
    s = summary(run_dir)
    ev = Path(run_dir) / "eval"
    _replace_rows(ev / "scores.csv", lambda r: (r.get("mode") or "").startswith("human_"), score_rows(s))
    _replace_rows(ev / "paired.csv", lambda r: r.get("metric") == HUMAN_METRIC, paired_rows(s))
    out: dict[str, Any] = {"human_votes": s["votes"]}
    for key in ("with_ties", "without_ties"):
        a = (s.get("agreement") or {}).get(key)
        if a and a["n"]:
            out[f"judge_human_agreement/{key}"], out[f"judge_human_agreement/{key}/n"] = a["rate"], a["n"]
    return out


def log_wandb(wb: Any, run_dir: Path) -> None:
    """The human win rates and the judge's agreement as W&B tables, their totals in the summary; a run without
    votes gets `eval/summary/human/votes` = 0 and nothing else."""
    import wandb

    s = summary(run_dir)
    wb.summary["eval/summary/human/votes"] = s["votes"]
    if not s["votes"]:
        return
    cols = ["model", "opponent", "n", "wins", "ties", "both_bad", "losses", "win_rate", "ci_low", "ci_high"]
    win = wandb.Table(columns=cols, data=[[_finite(p[c]) for c in cols] for p in s["pairs"]])
    acols = ["ties", "agree", "n", "rate", "ci_low", "ci_high"]
    agreement_rows = [
        [key, *(_finite(a[c]) for c in acols[1:])] for key, a in (s.get("agreement") or {}).items() if key != "left_out"
    ]
    wb.log({"eval/human_win_rates": win, "eval/judge_human_agreement": wandb.Table(columns=acols, data=agreement_rows)})
    for key, a in (s.get("agreement") or {}).items():
        if key != "left_out" and a["n"]:
            wb.summary[f"eval/summary/human/agreement_{key}"] = a["rate"]


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and v != v else v
