"""The project installs like a package: `pip install -e .` into a fresh environment (offline, the dependencies
already there), a `histoshift` command that works from any folder; pyproject's ranges admit the pinned lock."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    out = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                pkg, version = line.split("==")
                out[pkg.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_the_declared_ranges_admit_the_pinned_lock():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    declared = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    for req in declared + [r for r in extras if r.name != "histoshift"]:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req} is not pinned in requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} does not admit the pinned {pins[name]}"
    assert project["scripts"]["histoshift"] == "histoshift.cli:entry"
    assert {"fm", "track", "kaggle", "dev"} <= set(project["optional-dependencies"])


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn", "pytorch_optimizer": "pytorch-optimizer",
                 "huggingface_hub": "huggingface-hub"}


def _third_party_imports() -> dict[str, str]:
    """Every top-level module the package imports that is not the standard library -> the first file doing it."""
    import ast

    found = {}
    for path in sorted((REPO / "src" / "histoshift").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "histoshift":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared():
    """What arrives only through another package (scipy through scikit-learn, huggingface_hub through timm) breaks
    the day that package drops it: every import is a declared dependency or extra, read from the source."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    declared |= {Requirement(r).name.lower().replace("_", "-") for group in project["optional-dependencies"].values()
                 for r in group}
    imports = _third_party_imports()
    assert {"torch", "timm", "scipy", "huggingface_hub"} <= set(imports)  # the scan sees lazy imports too
    missing = {m: where for m, where in imports.items() if DISTRIBUTIONS.get(m, m).replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


@pytest.mark.slow
def test_editable_install_into_a_fresh_environment_gives_the_command(tmp_path):
    """A fresh venv that sees the packages already installed here (like a notebook's environment), the project
    installed editable with pip, offline (--no-index: every dependency must be satisfied already); then the
    command from another folder, and a tiny stage."""
    project = tmp_path / "project"  # a copy: the build writes its metadata beside the sources
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "installed-here.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the pinned wheels
    py = venv / "bin" / "python"
    proc = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-e",
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = venv / "bin" / "histoshift"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    run = lambda *args: subprocess.run([str(command), *args], cwd=elsewhere, env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=600)
    helped = run("--help")
    assert helped.returncode == 0 and "stain-gan" in helped.stdout and "usage: histoshift" in helped.stdout
    where = subprocess.run([str(py), "-c", "import histoshift; print(histoshift.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert Path(where.stdout.strip()) == project / "src" / "histoshift" / "__init__.py"  # editable: the sources
    for args in (["demo-data", "--per-center", "6", "--test-size", "6"], ["prepare", "--workers", "1"]):
        proc = run("--root", "root", *args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (elsewhere / "root" / "work" / "cache" / "manifest.json").exists()


def test_the_command_puts_large_tensors_on_huge_pages_unless_the_user_said_otherwise(monkeypatch):
    """entry() sets torch's THP_MEM_ALLOC_ENABLE before main() (before any stage imports torch); a user's own
    value is kept."""
    import gc

    from histoshift import cli

    seen = []
    monkeypatch.setattr(cli, "main", lambda: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")) or 0)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # frozen objects are never collected: not in the test process
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert cli.entry() == 0 and seen == ["1"]
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert cli.entry() == 0 and seen == ["1", "0"]
