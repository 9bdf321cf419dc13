"""The house rules of imports (docs/design.md, "Floors"), checked on the source with ast:

* a module's floor is the floor of the folder it lives in, read from docs/design.md's floors table
  (the one list of floors); every folder holding a module is in it, and a subfolder stands above
  its package's top-level modules;
* no module imports one on a higher floor;
* no import circle between the project's own modules (top-level and function-level imports);
* imports of the project's own modules sit at the top of files; one inside a function says why on
  its line (a module that reading a spec, ``t2i --help`` or ``t2i status`` must not load, or a cycle);
* ``ray`` is imported only by the orchestration modules that schedule and execute on Ray;
* model and diffusion code (the pure core) never imports ray, deepspeed, torch.distributed,
  fsspec or boto.
"""
from __future__ import annotations

import ast
import os
import re
from functools import lru_cache
from pathlib import Path

from tests.support.specs import REPO

PACKAGES = ("pipeline", "stages", "data_prep", "cluster")
DESIGN = REPO / "docs" / "design.md"
PURE_CORE = ("stages", "stages/nets")  # docs/design.md, invariant 1
NOT_IN_PURE = ("ray", "deepspeed", "torch.distributed", "fsspec", "boto3", "botocore", "s3fs")


@lru_cache(maxsize=None)
def floors() -> dict[str, int]:
    """{"stages/training": 4, ...} from the ```floors block of docs/design.md."""
    block = re.search(r"```floors\n(.*?)```", DESIGN.read_text(encoding="utf-8"), re.S)
    assert block, "docs/design.md has no ```floors block"
    table = {}
    for line in block.group(1).splitlines()[1:]:
        number, folder = line.split()[:2]
        table[folder.rstrip("/")] = int(number)
    return table


def folder_of(mod: str, path: Path) -> str:
    return str(path.parent.relative_to(REPO))


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    found = {}
    for top in PACKAGES:
        for root, _, files in os.walk(REPO / top):
            for f in files:
                if f.endswith(".py"):
                    path = Path(root) / f
                    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
                    found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(mod: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def floor_of(mod: str) -> int:
    folder = folder_of(mod, modules()[mod])
    assert folder in floors(), f"{folder}/ (holding {mod}) has no floor: add it to docs/design.md's floors table"
    return floors()[folder]


def project_edges() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        for n in imports(mod, path):
            t = resolve(n)
            if t and t != mod and not (mod.startswith(t + ".") and mods[t].name == "__init__.py"):
                edges[mod].add(t)
    return edges


def test_every_module_has_a_floor_and_imports_only_downward():
    bad = []
    for mod, targets in project_edges().items():
        for t in targets:
            if floor_of(t) > floor_of(mod):
                bad.append(f"{mod} (floor {floor_of(mod)}) imports {t} (floor {floor_of(t)})")
    assert not bad, "\n".join(sorted(bad))


def test_floors_table_matches_the_tree():
    """Every folder with a module has a floor, every listed folder exists, subfolders stand higher."""
    folders = {folder_of(m, p) for m, p in modules().items()}
    assert not folders - set(floors()), f"folders without a floor: {sorted(folders - set(floors()))}"
    assert not set(floors()) - folders, f"floors table names missing folders: {sorted(set(floors()) - folders)}"
    for folder, floor in floors().items():
        parent = folder.rpartition("/")[0]
        if parent:
            assert floor > floors()[parent], f"{folder}/ (floor {floor}) must stand above {parent}/ ({floors()[parent]})"


def test_no_import_circles():
    edges = project_edges()
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not out, out


def test_function_level_project_imports_say_why():
    unexplained = []
    for mod, path in modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
                    own = node.level > 0 if isinstance(node, ast.ImportFrom) else False
                    if (own or name.split(".")[0] in PACKAGES) and "#" not in lines[node.lineno - 1]:
                        unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, ("move these imports to the top of the file, or say on the line why they must wait:\n"
                             + "\n".join(sorted(set(unexplained))))


def ray_allowed() -> tuple[str, ...]:
    """The modules docs/design.md names in its sentence "Ray is imported only by ..." (one home)."""
    sentence = re.search(r"Ray is imported only by (.*?)\.\n\n", DESIGN.read_text(encoding="utf-8"), re.S)
    assert sentence, "docs/design.md no longer says which modules import Ray"
    paths = re.findall(r"`([\w/]+)\.py`", sentence.group(1))
    assert paths, "docs/design.md's Ray sentence names no module"
    return tuple(p.replace("/", ".") for p in paths)


def test_ray_only_in_the_scheduler_and_executors():
    users = sorted(m for m, p in modules().items()
                   if any(n == "ray" or n.startswith("ray.") for n in imports(m, p)) and not m.startswith(ray_allowed()))
    assert not users, f"ray imported outside {ray_allowed()}: {users}"


def test_pure_core_imports_no_infrastructure():
    bad = [(m, n) for m, p in modules().items() if folder_of(m, p) in PURE_CORE
           for n in imports(m, p) if n.split(".")[0] in {x.split(".")[0] for x in NOT_IN_PURE}
           and any(n == x or n.startswith(x + ".") for x in NOT_IN_PURE)]
    assert not bad, bad


def test_no_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
