"""The pack's import graph, read statically (``ast``: nothing is imported or run), and the layering rules on it.

Modules are named as ComfyUI loads the pack: the repository root is a package (named ``""`` here, shown as
``<pack>``) holding ``dreamcache`` and ``nodes``, so ``from ..dreamcache.core import x`` in ``nodes/apply.py`` is
``dreamcache.core.x``. An absolute ``import nodes`` is ComfyUI's own ``nodes`` module, never the pack's package.
Every import counts, also those inside functions (lazy imports) and under ``if``/``try``.

Inside ``dreamcache.apps`` every application has its folder (a "room", :data:`APPS_ROOMS`); a room imports only
the rooms below it and the shared modules directly in ``apps/``, which import no room. And no import takes a private
name (``_x``) from another folder.

``check(root)`` returns one line per problem: an import that crosses a layer or room the wrong way, a private name
taken from another folder, or an import cycle.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

#: The pack's packages (folders below the repository root).
PACKAGES = ("dreamcache", "nodes")

#: Top-level modules and packages of ComfyUI (0.3.64 and 0.33.0 source trees, tests and examples left out).
COMFYUI_MODULES = frozenset({
    "api_server", "app", "blueprints", "comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution",
    "comfy_extras", "comfyui_version", "cuda_malloc", "execution", "folder_paths", "hook_breaker_ac10a0",
    "latent_preview", "main", "middleware", "new_updater", "node_helpers", "nodes", "protocol", "server", "utils",
})

#: (layer, pack modules it must not import, whether it may import ComfyUI's modules)
RULES = (
    ("dreamcache.core", ("dreamcache.comfy", "dreamcache.apps", "nodes"), False),
    ("dreamcache.comfy", ("dreamcache.apps", "nodes"), True),
    ("nodes", ("dreamcache.apps",), True),
)

#: The applications' folders in ``dreamcache/apps``, each with the rooms it may import (train -> eval -> data;
#: run stands alone). Modules directly in ``apps/`` (commands, launcher, progress) are shared and import no room.
APPS = "dreamcache.apps"
APPS_ROOMS = {
    "data": (),
    "eval": ("data",),
    "train": ("eval", "data"),
    "run": (),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing pack module
    target: str  # a pack module, or the top-level name of an outside module
    line: int
    lazy: bool  # inside a function
    external: bool  # not a module of the pack
    implied: bool = False  # a package that runs first because a module inside it is imported
    names: tuple[str, ...] = ()  # the names a ``from ... import`` takes from ``target`` (not submodules)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _show(name: str) -> str:
    return name or "<pack>"


def pack_modules(root: str | Path) -> dict[str, Path]:
    """``{module name: file}`` for the root ``__init__.py`` and every ``.py`` file of the pack's packages."""
    root = Path(root)
    out: dict[str, Path] = {}
    if (root / "__init__.py").is_file():
        out[""] = root / "__init__.py"
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name == "" or modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, modules: dict[str, Path]):
        self.name, self.modules, self.depth, self.found = name, modules, 0, []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node, explicit: bool = True, names: tuple[str, ...] = ()):
        if target in self.modules:
            # importing a.b.c runs a and a.b first, unless they are packages the importer itself lives in
            own = set(_ancestors(self.name)) | {"", self.name}
            for anc in _ancestors(target):
                if anc in self.modules and anc not in own:
                    self.found.append(Import(self.name, anc, node.lineno, self.depth > 0, False, implied=True))
            if explicit and target != self.name:
                self.found.append(Import(self.name, target, node.lineno, self.depth > 0, False, names=names))
        else:  # a module of the pack's packages that does not exist
            raise ValueError(f"{self.modules[self.name]}:{node.lineno}: '{target}' is no module of the pack")

    @staticmethod
    def _pack_absolute(dotted: str) -> bool:
        """An absolute import the pack resolves itself: ``dreamcache...`` (an absolute ``nodes`` is ComfyUI's)."""
        top = dotted.split(".")[0]
        return top in PACKAGES and top != "nodes"

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node) if self._pack_absolute(alias.name) else self._external(alias.name, node)

    def _external(self, dotted: str, node):
        self.found.append(Import(self.name, dotted.split(".")[0], node.lineno, self.depth > 0, True))

    def visit_ImportFrom(self, node):
        if node.level == 0:
            if not self._pack_absolute(node.module or ""):
                self._external(node.module or "", node)
                return
            base = node.module
        else:
            pkg = self.name if _is_package(self.name, self.modules) else self.name.rpartition(".")[0]
            parts = pkg.split(".") if pkg else []
            up = node.level - 1
            if up > len(parts):
                raise ValueError(f"{self.modules[self.name]}:{node.lineno}: relative import beyond the pack root")
            parts = parts[:len(parts) - up] if up else parts
            base = ".".join(parts + ([node.module] if node.module else []))
        subs = [f"{base}.{a.name}" if base else a.name for a in node.names]
        hit = [s for s in subs if s in self.modules]
        for s in hit:
            self._add(s, node)
        if len(hit) < len(subs) and base != "":
            # names that are not submodules are attributes of `base` itself
            self._add(base, node, names=tuple(a.name for a, s in zip(node.names, subs) if s not in self.modules))


def imports(root: str | Path) -> list[Import]:
    """Every import statement of every pack module under ``root``."""
    modules = pack_modules(root)
    out: list[Import] = []
    for name, path in modules.items():
        c = _Collector(name, modules)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out.extend(c.found)
    return out


def layer_violations(found: list[Import]) -> list[str]:
    problems = []
    for imp in (i for i in found if not i.implied):
        for layer, forbidden, comfy_ok in RULES:
            if not _within(imp.source, layer):
                continue
            how = "lazily " if imp.lazy else ""
            if not imp.external and any(_within(imp.target, f) for f in forbidden):
                problems.append(f"{_show(imp.source)}:{imp.line} {how}imports {imp.target}, which {layer} must not "
                                "import")
            elif imp.external and not comfy_ok and imp.target in COMFYUI_MODULES:
                problems.append(f"{_show(imp.source)}:{imp.line} {how}imports ComfyUI's '{imp.target}', which {layer} "
                                "must not import")
    return problems


def _room(module: str) -> str | None:
    """The application folder of a module inside ``dreamcache.apps`` (``"train"``), ``""`` for a shared module
    directly in ``apps/`` (or the package itself), None outside ``apps``."""
    if not _within(module, APPS):
        return None
    rest = module[len(APPS) + 1:].split(".")
    return rest[0] if rest[0] in APPS_ROOMS else ""


def room_violations(found: list[Import]) -> list[str]:
    """Imports between the applications' folders that go the wrong way (see :data:`APPS_ROOMS`)."""
    problems = []
    for imp in (i for i in found if not i.implied and not i.external):
        src, dst = _room(imp.source), _room(imp.target)
        if src is None or dst is None or dst == "" or dst == src:
            continue
        allowed = APPS_ROOMS.get(src, ())
        if dst not in allowed:
            who = f"the shared module {imp.source}" if src == "" else f"apps/{src}"
            how = "lazily " if imp.lazy else ""
            may = ", ".join("apps/" + r for r in allowed) or "shared modules"
            problems.append(f"{_show(imp.source)}:{imp.line} {how}imports {imp.target}: {who} must not import "
                            f"apps/{dst} (it may import {may})")
    return problems


def _folder(module: str, packages: set[str]) -> str:
    """The folder a module lives in (a package is its own folder)."""
    return module if module in packages else module.rpartition(".")[0]


def private_name_violations(found: list[Import], packages: set[str]) -> list[str]:
    """``from <module in another folder> import _name``: a private name is its folder's own business."""
    problems = []
    for imp in (i for i in found if not i.external and i.names):
        src_folder, dst_folder = _folder(imp.source, packages), _folder(imp.target, packages)
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__") and src_folder != dst_folder:
                problems.append(f"{_show(imp.source)}:{imp.line} imports the private name {name} from {imp.target}, "
                                "another folder; make it public in its right home")
    return problems


def cycles(found: list[Import]) -> list[list[str]]:
    """The import cycles between pack modules: one cycle (a list of modules, first == last) per strongly connected
    component that has one."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if not imp.external:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strong(v):  # Tarjan; the pack is small, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_through(min(comp), graph, comp) for comp in comps]


def _cycle_through(start: str, graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """The shortest way from ``start`` back to itself inside its component (breadth first)."""
    prev: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component always has a cycle")


def check(root: str | Path) -> list[str]:
    """Every layering violation and every import cycle of the pack under ``root`` (empty when it is clean)."""
    found = imports(root)
    packages = {n for n, f in pack_modules(root).items() if f.name == "__init__.py"}
    problems = layer_violations(found) + room_violations(found) + private_name_violations(found, packages)
    for cyc in cycles(found):
        problems.append("import cycle: " + " -> ".join(_show(m) for m in cyc))
    return problems
