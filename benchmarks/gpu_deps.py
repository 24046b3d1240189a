"""What the GPU check needs on a machine that cannot download: its import closure, the check of it, the wheels.

    python benchmarks/gpu_deps.py --write    # here: derive benchmarks/gpu-requirements.txt from the closure
    python benchmarks/gpu_deps.py            # print the closure, what the GPU image lacks, and any problem

- The closure: the distributions whose modules a fresh interpreter loads when it imports `CHECK_IMPORTS` (what
  `run.py` and the check's workers import, the lazily imported training and DeepSpeed parts included;
  tests/test_gpu_check.py checks that the dry run's own processes import nothing outside it).
- The wheels to carry: the closure minus what the GPU image has (`gpu-image.txt`, from the device tool's list of
  that image's packages), plus each image package that a carried distribution requires at a version the image is
  not known to have: its version is listed in gpu-image.txt and fails the requirement, or it is not listed and the
  requirement has a lower bound (a pure-Python wheel then travels, pinned; a compiled one cannot be swapped safely
  and is reported instead). Versions are pinned to the ones installed here, which the project is tested with.
- The preflight (the check's first step, seconds): the closure imported in a fresh process; every requirement of a
  closure distribution on another one met by the installed version. One line names what is missing or too old.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REQUIREMENTS = HERE / "gpu-requirements.txt"
IMAGE = HERE / "gpu-image.txt"
GPU_PYTHON = "3.12"  # the GPU image's python (STACK-NOTES); wheels are fetched for it

# What the check's processes import: run.py (the pipeline, every stage), the training core and DeepSpeed's ZeRO
# parts that Lightning's strategy imports only when it builds an engine, and the generation worker.
CHECK_IMPORTS = [
    "baize_exp.cli",
    "baize_exp.pipeline",
    "baize_exp.training",
    "baize_exp.training.strategy",
    "baize_exp.stages.sdf",
    "baize_exp.generate",
    "datasets",  # training data is tokenized into an Arrow file (training/data.py imports it when it tokenizes)
    "pyarrow",
    "pytorch_lightning",
    "pytorch_lightning.strategies.deepspeed",
    "lightning_fabric",
    "peft",
    "transformers",
    "safetensors",
    "deepspeed",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.bf16_optimizer",
    "deepspeed.ops.adam",
    "openai",
    "hydra",
    "omegaconf",
]

# Imported only because they are installed: Hydra's plugin discovery imports every `hydra_plugins` package it
# finds (the Optuna sweeper, the submitit launcher); without them a single run composes and runs the same.
DISCOVERED_ONLY = {"hydra-optuna-sweeper", "hydra-submitit-launcher"}

_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
failed = {}
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except Exception as e:  # a missing package, or one that fails on import (too old a dependency)
        failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
# each loaded module's file, looked up in the installed distributions' file lists (a top-level name like `google`
# is shared by several distributions; the file says which one a module came from)
owner = {}
for dist in md.distributions():
    for f in dist.files or []:
        if f.suffix in (".py", ".so", ".pyd"):
            owner[str(dist.locate_file(f).resolve())] = dist.metadata["Name"]
paths = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
from pathlib import Path
dists = sorted({owner[p] for p in (str(Path(f).resolve()) for f in paths if f) if p in owner})
print("PROBE " + json.dumps({"failed": failed, "dists": dists}))
"""


def probe(modules: list[str] = CHECK_IMPORTS, env: dict | None = None) -> dict:
    """Import `modules` in a fresh interpreter: {"failed": {module: error}, "dists": [distribution names]}."""
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), json.dumps(modules)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "DS_BUILD_OPS": "0"},
        timeout=300,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    if not lines:
        return {"failed": {"(interpreter)": (r.stderr.strip().splitlines() or ["no output"])[-1]}, "dists": []}
    return json.loads(lines[-1][6:])


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def requirements_of(dist: str, python: str | None = None) -> list:
    """`dist`'s requirements that apply on this platform (extras left out), as packaging Requirement objects."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": f"{python}.0"} if python else None
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**(env or {}), "extra": ""}):
            out.append(req)
    return out


def requirement_problems(dists: list[str]) -> list[str]:
    """Unmet requirements among the installed closure: "typing-extensions 4.12.2 < >=4.16 (pydantic needs it)"."""
    problems = []
    for dist in dists:
        if dist.startswith("baize"):
            continue
        for req in requirements_of(dist):
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{canonical(req.name)} missing ({dist} needs {req})")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{canonical(req.name)} {have} does not meet {req.specifier} ({dist} needs it)")
    return problems


def image_packages() -> dict[str, str | None]:
    """The GPU image's packages: name -> version where the device tool's notes give one, else None."""
    out: dict[str, str | None] = {}
    for line in IMAGE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or out.get(canonical(name))  # a name listed twice keeps its version
    return out


def pure_python(dist: str) -> bool:
    wheel = md.distribution(dist).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel and "none-any" in wheel


def carried(dists: list[str]) -> tuple[dict[str, str], list[str]]:
    """({distribution: pinned version} to carry as wheels, [image packages that may be too old and cannot be
    carried]) for the closure `dists` (see the module docstring)."""
    image = image_packages()
    carry = {canonical(d): md.version(d) for d in dists if canonical(d) not in image and not d.startswith("baize")}
    unsure = []
    frontier = list(carry)
    while frontier:
        dist = frontier.pop()
        for req in requirements_of(dist, GPU_PYTHON):
            name = canonical(req.name)
            if name in carry:
                continue
            known = image.get(name, "absent") if name in image else "absent"
            lower_bound = any(s.operator in (">=", ">", "==", "~=") for s in req.specifier)
            if known == "absent":
                need = True  # not in the image and not imported by us: something a carried package imports
            elif known is None:
                need = lower_bound
            else:
                need = bool(req.specifier) and not req.specifier.contains(known, prereleases=True)
            if not need:
                continue
            try:
                version = md.version(name)
            except md.PackageNotFoundError:
                continue  # an optional platform dependency not installed here either
            if known != "absent" and not pure_python(name):
                unsure.append(f"{name} ({dist} needs {req.specifier}; the image's version is {known or 'unknown'})")
                continue
            carry[name] = version
            frontier.append(name)
    return dict(sorted(carry.items())), sorted(set(unsure))


def write_requirements(dists: list[str]) -> str:
    carry, unsure = carried(dists)
    lines = [
        "# Generated by `python benchmarks/gpu_deps.py --write` from the GPU check's import closure against the GPU",
        "# image's packages (gpu-image.txt); pinned to the versions this project is tested with. `make gpu-wheels`",
        "# downloads these into .whl/; benchmarks/gpu_check.py installs them into a target dir when an import fails.",
        *(f"# not carried (compiled, in the image at an unknown version): {u}" for u in unsure),
        *(f"{name}=={version}" for name, version in carry.items()),
    ]
    return "\n".join(lines) + "\n"


def listed_requirements() -> dict[str, str]:
    out = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            out[canonical(name)] = version
    return out


def install_wheels(wheels: Path, target: Path) -> str | None:
    """pip install every wheel in `wheels` into `target` (no index, no deps); None, or why it failed."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(target),
            *files,
        ],
        capture_output=True,
        text=True,
    )
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["pip failed"])[-1]


def preflight(wheels: str, gpu: bool) -> str | None:
    """The check's first step. On the GPU machine, the wheels in `wheels` (when there are any) are installed into a
    target dir put first on the path, so a carried version wins over an older one in the image; the dry run uses
    this environment as it is (the carried wheels are built for the GPU machine's python). Then None when the
    closure imports and every requirement in it is met, else one line naming what is missing or too old."""
    note = ""
    if gpu and any(Path(wheels).glob("*.whl")):
        target = Path(os.environ.get("TMPDIR", "/tmp")) / "baize_gpu_site"
        why = install_wheels(Path(wheels), target)
        if why is None:
            sys.path.insert(0, str(target))
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
            note = f" (with {wheels}/*.whl installed into {target})"
        else:
            note = f" (installing {wheels}/*.whl failed: {why})"
    result = probe()
    problems = [f"import {m} failed: {e}" for m, e in result["failed"].items()]
    problems += requirement_problems(result["dists"]) if not result["failed"] else []
    if gpu and not problems:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"no CUDA GPU visible to torch {torch.__version__}; run on a GPU machine or --cpu-dry-run")
    if not problems:
        return None
    fix = "carry them as wheels: `make gpu-wheels` here, then name .whl in the device call's carry (README)"
    return f"{len(problems)} problem(s){note}: " + "; ".join(problems) + f". {fix}"


def device_name(dry: bool) -> str:
    import torch

    gpu = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    return f"{gpu}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite {REQUIREMENTS.name} from the closure")
    args = ap.parse_args()
    result = probe()
    if result["failed"]:
        raise SystemExit(f"gpu_deps: imports failed here: {result['failed']}")
    text = write_requirements(result["dists"])
    if args.write:
        REQUIREMENTS.write_text(text)
    print(f"closure: {len(result['dists'])} distributions\n{text}", end="")
    problems = requirement_problems(result["dists"])
    print("requirement problems here: " + ("; ".join(problems) if problems else "none"))


if __name__ == "__main__":
    main()
