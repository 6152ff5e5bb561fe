"""Node help pages (web/docs/<NodeId>/en.md, shown in the node's help panel) and the README (no ComfyUI needed).

Protects: every node of the pack has one help page, at the URL the frontend asks for first
(/extensions/<pack>/docs/<NodeId>/<locale>.md, locale "en", in frontends 1.27 to 1.58; the flat <NodeId>.md is only
its fallback, so a page there would cost a 404 per opening), that names each of its inputs (checked against the
/object_info snapshot, so a new input without documentation fails) and stays readable in the frontend's narrow side
panel (no table wider than two columns); and the README keeps its promises: the test command CI runs, every node
id, the model files of the shipped workflows, a dated changelog.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFO = json.loads((ROOT / "tests" / "data" / "object_info_snapshot.json").read_text())["object_info"]
OUR_NODES = sorted(k for k in INFO if k.startswith("DreamCache"))
README = (ROOT / "README.md").read_text()


HELP = ROOT / "web" / "docs"


def help_page(node_id: str) -> Path:
    """The one help page of a node: where the frontend looks first for an English-speaking user."""
    return HELP / node_id / "en.md"


@pytest.mark.parametrize("node_id", OUR_NODES)
def test_help_page_documents_every_input(node_id):
    page = help_page(node_id)
    assert page.is_file(), f"{page} is missing"
    text = page.read_text()
    assert text.startswith("# ") and len(text) > 300
    for section in ("required", "optional"):
        for name in INFO[node_id]["input"].get(section, {}):
            assert f"`{name}`" in text, f"{node_id}'s help page does not explain input '{name}'"


def test_help_pages_are_one_per_node_and_fit_the_side_panel():
    pages = sorted(HELP.rglob("*.md"))
    assert pages == sorted(help_page(n) for n in OUR_NODES), "one page per node, at web/docs/<NodeId>/en.md"
    for page in pages:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("|"):
                cells = line.strip().strip("|").split("|")
                assert len(cells) <= 2, f"{page.relative_to(ROOT)}:{n}: a {len(cells)}-column table is cramped in " \
                                        "the side panel; use a list"


def test_readme_lists_every_node_and_the_test_command():
    for node_id in OUR_NODES:
        assert f"`{node_id}`" in README, f"README's node reference lacks {node_id}"
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^python -m pytest.*$", ci, re.M).group(0)
    assert f"\n{command}\n" in README, "the README must give the exact test command .ci/run runs"
    assert "python -m dreamcache run workflows/dreamcache_basic.json" in README


def test_readme_names_the_model_files_of_the_workflows():
    for wf in (ROOT / "workflows").glob("*.json"):
        for m in json.loads(wf.read_text())["models"]:
            assert m["name"] in README, f"{m['name']} ({wf.name}) is not in the README's model table"


def test_changelog_is_dated():
    """The changelog's sections are "Unreleased" (first, at most once) and released versions, each dated with a
    real ISO date, newest first, the newest being the package's version or older."""
    import datetime

    import dreamcache

    log = README.split("## Changelog", 1)[1].split("\n## ", 1)[0]
    heads = re.findall(r"^### (.+)$", log, re.M)
    assert heads, "the README's changelog has no sections"
    if heads[0] == "Unreleased":
        heads = heads[1:]
    released = []
    for head in heads:
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+) — (\d{4}-\d{2}-\d{2})", head)
        assert m, f"changelog section '{head}' is not 'X.Y.Z — YYYY-MM-DD' (or a first 'Unreleased')"
        released.append((tuple(map(int, m.groups()[:3])), datetime.date.fromisoformat(m.group(4))))
    assert released, "no released version in the changelog"
    assert released == sorted(released, reverse=True), "changelog versions and dates must go newest first"
    assert [d for _, d in released] == sorted((d for _, d in released), reverse=True)
    assert released[0][0] <= tuple(map(int, dreamcache.__version__.split("."))), dreamcache.__version__
