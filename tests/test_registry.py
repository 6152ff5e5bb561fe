"""What the Comfy Registry, comfy-cli and the frontend's compatibility check read from the pack (no ComfyUI needed).

Protects: `comfy node validate` stays clean (its security scan, run here with the same ruff rules, finds no exec or
eval anywhere in the repository); `[project.urls]` uses the four names comfy-cli reads (another name such as
"Bug Tracker" is silently dropped); the registry fields are complete and well-formed; `requires-comfyui` is a range
that comfy-cli accepts and that npm's semver (the frontend's check; here its PyPI port, node-semver) matches for
every ComfyUI release CI tests, and for releases after the newest tested one, as the README says.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
README = (ROOT / "README.md").read_text()
#: comfy-cli 1.23's grammar for requires-comfyui: comma-separated parts, each [operator]major.minor.patch[-suffix]
COMFY_CLI_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def releases_ci_tests() -> list[str]:
    """The ComfyUI releases CI tests: the range the README states, and every tree .ci/run finds in shared/."""
    m = re.search(r"\*\*ComfyUI (\d+\.\d+\.\d+) to (\d+\.\d+\.\d+)\*\*", README)
    assert m, "the README's Prerequisites must state the tested range as **ComfyUI X to Y**"
    found = set(m.groups())
    from dreamcache.comfy.env import comfyui_version

    shared = Path(os.environ.get("DREAMCACHE_SHARED") or ROOT.parent / "shared")
    for tree in sorted((shared / "comfyui").glob("*/")):
        v = comfyui_version(tree)
        if v:
            found.add(v)
    return sorted(found, key=lambda v: tuple(map(int, v.split("."))))


def test_security_scan_of_comfy_node_validate_is_clean():
    """comfy-cli runs ruff with these rules over the whole pack; exec/eval "will soon be an error" there."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "-q", "--select", "S102,S307,E702",
                        "--exit-zero", "--output-format", "concise"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", r.stdout


def test_comfyui_version_is_read_without_running_the_file(tmp_path):
    from dreamcache.comfy.env import comfyui_version

    (tmp_path / "comfyui_version.py").write_text('# generated\n__version__ = "0.33.0"\nraise SystemExit("ran")\n')
    assert comfyui_version(tmp_path) == "0.33.0"
    (tmp_path / "comfyui_version.py").write_text("VERSION = 1\n")
    assert comfyui_version(tmp_path) is None
    assert comfyui_version(tmp_path / "nowhere") is None


def test_project_urls_use_the_names_the_registry_reads():
    urls = PROJECT["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Repository", "Issues"}, urls
    assert all(u.startswith("https://") for u in urls.values())
    assert urls["Issues"].startswith(urls["Repository"]) and urls["Issues"].endswith("/issues")


def test_registry_fields_are_complete():
    from dreamcache import __version__

    name = PROJECT["name"]
    # the registry's node id rules: < 100 characters; letters, digits, '-', '_', '.'; no two special characters in a
    # row; starts with a letter
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]) and PROJECT["version"] == __version__
    assert len(PROJECT["description"]) > 40
    assert (ROOT / PROJECT["license"]["file"]).is_file()
    assert PROJECT["requires-python"].startswith(">=")
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert COMFY.get(key), f"[tool.comfy] {key} is empty"
    icon = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)", COMFY["Icon"])
    assert icon and (ROOT / icon.group(1)).is_file(), "the Icon URL must point at a file the repository ships"
    # the frontend compares these with the user's machine: OS Independent skips the check; accelerators are omitted
    # because the pack runs wherever ComfyUI runs (an accelerator list would flag CPU users)
    assert "Operating System :: OS Independent" in PROJECT["classifiers"]
    assert not [c for c in PROJECT["classifiers"] if c.startswith("Environment ::")]


def test_requires_comfyui_is_read_the_same_by_comfy_cli_and_the_frontend():
    from nodesemver import satisfies

    spec = COMFY["requires-comfyui"]
    assert all(COMFY_CLI_PART.match(p.strip()) for p in spec.split(",")), f"comfy-cli would drop {spec!r}"
    releases = releases_ci_tests()
    assert len(releases) >= 2
    for v in releases:
        assert satisfies(v, spec), f"the frontend would flag ComfyUI {v}, which CI tests, as incompatible ({spec})"
    oldest = tuple(map(int, releases[0].split(".")))
    below = f"{oldest[0]}.{oldest[1]}.{oldest[2] - 1}" if oldest[2] else f"{oldest[0]}.{oldest[1] - 1}.99"
    assert not satisfies(below, spec), f"{spec} must exclude releases older than the oldest tested one"
    # releases after the newest tested one are not flagged (README: untested, not blocked)
    newest = tuple(map(int, releases[-1].split(".")))
    assert satisfies(f"{newest[0]}.{newest[1] + 1}.0", spec)
    assert re.search(r"after\s+the\s+newest\s+tested", README), "the README must say what newer releases get"


def test_a_comma_range_is_the_trap_this_guards_against():
    """Negative control: npm semver never matches the comma range the pack used to declare."""
    from nodesemver import satisfies

    assert not any(satisfies(v, ">=0.3.64,<=0.33.0") for v in ("0.3.64", "0.33.0"))
