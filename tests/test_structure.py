"""The layout's rules, read from the source's own imports: data flows one way (models -> capture -> analysis ->
report -> pipeline -> track -> cli), no stage module imports the Report, and the files' reader needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import massact

SRC = Path(massact.__file__).parent
# Each layer may import the layers before it, never one after it.
ORDER = ["settings", "models", "capture", "analysis", "report", "pipeline", "track", "cli"]
BASE = {"errors", "sites", "numbers", "launch", "texts", "writes", "__init__", "__main__", "masks", "data"}  # shared by every layer
# Jupyter's view of a Report renders the page's summary card: imported inside ``_repr_html_`` only when it is called.
ALLOWED_UP = {("analysis/results.py", "report.html")}


def imports(path: Path) -> list[tuple[str, bool]]:
    """The massact modules ``path`` imports (dotted, below massact), each with whether it is at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(SRC).with_suffix("").parts[:-1]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("massact."):
                target = node.module.removeprefix("massact.")
            else:
                continue
            found += [(target, id(node) in top_level)]
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("massact."), id(node) in top_level) for a in node.names if a.name.startswith("massact.")]
    return found


def layer(module: str) -> str:
    return module.split(".")[0]


def test_imports_run_one_way():
    up = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        here = layer(name.removesuffix(".py").replace("/", "."))
        if here in BASE:
            continue
        for target, _ in imports(path):
            there = layer(target)
            if not there or there in BASE or there == here or (name, target) in ALLOWED_UP:  # "": the package itself
                continue
            if ORDER.index(there) > ORDER.index(here):
                up.append(f"{name} imports {target}")
    assert up == []


def test_no_stage_module_imports_the_report():
    """The stages take their inputs and return their results; only the pipeline (and the readers above analysis)
    assemble and read the Report."""
    stages = [p for p in (SRC / "analysis").glob("*/*.py")]
    assert len(stages) > 30
    offenders = [p.relative_to(SRC).as_posix() for p in stages if any(t == "analysis.results" for t, _ in imports(p))]
    assert offenders == []


def test_the_schema_and_show_load_no_torch(tmp_path):
    """report.json, protect.json, profile.json and the other files are read without torch (so massact show prints a
    saved report without loading it)."""
    code = ("import sys, massact.report.schema, massact.report.files, massact.report.text, massact.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"]


def test_the_stages_the_pipeline_calls_take_at_most_six_parameters():
    """A stage takes the loaded model, the findings or an earlier stage's result, the settings and what else it truly
    needs, not a dozen unpacked fields. Checked on the stage entry points: the functions ``pipeline.py`` and
    ``track/run.py`` import from ``analysis/<stage>/`` modules (positional and keyword-only parameters); their
    internal helpers are free to take more."""
    wanted: dict[Path, set[str]] = {}
    for caller in (SRC / "pipeline.py", SRC / "track" / "run.py"):
        tree = ast.parse(caller.read_text(encoding="utf-8"))
        package = caller.relative_to(SRC).parts[:-1]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            parts = [*package[:len(package) - node.level + 1], *node.module.split(".")] if node.level else node.module.split(".")[1:]
            if len(parts) == 3 and parts[0] == "analysis":
                wanted.setdefault(SRC.joinpath(*parts).with_suffix(".py"), set()).update(a.name for a in node.names)
            elif len(parts) == 2 and parts[0] == "analysis" and SRC.joinpath(*parts).is_dir():
                for alias in node.names:  # a module imported whole (``from ..analysis.track import align``)
                    wanted.setdefault(SRC.joinpath(*parts, alias.name).with_suffix(".py"), set()).add("*")
    too_many, checked = [], 0
    for path, names in wanted.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and (node.name in names or "*" in names and not node.name.startswith("_")):
                checked += 1
                count = len([a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs if a.arg != "self"])
                if count > 6:
                    too_many.append(f"{path.relative_to(SRC).as_posix()}: {node.name} takes {count}")
    assert checked > 20 and too_many == []
