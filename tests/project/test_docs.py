"""The README and docs/: links resolve (files and #anchors), the quick start is on the first screen,
the recipe table is the registry's, and every raw result file is cited with its provenance."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # comments in code blocks are not headings
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def local_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(path.read_text()) if not t.startswith(("http://", "https://", "mailto:"))]


def test_slug_matches_github():
    assert slug("`prepare` at competition scale (2-core CPU machine, 24 GiB RAM, no GPU, 2026-11-24)") == \
        "prepare-at-competition-scale-2-core-cpu-machine-24-gib-ram-no-gpu-2026-11-24"
    assert slug("Plain, adapted or both: how the stack stage chooses") == \
        "plain-adapted-or-both-how-the-stack-stage-chooses"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    links = local_links(doc)
    for target in links:
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(dest), f"{doc.name}: link to {target}: no such heading in {dest.name}"


def test_every_doc_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in local_links(REPO / "README.md")}
    for doc in DOCS[1:]:
        assert doc.resolve() in linked, f"README.md does not link {doc.relative_to(REPO)}"


def test_quick_start_is_on_the_first_screen():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 230, "the README is meant to be read in five minutes: move details to docs/"
    first = "\n".join(readme[:45])
    assert "bash train.sh && bash infer.sh" in first                      # the demo / the competition
    assert "input/" in first and "submissions/submission.csv" in first    # the competition files
    assert "HF_TOKEN" in first and "HF_HUB_OFFLINE=1 HF_HUB_CACHE=" in first  # a foundation model, online and offline


def test_readme_recipe_table_is_the_registry(capsys):
    from histoshift.cli import main

    assert main(["recipes"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.count("\n") >= 10 and table in (REPO / "README.md").read_text()


def test_every_raw_result_is_cited_and_every_cited_one_exists():
    text = "\n".join(p.read_text() for p in DOCS)
    results = sorted((REPO / "bench" / "results").iterdir())
    assert results
    for f in results:
        assert f.name in text, f"bench/results/{f.name} is not cited in README.md or docs/"
    for name in set(re.findall(r"(?:accuracy|speed|fm|prepare-scale)-\d{4}-\d\d-\d\d[\w.-]*\.(?:txt|json)", text)):
        assert (REPO / "bench" / "results" / name).exists(), f"docs cite bench/results/{name}, which does not exist"


def test_measured_tables_carry_machine_and_date():
    """Every section of docs/benchmarks.md that holds a table names its machine and date."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    sections = re.split(r"^#{2,3} ", text, flags=re.M)[1:]
    machine = re.compile(r"H100|CPU|cores", re.I)
    date = re.compile(r"20\d\d-\d\d-\d\d")
    checked = 0
    for body in sections:
        if "\n|---" not in body:
            continue
        checked += 1
        heading = body.splitlines()[0]
        context = body.split("\n|")[0] + "\n".join(l for l in body.splitlines() if l.startswith("|"))
        assert machine.search(context) and date.search(context), f"benchmarks.md '{heading}': no machine or date"
    assert checked >= 10
