"""The import graph of baize_exp (module level and inside functions alike): no cycle, no arrow from a lower layer
up to a stage or the pipeline, no stage into another stage, and the package ships what a non-editable install
needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import baize_exp

PKG = Path(baize_exp.__file__).parent
LOWER = (
    "baize_exp.io",
    "baize_exp.errors",
    "baize_exp.config",
    "baize_exp.cpu",
    "baize_exp.models",
    "baize_exp.chat",
    "baize_exp.data",
    "baize_exp.serve",
    "baize_exp.training",
    "baize_exp.merge",
    "baize_exp.stats",
    "baize_exp.human",
    "baize_exp.wandb_log",
    "baize_exp.generate",
)


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every baize_exp module `path` imports, anywhere in the file (`from baize_exp.x import y` counts x.y when
    that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("baize_exp")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baize_exp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {_module(p): p for p in PKG.rglob("*.py") if "conf" not in p.relative_to(PKG).parts}
GRAPH = {m: {i for i in _imports(p) if i != m} for m, p in MODULES.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            # a package's __init__ importing its own submodules is how packages re-export; not a cycle
            if _within(n, m) and n != m:
                continue
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n in GRAPH and state.get(n) is None:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(GRAPH):
        if state.get(m) is None:
            visit(m, [m])


def test_lower_layers_never_import_a_stage_the_pipeline_or_an_entry_point() -> None:
    bad = [
        f"{m} -> {n}"
        for m, deps in GRAPH.items()
        if any(_within(m, low) for low in LOWER)
        for n in deps
        if any(_within(n, up) for up in ("baize_exp.stages", "baize_exp.pipeline", "baize_exp.cli"))
    ]
    assert not bad, bad


def test_no_stage_imports_another_stage_or_the_pipeline() -> None:
    bad = []
    for m, deps in GRAPH.items():
        if not _within(m, "baize_exp.stages") or m in ("baize_exp.stages", "baize_exp.stages.base"):
            continue
        own = ".".join(m.split(".")[:3])  # baize_exp.stages.<stage>
        for n in deps:
            if (
                _within(n, "baize_exp.pipeline")
                or _within(n, "baize_exp.cli")
                or _within(n, "baize_exp.stages")
                and not (_within(n, own) or n == "baize_exp.stages.base")
            ):
                bad.append(f"{m} -> {n}")
    assert not bad, bad


def test_only_the_entry_points_import_the_pipeline() -> None:
    users = {m for m, deps in GRAPH.items() if "baize_exp.pipeline" in deps}
    assert users <= {"baize_exp.cli"}, users


def test_the_test_servers_are_not_product_code() -> None:
    assert not list(PKG.rglob("fault_server.py"))
    assert not [m for m, p in MODULES.items() if "fault" in p.read_text().lower() and "FaultServer" in p.read_text()]


def test_no_package_shadows_one_of_its_modules_with_a_name_it_exports() -> None:
    """`from baize_exp.training.fit import fit` in training/__init__.py made `baize_exp.training.fit` the function,
    so `import baize_exp.training.fit as m` gave the function and a patch of `m.x` went nowhere (the same happened
    to evaluate.judge). A package's names must not be those of its own modules."""
    import importlib

    clashes = []
    for init in PKG.rglob("__init__.py"):
        package = _module(init)
        modules = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
        modules |= {p.name for p in init.parent.iterdir() if (p / "__init__.py").is_file()}
        exported = vars(importlib.import_module(package))
        clashes += [
            f"{package}.{m}"
            for m in modules
            if m in exported
            and not hasattr(exported[m], "__path__")
            and getattr(exported[m], "__name__", None) != f"{package}.{m}"
        ]
    assert not clashes, clashes


PROBE = """
import sys
from baize_exp import cli
from baize_exp.serve import __main__ as serve
from baize_exp.serve.ui import __main__ as chat
entries = {"run.py": cli.run, "baize-serve": serve.main, "baize-chat": chat.main}
for line in sys.stdin.read().splitlines():
    sys.argv = line.split()
    try:
        entries[sys.argv[0]]()
    except SystemExit:
        pass
    print("torch" in sys.modules, flush=True)
"""


def test_help_config_errors_and_refused_binds_answer_without_importing_torch(tmp_path: Path) -> None:
    """`run.py --help`, a config that does not compose or does not validate, and a server or chat page refused its
    `--host` never import torch (the stages' and the model code's ~6 s of imports come after those checks). One
    process runs them in turn, then the control: a run that composes, which does import it, so the probe can see
    the import."""
    commands = [
        "run.py --help",
        "run.py model.dtype=fp64",
        f"run.py lora.r=-3 hydra.run.dir={tmp_path / 'refused'}",
        "baize-serve --host 0.0.0.0",
        "baize-chat --host 0.0.0.0 somewhere",
        f"run.py model=tiny stages=[plan] hydra.run.dir={tmp_path / 'run'} logger=none",
    ]
    r = subprocess.run(
        [sys.executable, "-c", PROBE],
        input="\n".join(commands),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    answers = [line for line in r.stdout.splitlines() if line in ("True", "False")]
    assert answers == ["False"] * 5 + ["True"], (answers, r.stderr[-2000:])
