"""docs/design.md cannot drift from the code: its module index names every module of the package (and nothing else)
with a role, every code reference in it resolves, and its data flow and stage table list every stage the scripts run."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "src" / "histoshift"
DESIGN = REPO / "docs" / "design.md"
FILE_TYPES = (".json", ".jsonl", ".yaml", ".csv", ".png", ".md", ".npy", ".safetensors", ".txt", ".sh", ".h5", ".gz",
              ".toml", ".lock", ".pt", ".bin")


def modules() -> set[str]:
    return {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def module_index(text: str) -> dict[str, str]:
    """The module index's rows: `path` -> its role."""
    rows = re.findall(r"^\| `([^`]+\.py)` \| (.*?) \|$", section(text, "Module index"), re.M)
    return dict(rows)


def unresolved(text: str) -> list[str]:
    """Backticked references in `text` that name no module, attribute or file of the package: `x.py`, `a/b.py`,
    `module.attr` (`module` a dotted path in the package: `stack.decide`, `stages.stain_gan.attach`)."""
    mods = {m.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for m in modules()}
    bad = []
    for ref in sorted(set(re.findall(r"`([^`\s]+)`", text))):
        ref = ref.rstrip("()")
        if ref.endswith(FILE_TYPES) or "/" in ref and not ref.endswith(".py"):
            continue
        if ref.endswith(".py"):
            if not any(m == ref or m.endswith("/" + ref) for m in modules()) and not (REPO / ref).exists():
                bad.append(ref)
            continue
        parts = ref.split(".")
        if len(parts) < 2 or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", ref):
            continue
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head not in mods:
                continue
            obj = importlib.import_module(f"histoshift.{head}")
            for name in parts[i:]:
                if not hasattr(obj, name):
                    bad.append(ref)
                    break
                obj = getattr(obj, name)
            break
    return bad


def script_stages() -> set[str]:
    return {s for script in ("train.sh", "infer.sh")
            for s in re.findall(r'-m histoshift --root \S+ ([a-z-]+)', (REPO / script).read_text())}


def test_the_module_index_names_every_module_with_its_role():
    index = module_index(DESIGN.read_text())
    assert set(index) == modules(), (f"missing from docs/design.md's module index: {sorted(modules() - set(index))}; "
                                     f"listed but gone: {sorted(set(index) - modules())}")
    assert all(len(role.strip()) > 10 for role in index.values()), [m for m, r in index.items() if len(r.strip()) <= 10]


def test_every_code_reference_resolves():
    assert not unresolved(DESIGN.read_text())


def test_the_data_flow_and_the_stage_table_list_every_stage_the_scripts_run():
    text = DESIGN.read_text()
    flow = section(text, "Data flow")
    stages = script_stages()
    assert {"prepare", "train", "infer", "stack", "submit", "embed", "robustify", "preflight"} <= stages
    block = flow[:flow.index("```", flow.index("```") + 3)]
    in_flow = set(re.findall(r"--([a-z]+(?:-[a-z]+)*)-*>", block))
    table = set(re.findall(r"^\| [^|]+ \| `([a-z-]+)[ `]", flow, re.M))
    assert stages <= in_flow, f"not in the data flow: {sorted(stages - in_flow)}"
    assert stages <= table, f"not in the stage table: {sorted(stages - table)}"


def test_the_checks_can_fail():
    text = DESIGN.read_text()
    assert unresolved(
        "`stages.stain_gan.attach`, `stack.decide`, `config.py`, `choice.decide`, `runs.py`, "
        "`model.feature_shift`, `choice.json`"
    ) == ["config.py", "stack.decide", "stages.stain_gan.attach"]
    index = module_index(text)
    assert "engine.py" in index and len(index) > 50
    gone = text.replace("| `engine.py` |", "| `engine_old.py` |")
    assert set(module_index(gone)) != modules()
