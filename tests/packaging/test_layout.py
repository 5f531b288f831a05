"""The layout holds: every module of the library folders has its line in docs/architecture.md, imports run one
way (nothing in model/, data/, parallel/ or train/ imports launch/ or bench/; no folder imports one above it),
and no two modules import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("model", "data", "parallel", "train", "launch")
FLOORS = {"model": 0, "data": 1, "parallel": 1, "train": 2, "launch": 3, "bench": 4}  # a folder uses lower ones


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> set[str]:
    """The project modules a file imports, as dotted names (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.update(f"{base}.{a.name}" for a in node.names)
            out.add(base)
    return {name for name in out if name.split(".")[0] in FLOORS}


def test_every_library_module_has_its_line_in_the_architecture_doc():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [p.relative_to(ROOT).as_posix() for folder in LIBRARY for p in _modules(folder)
               if f"`{p.relative_to(ROOT).as_posix()}`" not in doc]
    assert not missing, f"docs/architecture.md lacks a line for {missing}"


def test_imports_run_one_way():
    upward = []
    for folder in FLOORS:
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                if top != folder and FLOORS[top] >= FLOORS[folder]:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_no_two_modules_import_each_other():
    graph = {}
    for folder in FLOORS:
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            graph[name.removesuffix(".__init__")] = {n for n in _imports(path)}
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                     if b in graph and b != a and a in graph[b]})
    assert not mutual, mutual
