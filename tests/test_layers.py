"""The package's data flows one way: h5 -> cache -> loader -> model -> predictions -> stack -> CSV.

A module may import from its own layer or from layers before it, never from a later stage (e.g.
training must not import the infer stage; the TTA primitives both use live in `tta.py`).
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "histoshift"

# earlier layers first; a module matches the longest prefix listed
LAYERS = [
    ("safeio", "lineage", "config"),          # foundations: files, digests, typed configs
    ("data",),                                # h5 reader, cache, quality, folds, augmentation, loaders
    ("models",),                              # backbones, weights, foundation-model recipes
    ("precision", "algorithms", "metrics"),   # what a training step needs besides the model
    ("features", "tta"),                      # frozen-backbone store; per-view logits
    ("runs",),                                # the run folder's layout and lineage
    ("train",),                               # stage: train
    ("predict",),                             # stage: infer
    ("stack",),                               # stage: stack
    ("submit", "report"),                     # stages: submit, report
    ("cli", "__main__"),                      # the entry point
]

# the only imports allowed to point forward, each a registry lookup for validation (named, so new ones show)
REGISTRY_LOOKUPS = {
    ("config", "algorithms"),          # algorithm.name must be registered
    ("config", "models.foundation"),   # model.recipe must be registered, its overrides valid
}


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"histoshift.{module} is in no layer of tests/test_layers.py: add it")


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
        if not target or (me, target) in REGISTRY_LOOKUPS:
            continue
        assert layer_of(target) <= layer_of(me), (
            f"histoshift/{path.relative_to(PKG)}:{line} imports histoshift.{target}, a later stage")


def test_imports_are_resolved_so_the_rule_can_fail():
    # relative imports of every depth resolve to package modules (else the check would pass vacuously)
    assert {"tta", "data.cache", "runs"} <= {t for t, _ in internal_imports(PKG / "train.py")}
    assert "data.augment" in {t for t, _ in internal_imports(PKG / "models" / "foundation" / "loader.py")}
    assert "models.foundation.bioptimus" in {t for t, _ in internal_imports(PKG / "models" / "foundation" / "__init__.py")}
    assert layer_of("predict") > layer_of("train") > layer_of("tta") > layer_of("models.backbone")
