"""The layout's rules, read from the source's own imports: data flows one way (models -> capture -> analysis ->
report -> pipeline -> track -> atlas -> cli), no stage module imports the Report, and the files' reader needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import massact

SRC = Path(massact.__file__).parent
# Each layer may import the layers before it, never one after it.
ORDER = ["settings", "models", "capture", "analysis", "report", "pipeline", "track", "atlas", "cli"]
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


# ---- family knowledge lives in the adapters ----

# Names outside models/ that equal a family's name or model type but are none: (file, constant, why).
NOT_A_FAMILY = {
    ("cli.py", "llama"),  # --gguf-arch's default: a GGUF architecture (llama.cpp's tensor names), not a model type
    ("analysis/deploy/exports.py", "llama"),  # the same default of export()
}
# Attribute probes outside models/ that tell no family from another: (file, attribute).
NOT_A_FAMILY_PROBE = {
    ("capture/masks.py", "config"),  # a transformers model (it has a config) from any other input
    ("pipeline.py", "config"),  # the same
    ("track/monitor.py", "config"),  # the same
}


def _family_names() -> set[str]:
    from massact.models.adapters import registry

    return {name.lower() for entry in registry() for name in (entry.adapter.family, *entry.adapter.model_types)}


def test_no_module_outside_models_names_a_family_or_probes_for_one():
    """Only the adapters know families: outside massact/models/, no string is a family's name or model type, and no
    ``hasattr(x, "...")`` tells one module's layout from another's (a layout is a field the adapter declares)."""
    names, found = _family_names(), []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        if name.startswith("models/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
                if (name, node.value) not in NOT_A_FAMILY:
                    found.append(f"{name}:{node.lineno} names {node.value!r}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" and len(node.args) == 2:
                attribute = node.args[1]
                if isinstance(attribute, ast.Constant) and (name, attribute.value) not in NOT_A_FAMILY_PROBE:
                    found.append(f"{name}:{node.lineno} probes {ast.unparse(node)}")
    assert found == []


def _declared(adapter) -> list[str]:
    """The module paths (in the block) the adapter's tree states: each component's own, as the sites derive from."""
    paths = [adapter.attention, adapter.attn_proj if adapter.attention_out else None, *adapter.mlp_norm,
             *adapter.branch_norms.values(), *(adapter.post_norms or ()), adapter.sinks,
             adapter.values.path if adapter.values else None, adapter.gate.path if adapter.gate else None]
    if adapter.mlp is not None:
        mlp = adapter.mlp
        paths += [mlp.path or None, mlp.part(mlp.up), mlp.part(mlp.gate) if mlp.gate else None, mlp.part(mlp.down),
                  mlp.part(mlp.act) if isinstance(mlp.act, str) else None]
    if adapter.moe is not None:
        moe = adapter.moe
        paths += [moe.block or None, moe.part(moe.router.path), moe.part(moe.experts.path),
                  moe.part(moe.shared.path) if moe.shared else None, moe.part(moe.shared_gate) if moe.shared_gate else None]
        if moe.beside is not None:
            paths += [moe.beside.norm, moe.beside.dense_norm, moe.beside.routed_norm]
    return [path for path in paths if path is not None]


def _every_block(adapter):
    """The adapter at each combination of its variants that can be built (a block is dense or sparse, not both)."""
    import dataclasses
    import itertools

    for applies in itertools.product([False, True], repeat=len(adapter.variants)):
        changes = {}
        for variant, on in zip(adapter.variants, applies):
            changes |= variant.changes if on else {}
        try:
            yield dataclasses.replace(adapter, variants=(), **changes)
        except ValueError:
            continue


def test_every_adapter_declares_each_module_once():
    """Each block's tree names a module once (two components never hold one path), and its sites are the ones
    ``block_sites`` derives from that tree: no site is stated apart from its module."""
    from massact.models.adapters import registry
    from massact.models.adapters.base import block_sites

    twice = []
    for entry in registry():
        for here in _every_block(entry.adapter):
            paths = _declared(here)
            twice += [f"{here.family}: {path}" for path in dict.fromkeys(paths) if paths.count(path) > 1]
            assert here.sites == block_sites(here)
    assert twice == []


# ---- the registry checks itself ----


def _configs(model_type: str):
    """The model type's default config, and one per boolean field flipped (the fields a variant's ``when`` reads),
    where the config class accepts the flip (InternLM3's refuses an attention bias without an MLP bias)."""
    import transformers
    from huggingface_hub.errors import StrictDataclassClassValidationError

    config = transformers.AutoConfig.for_model(model_type)
    yield config
    for name, value in list(vars(config).items()):
        if isinstance(value, bool):
            try:
                yield transformers.AutoConfig.for_model(model_type, **{name: not value})
            except (NotImplementedError, StrictDataclassClassValidationError):  # a flag the config class refuses flipped
                continue
    if getattr(config, "num_experts", None):
        try:
            dense = transformers.AutoConfig.for_model(model_type, num_experts=0)
        except StrictDataclassClassValidationError:  # a config with no dense variant (Qwen4-exp's wants num_experts > 0)
            return
        yield dense


# Model types whose transformers default config is a variant massact does not map: refused in one line (none today).
UNMAPPED_DEFAULTS: set[str] = set()


def test_no_config_of_a_registered_model_type_matches_two_adapters():
    """Every registered model type's config (default, and with each flag flipped) maps to one adapter, never two; a
    default no adapter maps is refused as a variant, naming what the family's adapters map."""
    from massact.errors import UsageError
    from massact.models.adapters import adapter_for, registry

    unmapped = []
    for model_type in dict.fromkeys(t for entry in registry() for t in entry.adapter.model_types):
        for index, config in enumerate(_configs(model_type)):
            try:
                adapter_for(config)
            except UsageError as error:
                assert "more than one adapter" not in str(error), error
                if index == 0:
                    assert f"this {model_type!r} config is a variant massact does not map" in str(error)
                    unmapped.append(model_type)
    assert set(unmapped) == UNMAPPED_DEFAULTS


def test_two_adapters_claiming_one_model_type_are_an_error_naming_both():
    import dataclasses

    import pytest

    from massact.models.adapters import Registered, check, registry

    llama = next(entry for entry in registry() if entry.adapter.family == "Llama")
    copy = Registered(adapter=dataclasses.replace(llama.adapter, family="Copy"), source="tests.copy")
    with pytest.raises(ValueError, match=r"Llama \(massact\.models\.adapters\.llama\.ADAPTER\) and by Copy \(tests\.copy\)"):
        check((llama, copy))


def test_an_entry_point_adds_an_adapter_and_says_where_it_comes_from(tmp_path, monkeypatch):
    """A package registers adapters under ``massact.adapters``: a tiny distribution on sys.path defines one for a
    made-up model type with Llama's layout, and one that claims OPT's configs again (which is then an error naming
    both)."""
    import types

    import pytest
    import transformers

    from massact.errors import UsageError
    from massact.models.adapters import GROUP, adapter_for, refresh, source

    (tmp_path / "toy_massact_adapters.py").write_text(
        "import dataclasses\n"
        "from massact.models.adapters.llama import ADAPTER as LLAMA\n"
        "from massact.models.adapters.postln import OPT_PRE_LN\n"
        "TOY = dataclasses.replace(LLAMA, family='Toy', model_types=('toy_lm',))\n"
        "GREEDY = dataclasses.replace(OPT_PRE_LN, family='Greedy OPT', when=lambda config: True)\n", encoding="utf-8")
    info = tmp_path / "toy_massact_adapters-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-massact-adapters\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\ntoy = toy_massact_adapters:TOY\ngreedy = toy_massact_adapters:GREEDY\n",
                                           encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    try:
        adapter = adapter_for(types.SimpleNamespace(model_type="toy_lm"))
        assert adapter.family == "Toy" and adapter.sites["mlp_act"] == ("mlp.down_proj", "in")
        assert source(adapter) == "entry point toy = toy_massact_adapters:TOY in toy-massact-adapters 0.1"
        with pytest.raises(UsageError, match=r"OPT \(massact\.models\.adapters\.postln\.OPT_PRE_LN\) and Greedy OPT \(entry point greedy"):
            adapter_for(transformers.OPTConfig())
    finally:
        monkeypatch.undo()
        sys.modules.pop("toy_massact_adapters", None)
        refresh()
    with pytest.raises(UsageError, match="not supported"):
        adapter_for(types.SimpleNamespace(model_type="toy_lm"))


def test_the_stages_the_pipeline_calls_take_at_most_six_parameters():
    """A stage takes the loaded model, the findings or an earlier stage's result, the settings and what else it truly
    needs, not a dozen unpacked fields. Checked on the stage entry points: the functions ``pipeline.py`` and
    ``track/run.py`` import from ``analysis/<stage>/`` modules and the pipeline's own ``*_stage`` functions
    (positional and keyword-only parameters); their internal helpers are free to take more."""
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
    # The pipeline's own stage functions (detect_stage, mechanism_stage, ...) too.
    wanted.setdefault(SRC / "pipeline.py", set()).update(
        node.name for node in ast.parse((SRC / "pipeline.py").read_text(encoding="utf-8")).body
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_stage"))
    too_many, checked = [], 0
    for path, names in wanted.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and (node.name in names or "*" in names and not node.name.startswith("_")):
                checked += 1
                count = len([a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs if a.arg != "self"])
                if count > 6:
                    too_many.append(f"{path.relative_to(SRC).as_posix()}: {node.name} takes {count}")
    assert checked > 20 and too_many == []
