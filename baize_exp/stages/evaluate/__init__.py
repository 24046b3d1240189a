"""Stage 4 — evaluation: answers to held-out questions scored by a judge, and held-out loss and perplexity.

Outputs under `<run>/eval/`: answers.jsonl, judgments.jsonl, scores.csv (per model, mode and category: mean with
a 95% bootstrap interval, n and parse failures; category `all` for the total), scores.png (the judge mode's bars
per category) and scores_<mode>.png for the probability-weighted score. Answers come from a disk cache when the
same model, adapter weights, prompt and sampling were generated before (see `answers`); judge modes and parsing
are in `judge`, the statistics in `stats`.
"""

from baize_exp.stages.evaluate.judge import parse_score, parse_verdict, weighted_score
from baize_exp.stages.evaluate.stage import STAGE, paired_rows, publish_final, run
from baize_exp.stages.evaluate.wandb_tables import log_wandb
from baize_exp.stats import bootstrap_ci, score_table

__all__ = [
    "STAGE",
    "bootstrap_ci",
    "log_wandb",
    "paired_rows",
    "parse_score",
    "parse_verdict",
    "publish_final",
    "run",
    "score_table",
    "weighted_score",
]
