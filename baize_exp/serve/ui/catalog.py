"""What the chat page offers: the models found in run dirs and adapter dirs (one shared base), the eval questions
of the first run, and the answers its eval stage recorded (which the arena shows for an eval question, so a vote
is on exactly the answers the judge saw)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from baize_exp import models as M
from baize_exp.config import EvalConfig
from baize_exp.data import load_eval_questions
from baize_exp.errors import UserError
from baize_exp.io import read_jsonl
from baize_exp.merge import run_config

STAGE_NAMES = {"train": "v1", "sdf": "v2"}  # <run>/<stage>/adapter is that run's model of this name


class ChatSetupError(UserError):
    """Run or adapter dirs the chat page cannot serve together, with what to do."""


@dataclass
class ChatModel:
    """A model on the page. `label` is unique on the page (and what the arena reveals); `name` is the model's name
    in its run (base, v1, v2, or an adapter dir's name)."""

    label: str
    name: str
    run: Path | None = None
    adapter: Path | None = None

    def record(self) -> dict:
        """What a vote keeps about this model (see baize_exp.human)."""
        return {
            "label": self.label,
            "name": self.name,
            "run": str(self.run) if self.run else None,
            "adapter": str(self.adapter) if self.adapter else None,
            "adapter_hash": M.adapter_hash(self.adapter),
        }


@dataclass
class Catalog:
    models: list[ChatModel]
    model_config: Any  # the shared base's `model` config, or None when --model names it
    home: Path | None  # the first run: its eval questions and votes file
    questions: list[dict] = field(default_factory=list)
    recorded: dict[tuple[str, str], str] = field(default_factory=dict)  # (label, question id) -> eval answer
    eval_max_tokens: int = EvalConfig.max_new_tokens


def _run_of(path: Path) -> Path | None:
    """The run dir `path` is, or the run an adapter dir lives in."""
    if (path / ".hydra" / "config.yaml").is_file():
        return path
    found = run_config(path)
    return found.parent.parent if found else None


def _adapters_of(path: Path) -> list[tuple[str, Path, Path | None]]:
    """(name in its run, adapter dir, run dir) for a run dir (v1 and v2 where they exist) or an adapter dir."""
    if (path / "adapter_config.json").is_file():
        run = _run_of(path)
        name = STAGE_NAMES.get(path.parent.name, path.name) if run else path.name
        return [(name, path, run)]
    if not (path / ".hydra" / "config.yaml").is_file():
        raise ChatSetupError(f"{path}: neither a run dir (.hydra/config.yaml) nor an adapter dir (adapter_config.json)")
    found = [(n, path / s / "adapter", path) for s, n in STAGE_NAMES.items()]
    return [f for f in found if (f[1] / "adapter_config.json").is_file()]


def _base_config(runs: list[Path], model: str | None) -> Any:
    """The one base every model shares: --model names it, else every run's config must name the same one."""
    if model:
        return None
    configs = {r: OmegaConf.load(r / ".hydra" / "config.yaml").model for r in runs}
    if not configs:
        raise ChatSetupError("no run dir among the paths, so the base model is unknown: pass --model <option|dir>")
    distinct = {OmegaConf.to_yaml(c) for c in configs.values()}
    if len(distinct) > 1:
        names = ", ".join(f"{r.name}: {c.get('name')}" for r, c in configs.items())
        raise ChatSetupError(
            f"the runs have different base models ({names}); one process holds one base: start one baize-chat per base"
        )
    return next(iter(configs.values()))


def _labels(found: list[tuple[str, Path, Path | None]]) -> list[str]:
    """Each adapter's page label: its name, prefixed by its run dir's name when several runs are on the page
    (the last two path parts where two runs share a dir name)."""
    runs = list(dict.fromkeys(r for _, _, r in found))
    if len(runs) <= 1 and len({n for n, _, _ in found}) == len(found):
        return [n for n, _, _ in found]
    short = {r: r.name if r else "" for r in runs}
    if len(set(short.values())) < len(runs):
        short = {r: f"{r.parent.name}/{r.name}" if r else "" for r in runs}
    return [f"{short[r]}/{n}" if r else n for n, _, r in found]


def build_catalog(paths: list[Path], model: str | None = None) -> Catalog:
    """The page's models (base first) from run dirs and adapter dirs, and the first run's eval questions."""
    found = [f for p in paths for f in _adapters_of(Path(p).expanduser().resolve())]
    runs = list(dict.fromkeys(r for p in paths if (r := _run_of(Path(p).expanduser().resolve()))))
    mcfg = _base_config(runs, model)
    labels = _labels(found)
    if len(set(labels)) < len(labels):
        raise ChatSetupError(f"two models would have the same name on the page: {labels}")
    models = [ChatModel("base", "base", runs[0] if len(runs) == 1 else None)]
    models += [ChatModel(label, n, r, a) for label, (n, a, r) in zip(labels, found, strict=True)]
    cat = Catalog(models, mcfg, runs[0] if runs else None)
    _add_questions(cat)
    return cat


def _add_questions(cat: Catalog) -> None:
    """The first run's eval questions (its eval.questions and eval.limit; the shipped set without a run) and the
    answers each run's eval stage recorded for its models."""
    ecfg = OmegaConf.load(cat.home / ".hydra" / "config.yaml").get("eval") if cat.home else None
    cat.questions = load_eval_questions(ecfg.get("questions") if ecfg else None, ecfg.get("limit") if ecfg else None)
    if ecfg is not None and ecfg.get("max_new_tokens"):
        cat.eval_max_tokens = int(ecfg.get("max_new_tokens"))
    by_run: dict[Path, dict[tuple[str, str], str]] = {}
    for m in cat.models:
        run = m.run
        if run is None:
            continue
        if run not in by_run:
            path = run / "eval" / "answers.jsonl"
            rows = read_jsonl(path) if path.is_file() else []
            by_run[run] = {(a["model"], str(a["question_id"])): a["answer"] for a in rows if a.get("answer")}
        for (name, qid), text in by_run[run].items():
            if name == m.name:
                cat.recorded[(m.label, qid)] = text
