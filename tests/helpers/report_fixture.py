"""Run dirs with every file the report reads, built from constructed data whose answers are known.

The eval files go through the eval stage's own functions (score_table, paired_bootstrap, plot_scores), so the
fixture writes what a real run writes; only the numbers are chosen by the test."""

from __future__ import annotations

import json
from pathlib import Path

from baize_exp import stats as S
from baize_exp.stages.evaluate.plots import plot_scores

# real question ids of the shipped set, so the report finds their text the way it does for a real run
CATEGORIES = ["generic", "knowledge", "roleplay", "coding"]
QUESTIONS = [f"{c}-0{i}" for c in CATEGORIES[:3] for i in (1, 2, 3)]
EMPTY_CATEGORY = "coding"  # every judgment of it fails to parse: n=0 in scores.csv
DIALOGS = [f"dlg-{i}" for i in range(8)]
MODELS = ["base", "v1", "v2"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def base_score(i: int) -> float:
    return float(2 + i % 5)


def make_run(
    d: Path,
    overrides: list[str],
    *,
    shift: float = 0.0,
    mode: str = "single",
    discriminates: bool = True,
    loss: float = 2.0,
    status: str = "completed",
) -> Path:
    """A completed run dir. `shift` is added to every judge score and subtracted from every per-item loss of
    every model, so a run with shift=1 is better than one with shift=0 on every single item."""
    m = {
        "run": {"overrides": overrides, "status": status, "error": None, "model": "tiny", "lora_r": 8, "data": "mixed"},
        "collect": {"dialogs": 12, "rejects": 3, "stage_seconds": 3.0},
        "train": {"val_loss": loss + 0.1, "val_ppl": 9.0, "tokens_per_s": 100.0, "stage_seconds": 5.0},
        "sdf": {"parse_failed": 0, "stage_seconds": 4.0},
        "eval": {"stage_seconds": 2.5},
    }
    ev = d / "eval"
    ev.mkdir(parents=True)
    (d / "collect").mkdir()
    (d / "collect" / "data_card.md").write_text(
        "## Data card (collect)\n\n16 seeds → 12 dialogs, 3 rejects\n\n| source | seeds | dialogs |\n"
        "|---|---|---|\n| quora | 8 | 6 |\n| medical | 8 | 6 |\n"
    )
    for stage, prefix in (("train", ""), ("sdf", "sdf/")):
        (d / stage / "logs").mkdir(parents=True)
        lines = [f"epoch,step,{prefix}train/loss,{prefix}train/lr,{prefix}val/loss"]
        for s in range(6):
            val = f"{loss + 0.3 - 0.05 * s:.3f}" if s % 2 else ""
            lines.append(f"{s // 3},{s},{loss + 1 - 0.15 * s - (0.2 if stage == 'sdf' else 0):.3f},1e-4,{val}")
        (d / stage / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")

    answers, judgments, items = [], [], []
    qids = QUESTIONS + [f"{EMPTY_CATEGORY}-01"]
    for k, model in enumerate(MODELS + (["teacher"] if mode == "pairwise" else [])):
        for i, q in enumerate(qids):
            cat = q.rsplit("-", 1)[0]
            text = f"<b>{model}</b> answers {q} & explains: " + "a long sentence that wraps. " * (3 + 4 * (i == 0))
            answers.append({"question_id": q, "category": cat, "model": model, "answer": text})
            if model == "teacher":
                continue
            failed = cat == EMPTY_CATEGORY
            if mode == "single":
                score = None if failed else min(10.0, base_score(i) + k + shift)
                judgments.append(
                    {
                        "question_id": q,
                        "category": cat,
                        "model": model,
                        "mode": "single",
                        "swap": False,
                        "score": score,
                        "judge_reply": f"Score: {score}",
                        "parse": "failed" if failed else "ok",
                    }
                )
            else:
                for swap in (False, True):
                    win = None if failed else ("model" if (i + k + swap) % 3 else "opponent")
                    judgments.append(
                        {
                            "question_id": q,
                            "category": cat,
                            "model": model,
                            "mode": "pairwise",
                            "swap": swap,
                            "winner": win,
                            "judge_reply": "[[A]]",
                            "parse": "failed" if failed else "ok",
                        }
                    )
            items.append(
                {
                    "model": model,
                    "kind": "ref_loglik",
                    "item_id": q,
                    "tokens": 10,
                    "logprob_sum": -10 * (1.5 - 0.1 * k - 0.05 * (i % 3) - 0.1 * shift + 0.03 * ((i * (k + 2)) % 3)),
                }
            )
        if model == "teacher":
            continue
        for j, dlg in enumerate(DIALOGS):
            items.append(
                {
                    "model": model,
                    "kind": "heldout",
                    "item_id": dlg,
                    "tokens": 20,
                    "logprob_sum": -20 * (loss - 0.1 * k + 0.03 * j - 0.1 * shift + 0.02 * ((j * (k + 2)) % 3)),
                }
            )
        m["eval"][f"{model}/heldout_loss"] = loss - 0.1 * k - 0.1 * shift
        m["eval"][f"{model}/heldout_ppl"] = 7.0
        m["eval"][f"{model}/ref_loglik"] = -1.5 + 0.1 * k
    _jsonl(ev / "answers.jsonl", answers)
    _jsonl(ev / "judgments.jsonl", judgments)
    _jsonl(ev / "items.jsonl", items)

    note = "" if discriminates else "judge cannot discriminate"
    rows = [{**r, "note": note} for r in S.score_table(judgments, 200, 0)]
    if mode == "pairwise":  # the length-controlled win rate: a little below the raw one
        rows += [
            {
                **r,
                "mode": "pairwise_lc",
                "mean": r["mean"] - 0.05,
                "ci_low": r["ci_low"] - 0.05,
                "ci_high": r["ci_high"] - 0.05,
            }
            for r in rows
            if r["category"] == "all"
        ]
    S.write_csv_rows(rows, ev / "scores.csv", [*S.SCORES_COLUMNS, "note"])
    plot_scores(rows, ev / "scores.png", mode)
    for r in rows:
        if r["category"] == "all" and r["mode"] == mode:
            m["eval"][f"{r['model']}/judge_mean"] = r["mean"]
            m["eval"][f"{r['model']}/judge_ci"] = [r["ci_low"], r["ci_high"]]
            m["eval"][f"{r['model']}/judge_n"] = r["n"]

    acc = 0.9 if discriminates else 0.5
    rel: dict = {
        "judge_check": {
            "n": 20,
            "correct": int(20 * acc),
            "accuracy": acc,
            "ci_low": acc - 0.2,
            "ci_high": min(1.0, acc + 0.08),
            "chance": 0.5,
            "discriminates": discriminates,
            "by_degradation": {
                g: {"n": 7, "accuracy": acc, "ci_low": acc - 0.3, "ci_high": min(1.0, acc + 0.1)}
                for g in ("truncated", "shuffled", "other_answer")
            },
        },
        "parse_shares": {"ok": 0.7, "tolerant": 0.1, "logprob": 0.0, "retried": 0.05, "failed": 0.15},
    }
    if mode == "pairwise":
        rel["position_agreement"] = {mm: {"n": 9, "agreement": 0.67, "ci_low": 0.35, "ci_high": 0.88} for mm in MODELS}
    _write_json(ev / "reliability.json", rel)

    values = {mm: {} for mm in MODELS}  # per-item values, as the eval stage pairs its own models
    for j in judgments:
        if j.get("score") is not None:
            values[j["model"]].setdefault(f"judge_{mode}", {})[j["question_id"]] = j["score"]
    for it in items:
        if it["model"] in values:
            v = it["logprob_sum"] / it["tokens"]
            key = "heldout_loss" if it["kind"] == "heldout" else "ref_loglik"
            values[it["model"]].setdefault(key, {})[it["item_id"]] = -v if key == "heldout_loss" else v
    paired = []
    for a in ("v1", "v2"):
        for metric, av in values[a].items():
            res = S.paired_bootstrap(av, values["base"][metric], metric != "heldout_loss", 500, 0)
            paired.append(
                {
                    "comparison": f"{a} vs base",
                    "a": a,
                    "b": "base",
                    "metric": metric,
                    **res,
                    "note": note if metric.startswith("judge_") else "",
                }
            )
    S.write_csv_rows(paired, ev / "paired.csv", S.PAIRED_COLUMNS)
    _write_json(d / "metrics.json", m)
    return d


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))
