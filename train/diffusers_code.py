"""Self-contained diffusers code files, generated from this repository's source.

`python -m train.export --format diffusers` writes `pipeline_ecdit.py` (the pipeline) and
`transformer/modeling_ecdit.py` (the transformer) into the folder, so that stock diffusers loads it with
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. Each file is generated here from the
classes of train/diffusers_pipeline.py: the top-level definitions they need (classes, functions, constants),
followed through the project's imports into model/ and train/, are copied in dependency order (modules that
others import first, source order within a module), the project imports dropped, the external imports
(torch, diffusers, numpy, PIL, stdlib) kept. Methods named in `drop` (the in-repository loaders) are left
out. Names in annotations are not followed into the project (`from __future__ import annotations` keeps
them strings); their external imports are kept, so that `typing.get_type_hints` resolves what it can.

Every way this could go wrong fails here, at export, with a CodegenError naming the cause: a name defined
by two inlined modules, an aliased or module-level project import, a project import inside an inlined
function, a top-level statement that is not a definition, a module dependency cycle, and, checked on the
generated text, a global name that nothing defines or an import of the project (or a relative one).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import symtable
from dataclasses import dataclass, field
from pathlib import Path

# The repository's top-level packages: generated files may import none of them.
PROJECT = ("model", "train", "data", "parallel", "bench", "launch")


class CodegenError(RuntimeError):
    """The generated code would not be self-contained or would not mean what the source means."""


@dataclass
class _Stmt:
    module: str
    index: int
    node: ast.stmt
    defines: set[str]
    refs: set[str]
    ann: set[str]  # names read in annotations only
    lines: tuple[int, int]  # first and last source line (1-based, decorators included)
    cut: list[tuple[int, int]] = field(default_factory=list)  # line ranges of dropped methods


@dataclass
class _Module:
    name: str
    path: Path
    source: str
    stmts: list[_Stmt]
    project: dict[str, tuple[str, str]]  # local name -> (project module, its name)
    external: dict[str, str]  # local name -> import line


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute module of a `from ... import` in `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[:-node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _span(node: ast.stmt) -> tuple[int, int]:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno


def _refs(node: ast.AST) -> tuple[set[str], set[str]]:
    """(names read in `node` outside annotations, names read in its annotations)."""
    out: set[str] = set()
    ann: set[str] = set()

    def annotation(a: ast.AST | None) -> None:
        if a is not None:
            ann.update(n.id for n in ast.walk(a) if isinstance(n, ast.Name))

    def visit(n: ast.AST) -> None:
        if isinstance(n, ast.Name):
            out.add(n.id)
            return
        if isinstance(n, ast.arg):
            annotation(n.annotation)  # a string at run time
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotation(n.returns)
            a = n.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                annotation(getattr(arg, "annotation", None))
            for d in n.decorator_list:
                visit(d)
            for d in n.args.defaults + [d for d in n.args.kw_defaults if d is not None]:
                visit(d)
            for s in n.body:
                visit(s)
            return
        if isinstance(n, ast.AnnAssign):
            annotation(n.annotation)
            visit(n.target)
            if n.value is not None:
                visit(n.value)
            return
        for c in ast.iter_child_nodes(n):
            visit(c)

    visit(node)
    return out, ann - out


def _defines(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    out = set()
    for t in targets:
        if not all(isinstance(e, ast.Name) for e in (t.elts if isinstance(t, ast.Tuple) else [t])):
            raise CodegenError(f"line {node.lineno}: assignment to {ast.unparse(t)} is not a plain name")
        out |= {e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t])}
    return out


def _import_line(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> str:
    name = alias.name + (f" as {alias.asname}" if alias.asname else "")
    return f"import {name}" if isinstance(node, ast.Import) else f"from {node.module} import {name}"


def _parse(module: str, drop: set[str]) -> _Module:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise CodegenError(f"module {module} not found")
    path = Path(spec.origin)
    source = path.read_text()
    tree = ast.parse(source)
    mod = _Module(module, path, source, [], {}, {})
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for alias in node.names:
                if isinstance(node, ast.Import):
                    if _is_project(alias.name):
                        raise CodegenError(f"{path}:{node.lineno}: `import {alias.name}`: import names from the "
                                           f"project's modules instead")
                    mod.external[alias.asname or alias.name.split(".")[0]] = _import_line(node, alias)
                    continue
                src = _resolve(module, node)
                if _is_project(src):
                    if alias.asname and alias.asname != alias.name:
                        raise CodegenError(f"{path}:{node.lineno}: `{alias.name} as {alias.asname}`: an aliased "
                                           f"project import cannot be inlined")
                    mod.project[alias.name] = (src, alias.name)
                else:
                    mod.external[alias.asname or alias.name] = _import_line(node, alias)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            raise CodegenError(f"{path}:{node.lineno}: top-level `{type(node).__name__}` statement: only imports, "
                               f"definitions and assignments can be inlined")
        cut = []
        if isinstance(node, ast.ClassDef):
            for m in list(node.body):
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{node.name}.{m.name}" in drop:
                    node.body.remove(m)
                    cut.append(_span(m))
                    drop.discard(f"{node.name}.{m.name}")
        mod.stmts.append(_Stmt(module, i, node, _defines(node), *_refs(node), _span(node), cut))
    return mod


def _nested_project_imports(stmt: _Stmt) -> list[str]:
    out = []
    for n in ast.walk(stmt.node):
        if isinstance(n, ast.ImportFrom) and (n.level or _is_project(n.module or "")):
            out.append(f"from {'.' * n.level}{n.module or ''} import ...")
        elif isinstance(n, ast.Import) and any(_is_project(a.name) for a in n.names):
            out.append(f"import {n.names[0].name}")
    return out


def generate(roots: list[tuple[str, str]], drop: set[str] = frozenset(), doc: str = "") -> str:
    """Source of one self-contained module defining `roots` ((module, name) pairs) and what they need;
    `drop`: "Class.method" names left out (each must exist)."""
    drop = set(drop)
    modules: dict[str, _Module] = {}

    def get(m: str) -> _Module:
        if m not in modules:
            modules[m] = _parse(m, drop)
        return modules[m]

    for m, _ in roots:
        get(m)
    if drop:
        raise CodegenError(f"methods to leave out not found: {sorted(drop)}")
    included: dict[tuple[str, int], _Stmt] = {}
    externals: dict[str, str] = {}
    deps: dict[str, set[str]] = {}
    todo = list(roots)
    seen: set[tuple[str, str]] = set()
    while todo:
        m, name = todo.pop()
        if (m, name) in seen:
            continue
        seen.add((m, name))
        mod = get(m)
        deps.setdefault(m, set())
        if name in mod.project:
            src, orig = mod.project[name]
            deps[m].add(src)
            todo.append((src, orig))
            continue
        if name in mod.external:
            externals.setdefault(name, mod.external[name])
            if externals[name] != mod.external[name]:
                raise CodegenError(f"`{name}` is imported as `{externals[name]}` and as `{mod.external[name]}`")
            continue
        stmts = [s for s in mod.stmts if name in s.defines]
        if not stmts:
            if (m, name) in roots:
                raise CodegenError(f"{m} defines no {name}")
            continue  # a local name or a builtin
        for s in stmts:
            if (m, s.index) in included:
                continue
            bad = _nested_project_imports(s)
            if bad:
                raise CodegenError(f"{mod.path}:{s.node.lineno}: {'/'.join(sorted(s.defines))} imports the project "
                                   f"inside its body ({bad[0]}); import at the top of the module")
            included[(m, s.index)] = s
            todo.extend((m, r) for r in sorted(s.refs))
            todo.extend((m, r) for r in sorted(s.ann) if r in mod.external)

    owner: dict[str, str] = {}
    for s in included.values():
        for n in s.defines:
            if owner.setdefault(n, s.module) != s.module:
                a, b = sorted((owner[n], s.module))
                raise CodegenError(f"`{n}` is defined in both {a} and {b}: rename one to inline them")
    for n in externals:
        if n in owner:
            raise CodegenError(f"`{n}` is both imported ({externals[n]}) and defined in {owner[n]}")

    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, path: tuple[str, ...]) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise CodegenError(f"module import cycle: {' -> '.join(path + (m,))}")
        state[m] = 1
        for d in sorted(deps.get(m, ())):
            visit(d, path + (m,))
        state[m] = 2
        order.append(m)

    for m in sorted(deps):
        visit(m, ())

    plain = sorted({i for i in externals.values() if i.startswith("import ")})
    froms: dict[str, list[str]] = {}
    for i in sorted({i for i in externals.values() if i.startswith("from ")}):
        mod_name, name = i[len("from "):].split(" import ")
        froms.setdefault(mod_name, []).append(name)
    imports = plain + [f"from {m} import {', '.join(names)}" for m, names in sorted(froms.items())]
    parts = [f'"""{doc}"""' if doc else "", "from __future__ import annotations", "", *imports]
    for m in order:
        stmts = sorted((s for s in included.values() if s.module == m), key=lambda s: s.index)
        if not stmts:
            continue
        lines = modules[m].source.splitlines()
        parts += ["", "", f"# ---- {m} " + "-" * max(0, 100 - len(m) - 8)]
        for s in stmts:
            a, b = s.lines
            keep = [ln for k, ln in enumerate(lines[a - 1:b], start=a) if not any(x <= k <= y for x, y in s.cut)]
            parts += ["", "", *keep]
    code = "\n".join(parts).lstrip("\n") + "\n"
    check_self_contained(code)
    return code


def check_self_contained(code: str, name: str = "<generated>") -> None:
    """Refuse code that imports the project (or relatively) or reads a global name nothing defines."""
    tree = ast.parse(code)
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level or _is_project(n.module or "")):
            raise CodegenError(f"{name}:{n.lineno}: imports {'.' * n.level}{n.module or ''}")
        if isinstance(n, ast.Import) and any(_is_project(a.name) for a in n.names):
            raise CodegenError(f"{name}:{n.lineno}: imports {n.names[0].name}")
    top = symtable.symtable(code, name, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = defined | set(dir(builtins)) | {"__file__", "__name__", "__doc__"}
    missing: set[str] = set()

    def walk(t: symtable.SymbolTable) -> None:
        for s in t.get_symbols():
            if s.is_referenced() and (t is top or s.is_global()) and s.get_name() not in known:
                missing.add(s.get_name())
        for c in t.get_children():
            walk(c)

    walk(top)
    if missing:
        raise CodegenError(f"{name}: no definition of {', '.join(sorted(missing))} (a dependency was not inlined)")
    compile(code, name, "exec")
