"""The layering of the pack (docs/architecture.md): imports go apps -> comfy -> core only, nodes -> comfy/core, no
import cycles (lazy imports inside functions count), and the old module paths and command lines keep working.

Static checks (``import_graph``: the source is parsed, nothing imported), so they run without ComfyUI."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import import_graph
import pytest
from conftest import COMFYUI, NO_COMFY

ROOT = Path(__file__).resolve().parents[1]


def test_the_pack_has_no_layer_violation_and_no_import_cycle():
    """Protects the architecture: the method never reaches the glue or ComfyUI, the glue never an application,
    and no two modules import each other (directly or around a loop)."""
    assert import_graph.check(ROOT) == []


def _tree(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text), encoding="utf-8")


CLEAN = {
    "__init__.py": "from .nodes import EXT\n",
    "dreamcache/__init__.py": "__version__ = '0'\n",
    "dreamcache/core/__init__.py": "",
    "dreamcache/core/method.py": "import torch\nfrom .. import __version__\n",
    "dreamcache/comfy/__init__.py": "",
    "dreamcache/comfy/glue.py": "import comfy.samplers\nimport nodes\nfrom ..core import method\n",
    "dreamcache/apps/__init__.py": "",
    "dreamcache/apps/tool.py": "from ..comfy.glue import x\nfrom ..core.method import y\n",
    "nodes/__init__.py": "import folder_paths\nfrom ..dreamcache.comfy import glue\nEXT = 1\n",
}


def test_a_clean_tree_passes(tmp_path):
    """The checker does not flag the allowed directions (apps -> comfy -> core, ComfyUI modules from the glue,
    ComfyUI's absolute ``nodes`` from the glue)."""
    _tree(tmp_path, CLEAN)
    assert import_graph.check(tmp_path) == []


def test_the_checker_reports_every_planted_violation(tmp_path):
    """The check can fail: a lazy core -> glue import, a core -> ComfyUI import, glue -> application, nodes ->
    application, and a lazy two-module cycle are each reported, and nothing else is."""
    _tree(tmp_path, {
        **CLEAN,
        "dreamcache/core/method.py": """\
            import torch
            import folder_paths

            def lazy():
                from ..comfy.glue import helper
            """,
        "dreamcache/comfy/glue.py": "from ..core import method\nfrom ..apps import tool\n",
        "dreamcache/apps/tool.py": "from . import other\n",
        "dreamcache/apps/other.py": "def later():\n    from .tool import run\n",
        "nodes/__init__.py": "from ..dreamcache.apps.tool import run\nEXT = 1\n",
    })
    problems = import_graph.check(tmp_path)
    expected = [
        "dreamcache.core.method:2 imports ComfyUI's 'folder_paths', which dreamcache.core must not import",
        "dreamcache.core.method:5 lazily imports dreamcache.comfy.glue, which dreamcache.core must not import",
        "dreamcache.comfy.glue:2 imports dreamcache.apps.tool, which dreamcache.comfy must not import",
        "nodes:1 imports dreamcache.apps.tool, which nodes must not import",
        "import cycle: dreamcache.apps.other -> dreamcache.apps.tool -> dreamcache.apps.other",
    ]
    for line in expected:
        assert line in problems, (line, problems)
    # the core -> glue -> core loop is a cycle too; nothing beyond these is reported
    assert [p for p in problems if p not in expected] == [
        "import cycle: dreamcache.comfy.glue -> dreamcache.core.method -> dreamcache.comfy.glue"]


ROOMS = {
    "dreamcache/apps/progress.py": "def bar():\n    pass\n",
    "dreamcache/apps/data/__init__.py": "from ..progress import bar\n",
    "dreamcache/apps/data/layout.py": "def _read():\n    pass\n",
    "dreamcache/apps/eval/__init__.py": "",
    "dreamcache/apps/eval/generate.py": "from ..data import layout\n",
    "dreamcache/apps/train/__init__.py": "",
    "dreamcache/apps/train/loop.py": "from ..eval import generate\nfrom ..data.layout import bar\n",
    "dreamcache/apps/run/__init__.py": "",
    "dreamcache/apps/run/cli.py": "from ..progress import bar\n",
}


def test_the_applications_rooms_import_one_way(tmp_path):
    """Inside apps the allowed directions pass (train -> eval -> data, every room -> shared modules)."""
    _tree(tmp_path, {**CLEAN, **ROOMS})
    assert import_graph.check(tmp_path) == []


def test_the_checker_reports_rooms_imported_the_wrong_way_and_private_names(tmp_path):
    """The room rule can fail: data -> eval (upward, lazily), eval -> train (upward), run -> train (run stands
    alone), a shared module -> a room, and a private name taken from another folder are each reported."""
    _tree(tmp_path, {
        **CLEAN, **ROOMS,
        "dreamcache/apps/data/layout.py": "def _read():\n    from ..eval import generate\n",
        "dreamcache/apps/eval/generate.py": "from ..data.layout import _read\nfrom ..train import loop\n",
        "dreamcache/apps/run/cli.py": "from ..train.loop import x\n",
        "dreamcache/apps/progress.py": "from .data import layout\n",
    })
    problems = import_graph.check(tmp_path)
    expected = [
        "dreamcache.apps.data.layout:2 lazily imports dreamcache.apps.eval.generate: apps/data must not import "
        "apps/eval (it may import shared modules)",
        "dreamcache.apps.eval.generate:2 imports dreamcache.apps.train.loop: apps/eval must not import apps/train "
        "(it may import apps/data)",
        "dreamcache.apps.run.cli:1 imports dreamcache.apps.train.loop: apps/run must not import apps/train "
        "(it may import shared modules)",
        "dreamcache.apps.progress:1 imports dreamcache.apps.data.layout: the shared module dreamcache.apps.progress "
        "must not import apps/data (it may import shared modules)",
        "dreamcache.apps.eval.generate:1 imports the private name _read from dreamcache.apps.data.layout, another "
        "folder; make it public in its right home",
    ]
    for line in expected:
        assert line in problems, (line, problems)
    assert all(p in expected or p.startswith("import cycle:") for p in problems), problems


def test_an_absolute_nodes_import_in_the_core_is_comfyui(tmp_path):
    """``import nodes`` means ComfyUI's nodes.py (the pack's own package is only reachable relatively)."""
    _tree(tmp_path, {**CLEAN, "dreamcache/core/method.py": "def f():\n    import nodes\n"})
    assert import_graph.check(tmp_path) == [
        "dreamcache.core.method:2 lazily imports ComfyUI's 'nodes', which dreamcache.core must not import"]


@pytest.mark.skipif(COMFYUI is None, reason=NO_COMFY)
def test_the_list_of_comfyui_modules_is_complete():
    """The core rule knows every top-level module of the ComfyUI it is tested against."""
    skip = {"tests", "tests-unit", "script_examples", "input", "output", "models", "custom_nodes", "alembic_db",
            "user", "temp", "web", "notebooks"}
    top = {p.stem for p in COMFYUI.glob("*.py")} | {
        p.name for p in COMFYUI.iterdir()
        if p.is_dir() and p.name not in skip and not p.name.startswith(".") and any(p.rglob("*.py"))}
    assert top - import_graph.COMFYUI_MODULES == set()


def test_old_module_paths_give_the_new_modules():
    """Users' scripts that import the 0.1 paths (``dreamcache.patch``, ...) or the single-room apps paths
    (``dreamcache.apps.trainer``, ...) get the very new module, with a DeprecationWarning naming where it moved and
    the release that removes the old path."""
    from dreamcache import _aliases

    for old, (new, release) in _aliases.MOVED.items():
        sys.modules.pop(f"dreamcache.{old}", None)
        with pytest.warns(DeprecationWarning,
                          match=rf"dreamcache.{old} moved to dreamcache.{new}; .* goes in release {release}"):
            mod = importlib.import_module(f"dreamcache.{old}")
        assert mod is importlib.import_module(f"dreamcache.{new}"), old
    sys.modules.pop("dreamcache.patch", None)
    with pytest.warns(DeprecationWarning):
        import dreamcache.patch as old_patch
    import dreamcache.core.patch as new_patch

    assert old_patch is new_patch and old_patch.DreamCachePatch is new_patch.DreamCachePatch


def test_a_module_that_became_a_package_still_gives_its_names():
    """``from dreamcache.apps.train import TrainConfig`` (the module before one folder per application) still gives
    the class, now in dreamcache.apps.train.config, with a DeprecationWarning naming the removal release; the
    package's own submodules and unknown names are untouched."""
    import dreamcache.apps.train as pkg
    from dreamcache import _aliases
    from dreamcache.apps.train import config

    release = _aliases.MOVED_NAMES["apps.train"][1]
    with pytest.warns(DeprecationWarning, match=f"dreamcache.apps.train.TrainConfig moved to "
                                                f"dreamcache.apps.train.config.TrainConfig; .* release {release}"):
        assert pkg.TrainConfig is config.TrainConfig
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        pkg._private  # noqa: B018


def test_every_shim_names_a_release():
    """Compatibility shims live in dreamcache/_aliases.py only, each with the release that removes it."""
    from dreamcache import _aliases

    for table in (_aliases.MOVED, _aliases.MOVED_NAMES, _aliases.ENTRY_MODULES):
        for old, (new, release) in table.items():
            assert release.count(".") == 2 and all(p.isdigit() for p in release.split(".")), (old, release)
    warns = re.compile(r"DeprecationWarning,\s*stacklevel|category=DeprecationWarning")
    shims = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "dreamcache").rglob("*.py"))
             if warns.search(p.read_text(encoding="utf-8"))]
    assert shims == ["dreamcache/_aliases.py"], shims


def test_the_old_data_and_train_modules_still_import():
    """``dreamcache.data`` and ``dreamcache.train`` are command entry points now; imported (0.1 scripts), they still
    give the library they held, with a DeprecationWarning."""
    code = ("import warnings; warnings.simplefilter('always'); "
            "import dreamcache.apps.data as new_data, dreamcache.apps.train.config as new_train\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import dreamcache.data as d, dreamcache.train as t\n"
            "assert d.validate_dataset is new_data.validate_dataset and t.TrainConfig is new_train.TrainConfig\n"
            "print(sorted(str(x.message) for x in w if x.category is DeprecationWarning))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dreamcache.data moved to dreamcache.apps.data" in r.stdout
    assert "dreamcache.train moved to dreamcache.apps.train.config" in r.stdout


def test_new_paths_import_without_warnings():
    """The pack's own imports use the new paths: importing the applications warns about nothing."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); "
            "import dreamcache.apps.run.cli, dreamcache.apps.data.cli, dreamcache.apps.train.cli, "
            "dreamcache.apps.run.runner, dreamcache.apps.eval.cli, dreamcache.apps.train.config, "
            "dreamcache.apps.train.batch, dreamcache.apps.data.sharding")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module, prog", [
    ("dreamcache", "python -m dreamcache"),
    ("dreamcache.train", "python -m dreamcache.train"),
    ("dreamcache.data", "python -m dreamcache.data"),
])
def test_command_lines_still_answer_help(module, prog):
    """``python -m dreamcache``, ``python -m dreamcache.train`` and ``python -m dreamcache.data`` keep working
    (thin entry modules over dreamcache.apps)."""
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {prog}"), r.stdout[:200]


def test_every_module_is_in_the_architecture_page():
    """docs/architecture.md lists every module of the pack (as `core/patch.py` or `nodes/apply.py`) and every
    application folder of the room rule, so a new module cannot go undocumented."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for f in sorted((ROOT / "dreamcache").rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py")):
        if f.name == "__init__.py":
            continue
        rel = f.relative_to(ROOT).as_posix()
        if f"`{rel}`" not in text and f"`{rel.removeprefix('dreamcache/')}`" not in text:
            missing.append(rel)
    assert missing == [], f"docs/architecture.md does not mention {missing}"
    for room in import_graph.APPS_ROOMS:
        assert f"`apps/{room}/" in text, room
