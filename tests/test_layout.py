"""The layout, drawn from the imports: algorithm on top of each folder, infrastructure one room down.

A *room* is a package folder (trainers/, trainers/infra/, eval/engine/, ...). Every
`import twophase.…` in the code, top-level or inside a function, is an edge from its
room to the imported module's room. The rooms' graph has no cycle, and no
infrastructure room imports from the folder above it (upward).
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("data", "losses", "trainers", "eval", "launch")
INFRASTRUCTURE_ROOMS = ("data/base", "trainers/infra", "eval/engine", "eval/sandbox", "launch/bench")


def modules() -> dict[str, Path]:
    """twophase module name -> file, for every module of the five folders."""
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("twophase",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            found[name] = path
    return found


def room_of(path: Path) -> str:
    return path.parent.relative_to(ROOT).as_posix()


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The twophase modules `path` imports (a `from package import module` names the module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


def room_edges() -> dict[tuple[str, str], list[str]]:
    """(from room, to room) -> the imports that make the edge."""
    known = modules()
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in known.items():
        for target in imported(path, known):
            a, b = room_of(path), room_of(known[target])
            if a != b:
                edges.setdefault((a, b), []).append(f"{name} -> {target}")
    return edges


def test_no_room_imports_upward():
    upward = {edge: why for edge, why in room_edges().items()
              if edge[0] in INFRASTRUCTURE_ROOMS and edge[0].startswith(edge[1] + "/")}  # fmt: skip
    assert not upward, f"infrastructure importing the folder above it: {upward}"


def test_the_rooms_have_no_cycle():
    edges = room_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    done, on_path = set(), []

    def visit(room):
        if room in on_path:
            cycle = on_path[on_path.index(room):] + [room]
            raise AssertionError("import cycle: " + " -> ".join(cycle) + "; "
                                 + "; ".join(w for x, y in zip(cycle, cycle[1:]) for w in edges[(x, y)][:2]))  # fmt: skip
        if room in done:
            return
        on_path.append(room)
        for nxt in sorted(graph.get(room, ())):
            visit(nxt)
        on_path.pop()
        done.add(room)

    for room in sorted(graph):
        visit(room)


def test_every_package_is_installed_under_the_namespace():
    """setup.cfg lists every package folder as twophase.<folder>, so none is left out of a wheel."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    folders = {"twophase." + room_of(path).replace("/", ".") for path in modules().values() if path.name == "__init__.py"}
    assert listed == folders
