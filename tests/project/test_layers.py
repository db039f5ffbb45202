"""The package's data flows one way: h5 -> cache -> [features] -> model -> predictions -> stack -> CSV.

A module may import from its own layer or from layers before it, never from a later stage (e.g.
training must not import the infer stage; the TTA primitives both use live in `tta.py`), and no
import cycle exists anywhere, inside a layer included (lazy imports count).
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "histoshift"

# earlier layers first; a module matches the longest prefix listed
LAYERS = [
    ("errors", "safeio", "verified", "lineage", "records", "paths", "progress", "checkpoint", "stack.folder",
     "stack.sets"),
    # plumbing: the error base, files, digests, typed facts, layouts
    ("config", "tracking"),  # typed configs (the model section by kind); trackers
    ("stain",),  # HED, classical normalisers, colour jitter, the GAN, the input transform
    ("data",),  # h5 reader, cache, quality, folds, splits, views, loaders
    ("models",),  # backbones, heads, preprocessing, weights, foundation recipes
    (
        "precision",
        "algorithms",
        "metrics",
        "averaging",
        "paired",
    ),  # what a training step needs besides the model; weight
    # averages; paired evidence between prediction sets
    ("tta",),  # per-view logits (views of images, stored views)
    ("features",),  # the frozen-backbone feature store and its embedding
    ("runs", "predictions"),  # the run folder's layout and lineage
    ("tasks",),  # the kinds of model behind one protocol
    ("engine", "steploop", "stain_gan_steps", "robustify_steps"),  # the loop and what runs on it
    ("stack", "plots", "kaggle_upload"),  # what the last stages compute (stack/: combine, rules, choice)
    ("preflight_checks",),  # what the preflight stage checks before anything long starts
    ("stages",),  # one module per CLI stage; nothing imports them
    ("cli", "__main__"),  # the entry point
]


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"histoshift.{module} is in no layer of tests/project/test_layers.py: add it")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> list[tuple[str, int]]:
    """(imported histoshift module, line) for every import in the file, lazy ones included."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("histoshift"):
                target = node.module.removeprefix("histoshift").lstrip(".")
            else:
                continue
            if not node.module:  # `from . import a, b`
                out += [(f"{target}.{a.name}".lstrip("."), node.lineno) for a in node.names]
            else:
                out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("histoshift").lstrip("."), node.lineno)
                    for a in node.names if a.name.startswith("histoshift.")]
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    assert len(MODULES) > 20
    for path in MODULES:
        if module_name(path):
            layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_never_go_back_up(path):
    me = module_name(path)
    if not me:
        return
    for target, line in internal_imports(path):
        if not target:
            continue
        assert layer_of(target) <= layer_of(me), (
            f"histoshift/{path.relative_to(PKG)}:{line} imports histoshift.{target}, a later stage")


def module_of(target: str) -> str | None:
    """The package module an import resolves to (`a.b.C` -> `a.b` when C is a name in module a.b)."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if (PKG / Path(*parts)).with_suffix(".py").exists() or (PKG / Path(*parts) / "__init__.py").exists():
            return name
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        me = module_name(path)
        graph.setdefault(me, set())
        for target, _ in internal_imports(path):
            dep = module_of(target) if target else ""
            if dep is not None and dep != me:
                graph[me].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"histoshift.{m}" if m else "histoshift" for m in cycle)


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "stain.hed" in graph["stain.transform"] and "stain.hed" in graph["stain.albu"]
    assert "stain.transform" not in graph["stain.albu"]  # both backends share hed.py, not each other
    assert {d for m in graph if m.startswith("config") for d in graph[m]} <= {"safeio", "records", "errors", "config",
                                                                               "config.base", "config.model",
                                                                               "config.sections", "config.errors",
                                                                               "config.schema", "config.io"}, \
        "config validates without importing registries"


def test_imports_are_resolved_so_the_rule_can_fail():
    # relative imports of every depth resolve to package modules (else the check would pass vacuously)
    assert {"engine", "data.cache", "runs"} <= {t for t, _ in internal_imports(PKG / "stages" / "train.py")}
    assert "models.preprocess" in {t for t, _ in internal_imports(PKG / "models" / "foundation" / "loader.py")}
    assert "models.foundation.bioptimus" in {
        t for t, _ in internal_imports(PKG / "models" / "foundation" / "__init__.py")
    }
    assert layer_of("stages.infer") > layer_of("engine") > layer_of("tasks") > layer_of("models.backbone")


def test_nothing_imports_a_stage():
    importers = {m for m, deps in import_graph().items() for d in deps
                 if d.startswith("stages.") and not (m == "cli" or m.startswith("stages"))}
    assert not importers, f"modules importing a stage: {sorted(importers)}"
    siblings = {(m, d) for m, deps in import_graph().items() if m.startswith("stages.")
                for d in deps if d.startswith("stages.")}
    assert not siblings, f"a stage importing another stage: {sorted(siblings)}"


def test_no_module_over_300_lines():
    long = {str(p.relative_to(PKG)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"modules over 300 lines: {long}"


def test_every_stage_the_scripts_call_has_its_module():
    import re

    repo = PKG.parents[1]
    called = set()
    for script in ("train.sh", "infer.sh"):
        called |= set(re.findall(r"-m histoshift --root \S+ ([a-z-]+)", (repo / script).read_text()))
    assert {"prepare", "folds", "train", "infer", "stack", "submit", "report"} <= called
    for stage in called:
        assert (PKG / "stages" / f"{stage.replace('-', '_')}.py").is_file(), stage
    assert len((PKG / "cli.py").read_text().splitlines()) < 150


def _literal_sites(pattern: str) -> set[str]:
    """The modules whose code (string literals included, comments and docstrings too) matches `pattern`."""
    import re

    return {module_name(p) for p in MODULES if re.search(pattern, p.read_text())}


def test_facts_are_parsed_in_one_place():
    # the weights sources' prefixes: records.WeightSource parses model.weights, nothing else reads the string
    assert _literal_sites(r"""["'](package|dir|file|hub):""") <= {"records"}
    # the stack's decision file: written and read through stack.folder.StackDir only
    assert _literal_sites(r"choice\.json") == {"stack.folder"}
    # the kind of model is model.kind, never a frozen boolean (older configs are mapped in config/model.py)
    assert not _literal_sites(r"\.frozen\b") - {"config.model"}
    assert _literal_sites(r"\.frozen\b") <= {"config.model"}


KIND_ROOMS = ("tasks", "config.model")  # where a kind of model may be named; everything else asks the task or config


def kind_comparisons(source: str) -> list[int]:
    """Lines of `source` that compare a `kind` (a name or an attribute) with a model kind's name ("image",
    "feature", ...: config.model.KINDS), in either order, with ==, !=, in or not in."""
    import ast

    from histoshift.config.model import KINDS

    def is_kind(node) -> bool:  # x.kind, kind, x["kind"], x.get("kind", ...)
        if isinstance(node, ast.Subscript):
            node = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            node = node.args[0] if node.args else None
        return (
            (isinstance(node, ast.Attribute) and node.attr == "kind")
            or (isinstance(node, ast.Name) and node.id == "kind")
            or (isinstance(node, ast.Constant) and node.value == "kind")
        )

    def names_a_kind(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in KINDS
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(names_a_kind(e) for e in node.elts)

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_kind(s) for s in sides) and any(names_a_kind(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_nothing_outside_the_tasks_asks_which_kind_a_model_is():
    # a third kind of model is a module in tasks/ and a class in config/model.py: no other module branches on the
    # kind's name (they ask capabilities: model.fine_tuned, model.embeds, model.describe(), task.features(...))
    forks = {module_name(p): lines for p in MODULES
             if not module_name(p).startswith(KIND_ROOMS) and (lines := kind_comparisons(p.read_text()))}
    assert not forks, f"modules comparing a model kind by name: {forks}"


def test_the_kind_check_finds_what_it_looks_for():
    assert kind_comparisons('if cfg.model.kind == "image":\n    pass') == [1]
    assert kind_comparisons('x = 1\nok = "feature" != run.kind') == [2]
    assert kind_comparisons('ok = kind in ("image", "other")') == [1]
    assert kind_comparisons('ok = m.get("kind", "image") == "feature"') == [1]
    assert kind_comparisons('ok = source.kind == "hub"') == []  # a weights source's kind is another fact
    inside = [
        module_name(p) for p in MODULES if module_name(p).startswith(KIND_ROOMS) and kind_comparisons(p.read_text())
    ]
    assert inside, "the kind's own rooms compare kinds: the scan must see them"


def test_lines_fit_120_columns():
    # ruff's E501 at pyproject.toml's 120 columns over the package, the tests, the benchmarks and the scripts: the
    # 300-line rule is not met by density
    import subprocess
    import sys

    repo = PKG.parents[1]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "--no-cache",
                          "src", "tests", "bench", "scripts"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    wide = repo / "tests" / "project" / "wide_line_probe.py"
    try:  # the check can fail: a line of 121 columns
        wide.write_text("x = '" + "a" * 115 + "'\n")
        probe = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(wide)], cwd=repo,
                               capture_output=True, text=True)
        assert probe.returncode == 1 and "E501" in probe.stdout
    finally:
        wide.unlink(missing_ok=True)
