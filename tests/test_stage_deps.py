"""dvc.yaml lists, for every stage, exactly the code the stage runs: its import closure in retrieval/ and stages/.

A file the stage runs but does not list lets a code change slip past ``dvc repro`` ("up to date"); a listed file
the stage never runs reruns it needlessly. The closure is computed from the code with ``ast``: every import
anywhere in a file (many are lazy, inside functions), relative imports resolved, plus string literals naming a
module (``"retrieval.onnx_import:cross_encoder_from_onnx"``). Two imports are by computed names and are followed
by meaning instead: the console script imports ``stages.<name>`` for ``cmd: retrieval <name>``, and a module that
calls the family registry's loader (``get_family``) imports ``FAMILIES[model]`` only, so the closure is computed
for every family, with ``${model}`` in dvc.yaml's deps resolved to it.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("retrieval", "stages")
MODEL_VARIABLE = "${model}"
REGISTRY_TABLE = "FAMILIES"  # a module assigning a literal dict of this name is a family registry
# A string naming a module, optionally followed by ":attribute" (the form of entry points and hub.py's converters).
MODULE_STRING = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::[A-Za-z_][\w.]*)?")


@dataclass(frozen=True)
class ModuleCode:
    """What one module's source says about the modules it runs."""

    path: str                                    # relative to the project root, posix
    edges: frozenset[str]                        # modules it imports or names in a string
    imported_names: frozenset[tuple[str, str]]   # (module, name) of every ``from module import name``
    attributes: frozenset[str]                   # every ``x.name`` attribute name it uses
    families: dict[str, str]                     # its FAMILIES table (family -> module) when it is the registry
    loaders: frozenset[str]                      # its functions that import a module by a computed name


def module_paths(root: Path, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, str]:
    """Dotted module name -> file path (relative, posix) of every .py file under the given packages."""
    paths = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            paths[name] = path.relative_to(root).as_posix()
    return paths


def absolute_import_base(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The module a ``from <dots><target> import ...`` in ``module`` reads from."""
    if level == 0:
        return target or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"{module}: relative import with {level} dots goes above its top-level package")
    base = ".".join(package[: len(package) - (level - 1)])
    return f"{base}.{target}" if target else base


def assigned_names(node: ast.Assign | ast.AnnAssign) -> set[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {target.id for target in targets if isinstance(target, ast.Name)}


def parse_module(module: str, path: str, source: str, known: set[str]) -> ModuleCode:
    """Read the import edges (among ``known`` modules) and registry facts of one module's source."""
    tree = ast.parse(source, filename=path)
    is_package = path.endswith("__init__.py")
    families, table_strings = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and REGISTRY_TABLE in assigned_names(node):
            families = ast.literal_eval(node.value)
            # the registry's own strings are followed per family, not all at once
            table_strings = {id(child) for child in ast.walk(node.value)}
    names, imported_names, attributes, loaders = set(), set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute_import_base(module, is_package, node.level, node.module)
            names.add(base)
            for alias in node.names:
                names.add(f"{base}.{alias.name}")  # `from retrieval import jvm` imports a module
                imported_names.add((base, alias.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in table_strings:
            match = MODULE_STRING.fullmatch(node.value)
            if match:
                names.add(match["module"])
        elif isinstance(node, ast.Attribute):
            attributes.add(node.attr)
        elif families and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = (inner for inner in ast.walk(node) if isinstance(inner, ast.Call))
            if any(getattr(call.func, "attr", getattr(call.func, "id", None)) == "import_module" for call in calls):
                loaders.add(node.name)
    return ModuleCode(path=path, edges=frozenset(names & known - {module}), imported_names=frozenset(imported_names),
                      attributes=frozenset(attributes), families=families, loaders=frozenset(loaders))


def read_code(root: Path, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, ModuleCode]:
    paths = module_paths(root, packages)
    return {name: parse_module(name, path, (root / path).read_text(), set(paths)) for name, path in paths.items()}


def family_registry(code: dict[str, ModuleCode]) -> str | None:
    """The module holding FAMILIES, or None when there is none."""
    registries = sorted(name for name, module in code.items() if module.families)
    if len(registries) > 1:
        raise ValueError(f"more than one family registry ({', '.join(registries)}): ${{model}} would be ambiguous")
    return registries[0] if registries else None


def family_names(code: dict[str, ModuleCode]) -> list[str | None]:
    """The families to evaluate every closure for ([None] without a registry: then nothing resolves ${model})."""
    registry = family_registry(code)
    return sorted(code[registry].families) if registry else [None]


def loads_a_family(module: ModuleCode, registry: str, code: dict[str, ModuleCode]) -> bool:
    """Whether the module calls the registry's loader: `from registry import get_family` or `registry.get_family`."""
    loaders = code[registry].loaders
    return (any((registry, loader) in module.imported_names for loader in loaders)
            or (registry in module.edges and bool(loaders & module.attributes)))


def closure(entries: set[str], code: dict[str, ModuleCode], family: str | None) -> set[str]:
    """Every module the entries run, with the registry's loader importing ``family``'s module only."""
    registry = family_registry(code)
    seen, todo = set(), sorted(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in code)  # packages passed
        todo.extend(code[name].edges)
        if registry is not None and loads_a_family(code[name], registry, code):
            families = code[registry].families
            if family not in families:
                raise ValueError(f"{name} loads a model family, but {family!r} is not one of {', '.join(families)}")
            todo.append(families[family])
    return seen


def stage_entries(stage: str, cmd: str, scripts: dict[str, str], code: dict[str, ModuleCode]) -> set[str]:
    """``cmd: retrieval <name> ...`` runs the console script's module (stages.cli), which imports stages.<name>."""
    words = cmd.split()
    if len(words) < 2 or words[0] not in scripts:
        raise ValueError(f"stage {stage}: cmd {cmd!r} is not `<console script> <stage> ...` "
                         f"(console scripts: {', '.join(scripts)})")
    script_module = scripts[words[0]].partition(":")[0]
    stage_module = f"{script_module.rpartition('.')[0]}.{words[1]}"
    for module in (script_module, stage_module):
        if module not in code:
            raise ValueError(f"stage {stage}: cmd {cmd!r} runs {module}, "
                             f"which is no file under {', '.join(CODE_PACKAGES)}")
    return {script_module, stage_module}


def is_code_dep(dep: str) -> bool:
    return dep.startswith(tuple(f"{package}/" for package in CODE_PACKAGES))


def code_deps(stage: str, deps: list[str], family: str | None) -> set[str]:
    """The deps under retrieval/ and stages/, ``${model}`` resolved to ``family``; data paths are left out."""
    resolved = set()
    for dep in deps:
        if not is_code_dep(dep):
            continue
        path = dep.replace(MODEL_VARIABLE, family) if family is not None else dep
        if "${" in path:
            raise ValueError(f"stage {stage}: code dep {dep!r} uses a variable other than {MODEL_VARIABLE}")
        resolved.add(path)
    return resolved


def dependency_gaps(stages: dict, scripts: dict[str, str], code: dict[str, ModuleCode]
                    ) -> tuple[dict[str, dict[str | None, list[str]]], dict[str, list[str]]]:
    """Per stage: the files each family's closure runs but the deps miss, and the code deps no closure runs."""
    families = family_names(code)
    registry = family_registry(code)
    family_paths = {code[name].path for name in code[registry].families.values()} if registry else set()
    missing, stale = {}, {}
    for stage, spec in stages.items():
        entries = stage_entries(stage, spec["cmd"], scripts, code)
        deps = spec.get("deps", [])
        runs = {family: {code[name].path for name in closure(entries, code, family)} for family in families}
        for family in families:
            gap = sorted(runs[family] - code_deps(stage, deps, family))
            if gap:
                missing.setdefault(stage, {})[family] = gap
        # stale: a code dep no family's run of the stage imports (with ${model}, each family's own file), or a
        # family's module named as is, which the runs of every other family would depend on too
        unused = sorted(dep for dep in deps if is_code_dep(dep)
                        and (not any(code_deps(stage, [dep], family) & runs[family] for family in families)
                             or (dep in family_paths and not all(dep in runs[family] for family in families))))
        if unused:
            stale[stage] = unused
    return missing, stale


def describe_missing(missing: dict[str, dict[str | None, list[str]]], families: list[str | None]) -> str:
    """One line per stage for the files every family misses, one more per family for those only it misses."""
    lines = []
    for stage, gaps in missing.items():
        everywhere = set.intersection(*(set(gaps.get(family, [])) for family in families))
        if everywhere:
            lines.append(f"  {stage}: {', '.join(sorted(everywhere))}")
        for family, gap in gaps.items():
            own = sorted(set(gap) - everywhere)
            if own:
                lines.append(f"  {stage} with model={family}: {', '.join(own)}")
    return "dvc.yaml's deps miss code the stage runs (add these files):\n" + "\n".join(lines)


def project_pipeline(root: Path) -> tuple[dict, dict[str, str], dict[str, ModuleCode]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    return stages, scripts, read_code(root)


# ---- the project's dvc.yaml -------------------------------------------------------------------------------------

def test_every_stage_lists_the_code_it_runs_for_every_model_family():
    stages, scripts, code = project_pipeline(ROOT)
    missing, _ = dependency_gaps(stages, scripts, code)
    assert not missing, describe_missing(missing, family_names(code))


def test_no_stage_lists_code_it_never_runs():
    stages, scripts, code = project_pipeline(ROOT)
    _, stale = dependency_gaps(stages, scripts, code)
    assert not stale, ("dvc.yaml's deps list code no model family's run of the stage imports (it reruns "
                       "needlessly):\n" + "\n".join(f"  {stage}: {', '.join(deps)}" for stage, deps in stale.items()))


# ---- the closure on a small tree, worked out by hand ------------------------------------------------------------

TREE = {
    "retrieval/__init__.py": "",
    "retrieval/io.py": "import json\n",
    "retrieval/jvm.py": "",
    "retrieval/lazy.py": "def f():\n    from .io import write\n",
    "retrieval/convert.py": "",
    "retrieval/hub.py": 'CONVERT = "retrieval.convert:run"\nNAME = "retrieval"\nOTHER = "numpy.linalg"\n',
    "retrieval/unused.py": "import retrieval.io\n",
    "retrieval/models/__init__.py": (
        "import importlib\n"
        'FAMILIES = {"a": "retrieval.models.a", "b": "retrieval.models.b"}\n'
        "def get_family(name):\n    return importlib.import_module(FAMILIES[name])\n"),
    "retrieval/models/a.py": "from .. import jvm\n",
    "retrieval/models/b.py": "from ..lazy import f\n",
    "retrieval/models/helper.py": "from ..hub import CONVERT\n",
    "stages/__init__.py": "",
    "stages/cli.py": ('import importlib\nimport click\n'
                      'def get(name):\n    return importlib.import_module(f"stages.{name}")\n'),
    "stages/index.py": "from retrieval.models import get_family\n",
    "stages/rerank.py": "from retrieval.models.helper import CONVERT\n",
}
SCRIPTS = {"retrieval": "stages.cli:main"}


@pytest.fixture
def tree_code(tmp_path):
    for path, source in TREE.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    return read_code(tmp_path)


def test_closure_follows_relative_lazy_and_string_imports_and_passes_through_packages(tree_code):
    entries = stage_entries("rerank", "retrieval rerank --fast", SCRIPTS, tree_code)
    assert entries == {"stages.cli", "stages.rerank"}
    # stages.cli (+ stages), stages.rerank -> retrieval.models.helper (+ retrieval, retrieval.models: the registry is
    # passed through but get_family is never called, so no family) -> retrieval.hub (`from ..hub`) -> the string
    # "retrieval.convert:run"; "retrieval" names the package (already in); "numpy.linalg" is not ours.
    assert closure(entries, tree_code, "a") == {
        "stages", "stages.cli", "stages.rerank", "retrieval", "retrieval.models", "retrieval.models.helper",
        "retrieval.hub", "retrieval.convert"}


def test_a_stage_calling_the_registry_loader_runs_that_family_only(tree_code):
    entries = stage_entries("index", "retrieval index baseline", SCRIPTS, tree_code)
    common = {"stages", "stages.cli", "stages.index", "retrieval", "retrieval.models"}
    # a: `from .. import jvm` is retrieval/__init__ and retrieval.jvm
    assert closure(entries, tree_code, "a") == common | {"retrieval.models.a", "retrieval.jvm"}
    # b: `from ..lazy import f` -> retrieval.lazy, whose lazy `from .io import write` -> retrieval.io
    assert closure(entries, tree_code, "b") == common | {"retrieval.models.b", "retrieval.lazy", "retrieval.io"}


def test_gaps_name_the_missing_files_per_stage_and_family_and_the_stale_ones(tree_code):
    stages = {
        "index": {"cmd": "retrieval index baseline",
                  "deps": ["stages/cli.py", "stages/index.py", "retrieval/models/${model}.py", "retrieval/jvm.py",
                           "retrieval/unused.py", "retrieval/models", "retrieval/models/b.py",
                           "data/raw/${dataset.name}"]},
        "rerank": {"cmd": "retrieval rerank", "deps": ["stages/rerank.py"]},
    }
    missing, stale = dependency_gaps(stages, SCRIPTS, tree_code)
    # index, family a runs stages/__init__, retrieval/__init__, retrieval/models/__init__ (unlisted), models/a and
    # jvm (listed); family b runs models/b (listed) and lazy, io (unlisted). rerank lists its own module only.
    inits = ["retrieval/__init__.py", "retrieval/models/__init__.py", "stages/__init__.py"]
    assert missing == {
        "index": {"a": inits, "b": sorted(inits + ["retrieval/io.py", "retrieval/lazy.py"])},
        "rerank": {family: ["retrieval/__init__.py", "retrieval/convert.py", "retrieval/hub.py",
                            "retrieval/models/__init__.py", "retrieval/models/helper.py", "stages/__init__.py",
                            "stages/cli.py"] for family in ("a", "b")},
    }
    # jvm.py runs for family a only, which is enough; unused.py runs for none; a folder is never a file that runs;
    # models/b.py runs for b, but named as is (not as ${model}) it would rerun family a's index on b's changes
    assert stale == {"index": ["retrieval/models", "retrieval/models/b.py", "retrieval/unused.py"]}
    assert describe_missing({"index": missing["index"]}, ["a", "b"]) == (
        "dvc.yaml's deps miss code the stage runs (add these files):\n"
        "  index: retrieval/__init__.py, retrieval/models/__init__.py, stages/__init__.py\n"
        "  index with model=b: retrieval/io.py, retrieval/lazy.py")


def test_a_cmd_that_is_not_a_console_script_stage_is_an_error(tree_code):
    with pytest.raises(ValueError, match=r"stage index: cmd 'python stages/index\.py' is not `<console script>"):
        stage_entries("index", "python stages/index.py", SCRIPTS, tree_code)
    with pytest.raises(ValueError, match=r"stage evaluate: cmd 'retrieval evaluate' runs stages\.evaluate, which"):
        stage_entries("evaluate", "retrieval evaluate", SCRIPTS, tree_code)


def test_a_code_dep_with_another_variable_is_an_error():
    deps = ["retrieval/models/${model}.py", "data/${dataset.name}"]
    assert code_deps("index", deps, "a") == {"retrieval/models/a.py"}  # data paths are not code
    with pytest.raises(ValueError, match=r"stage index: code dep 'retrieval/\$\{dataset\.name\}\.py' uses a variable"):
        code_deps("index", ["retrieval/${dataset.name}.py"], "a")


def test_a_relative_import_above_the_top_package_is_an_error():
    assert absolute_import_base("retrieval.models.dense", False, 2, "dataset") == "retrieval.dataset"
    assert absolute_import_base("retrieval.models", True, 1, None) == "retrieval.models"
    with pytest.raises(ValueError, match=r"retrieval\.io: relative import with 3 dots goes above"):
        absolute_import_base("retrieval.io", False, 3, "x")
