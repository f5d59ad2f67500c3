"""Code fingerprints at definition level: the functions, classes and constants a stage's `run` reaches.

A stage's key must change when, and only when, code that can change its output changes. So the
fingerprint starts from the stage's `run` and resolves, on the syntax tree, every name it uses
inside molt's own modules: a function, class or constant of the same module, or one imported
from another `stages` module. Each definition reached is hashed (normalised syntax tree,
docstrings dropped) and followed in turn. Wherever a use cannot be resolved statically (a molt
module used as a value, `globals()`, a star import, an `import stages.x` inside a function) the
whole module is taken, with everything it imports: a dependency is never missed, at worst a
key changes for nothing. Names from other libraries are left to the library versions a stage
declares. Annotations of function arguments and returns are not followed (with postponed
evaluation they never run); class bodies are hashed whole, annotations included (pydantic and
dataclasses read them).

Statements at module level that define no name of their own (an `if`, a call) run whenever the
module is imported, so they count for every definition of the module (`<module>`); one that
mutates a name (`TABLE["x"] = ...`, `TABLE.update(...)`) and a definition registered through a
local decorator count as part of the name mutated.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import xxhash

from stages.store import write_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
MODULE_LEVEL = "<module>"
WHOLE = None  # a reference to a whole module


def module_path(module: str) -> Path:
    parts = module.split(".")
    if parts[0] == "stages":
        base = PACKAGE_DIR.joinpath(*parts[1:])
        return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    spec = importlib.util.find_spec(module)  # a stage defined outside the package (a test's)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module)
    return Path(spec.origin)


def shown_path(module: str) -> str:
    path = module_path(module)
    try:
        return path.relative_to(REPO_DIR).as_posix()
    except ValueError:
        return path.name


def _hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode())


def _nested_statements(nodes: list) -> list:
    """Every statement in `nodes`, nested ones too (in bodies, branches, handlers, cases): where
    definitions, docstrings and imports can be, without walking every expression."""
    out = []
    for node in nodes:
        out.append(node)
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                out += _nested_statements(children)
    return out


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in [tree, *_nested_statements(tree.body)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _dump(nodes) -> str:
    return "\n".join(ast.dump(n, annotate_fields=False, include_attributes=False) for n in nodes)


def _ours(module: str, root: str) -> bool:
    """molt's own code, or the package of a stage defined outside it (`root`)."""
    return module.split(".")[0] in ("stages", root)


def _is_module(name: str) -> bool:
    try:
        return module_path(name).exists()
    except (ModuleNotFoundError, ValueError):
        return False


@dataclass
class ModuleInfo:
    name: str
    tree: ast.Module  # normalised (docstrings dropped)
    defs: dict[str, list[ast.stmt]] = field(default_factory=dict)  # name -> statements defining or mutating it
    module_level: list[ast.stmt] = field(default_factory=list)  # statements that only run
    bindings: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local name -> (module, attribute or WHOLE)
    imports: set[str] = field(default_factory=set)  # every molt module it imports, anywhere

    @cached_property
    def whole(self) -> str:  # hash of the whole module; lazily, since dumping a tree costs more than parsing it
        return _hash(_dump([self.tree]))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


def _import_bindings(module: str, is_package: bool, node: ast.stmt, root: str) -> dict[str, tuple[str, str | None]]:
    out = {}
    if isinstance(node, ast.Import):
        for a in node.names:
            if _ours(a.name, root):
                # `import stages.x` binds `stages`; `import stages.x as y` binds y to the module
                out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], WHOLE)
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node)
        if _ours(base, root):
            for a in node.names:
                candidate = f"{base}.{a.name}"
                if a.name == "*":
                    out["*"] = (base, WHOLE)
                elif _is_module(candidate):  # `from stages import store` names a module
                    out[a.asname or a.name] = (candidate, WHOLE)
                else:
                    out[a.asname or a.name] = (base, a.name)
    return out


def _stored_base(target: ast.expr) -> str | None:
    """The module-level name a statement mutates: `X[...] = `, `X.a = `, `X.update(...)`."""
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Call)):
        target = target.func if isinstance(target, ast.Call) else target.value
    return target.id if isinstance(target, ast.Name) else None


@lru_cache(maxsize=None)
def analyse(module: str, root: str = "stages") -> ModuleInfo:
    path = module_path(module)
    tree = _strip_docstrings(ast.parse(path.read_text(), filename=str(path)))
    is_package = path.name == "__init__.py"
    info = ModuleInfo(module, tree)
    for node in _nested_statements(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            info.imports.update(target for target, _ in _import_bindings(module, is_package, node, root).values())
    info.imports.discard("stages")

    def define(name: str, stmt: ast.stmt) -> None:
        if stmt not in info.defs.setdefault(name, []):
            info.defs[name].append(stmt)

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            info.bindings.update(_import_bindings(module, is_package, node, root))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            define(node.name, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names = set()
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, (ast.Tuple, ast.List)):
                    names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                elif (base := _stored_base(target)) is not None:
                    names.add(base)
            for name in names:
                define(name, node)
            if not names:
                info.module_level.append(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) and (base := _stored_base(node.value.func)):
            define(base, node)  # TABLE.update(...)
        else:
            # `if` / `try` / `with` blocks run on import: they count for the whole module, and
            # the names bound inside them (a guarded import, a fallback definition) are theirs
            info.module_level.append(node)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    info.bindings.update(_import_bindings(module, is_package, sub, root))
                elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    define(sub.name, node)
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    define(sub.id, node)

    # a definition registered by a local decorator counts as part of the tables it fills in
    registries = {name for name, stmts in info.defs.items() if not any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for s in stmts)}
    for stmts in list(info.defs.values()):
        for stmt in list(stmts):
            for deco in getattr(stmt, "decorator_list", ()):
                target = deco.func if isinstance(deco, ast.Call) else deco
                for d in info.defs.get(target.id if isinstance(target, ast.Name) else "", ()):
                    for used in {n.id for n in ast.walk(d) if isinstance(n, ast.Name)} & registries:
                        define(used, stmt)
    return info


class _Uses(ast.NodeVisitor):
    """The names a definition uses, and the molt modules it uses as values (whole-module fallback)."""

    def __init__(self, info: ModuleInfo, root: str):
        self.info, self.root = info, root
        self.names: set[str] = set()
        self.refs: set[tuple[str, str | None]] = set()  # (module, attribute or WHOLE)
        self._in_class = False  # class bodies keep their annotations (pydantic, dataclasses read them)

    def visit_Name(self, node: ast.Name):
        if node.id in ("globals", "vars", "locals", "__import__"):
            self.refs.add((self.info.name, WHOLE))
        self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute):
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and self.info.bindings.get(base.id, ("", "x"))[1] is WHOLE:
            module = self.info.bindings[base.id][0]
            for attr in reversed(chain):  # stages.formats.rows.Formatter: walk down the packages
                if _is_module(f"{module}.{attr}"):
                    module = f"{module}.{attr}"
                else:
                    self.refs.add((module, attr))
                    return
            self.refs.add((module, WHOLE))
            return
        self.generic_visit(node)

    def _arguments(self, args: ast.arguments):
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(default)

    def visit_FunctionDef(self, node):
        for d in node.decorator_list:
            self.visit(d)
        self._arguments(node.args)  # annotations and `returns` are never evaluated at run time
        for stmt in node.body:
            self.visit(stmt)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda):
        self._arguments(node.args)
        self.visit(node.body)

    def visit_AnnAssign(self, node: ast.AnnAssign):
        if self._in_class:
            self.generic_visit(node)
        else:
            self.visit(node.target)
            if node.value is not None:
                self.visit(node.value)

    def visit_ClassDef(self, node: ast.ClassDef):
        outer, self._in_class = self._in_class, True
        self.generic_visit(node)
        self._in_class = outer

    def visit_Import(self, node: ast.Import):
        self.refs.update((a.name, WHOLE) for a in node.names if _ours(a.name, self.root))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        is_package = module_path(self.info.name).name == "__init__.py"
        for target, attr in _import_bindings(self.info.name, is_package, node, self.root).values():
            self.refs.add((target, attr))

    def visit_Call(self, node: ast.Call):
        # importlib.import_module("stages.x"): a constant name is resolved; others are left to the
        # stage's code_modules hook (the prompt strategy format loads)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            if _ours(node.args[0].value, self.root):
                self.refs.add((node.args[0].value, WHOLE))
        self.generic_visit(node)


def _statements(info: ModuleInfo, name: str) -> list[ast.stmt]:
    return info.module_level if name == MODULE_LEVEL else info.defs[name]


@lru_cache(maxsize=None)
def _uses(module: str, name: str, root: str) -> tuple[frozenset, frozenset]:
    info = analyse(module, root)
    visitor = _Uses(info, root)
    for stmt in _statements(info, name):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        visitor.visit(stmt)
    return frozenset(visitor.names), frozenset(visitor.refs)


def fingerprint(roots: list[tuple[str, str | None]], root: str = "stages") -> dict[str, str]:
    """{"stages/x.py:name": hash, "stages/y.py": hash (a whole module)} for what `roots` reach;
    a root is (module, definition name) or (module, None) for a whole module."""
    whole: set[str] = set()
    reached: set[tuple[str, str]] = set()
    todo = list(roots)
    while todo:
        module, name = todo.pop()
        if not _ours(module, root) or module in whole or (module, name) in reached:
            continue
        info = analyse(module, root)
        if name is WHOLE:
            whole.add(module)
            todo.extend((m, WHOLE) for m in info.imports)
            continue
        if name != MODULE_LEVEL and name not in info.defs:
            if name in info.bindings:  # imported into this module: resolve where it is defined
                todo.append(info.bindings[name])
            elif "*" in info.bindings:  # maybe from the star import: take its module whole
                todo.append(info.bindings["*"])
            continue
        reached.add((module, name))
        names, refs = _uses(module, name, root)
        todo.extend(refs)
        todo.extend((module, used) for used in names if used in info.defs or used in info.bindings or "*" in info.bindings)
        # what a module runs on import counts for all it defines, and so does what the molt
        # modules it imports run on import
        todo.extend((m, MODULE_LEVEL) for m in [module, *sorted(info.imports)] if analyse(m, root).module_level)
    out = {shown_path(m): analyse(m, root).whole for m in whole}
    for module, name in reached:
        if module not in whole:
            out[f"{shown_path(module)}:{name}"] = _hash(_dump(_statements(analyse(module, root), name)))
    return dict(sorted(out.items()))


def modules_of(prints: dict[str, str]) -> list[str]:
    """The files a fingerprint reads (for DVC, which sees files, not definitions)."""
    return sorted({entry.partition(":")[0] for entry in prints})


@lru_cache(maxsize=None)
def package_digest() -> str:
    """A hash of every Python file of the package, names and bytes: what fingerprints of its
    own code, and the Params its stages declare, are functions of."""
    digest = xxhash.xxh3_128()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


_MEMOS: dict[Path, dict] = {}


def remembered(memo: Path | None, key: str, compute):
    """`compute()`, or the JSON value it gave a process that ran the same package source (kept in
    the file `memo`): parsing and walking the stages' code costs more than a small cold run."""
    if memo is None:
        return compute()
    entries = _MEMOS.get(memo)
    if entries is None:
        try:
            kept = json.loads(memo.read_text())
        except (OSError, ValueError):
            kept = {}
        entries = _MEMOS[memo] = kept.get("entries", {}) if kept.get("package") == package_digest() else {}
    if key not in entries:
        entries[key] = json.loads(json.dumps(compute()))  # as a later process will read it back
        try:  # readers see the old file or the new one; a store molt may not write just goes without
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(memo, json.dumps({"package": package_digest(), "entries": entries}, sort_keys=True))
        except OSError:
            pass
    return entries[key]


def clear_caches() -> None:
    """Forget parsed modules (a test that edits code in-process, as a new process would see it)."""
    analyse.cache_clear()
    _uses.cache_clear()
    package_digest.cache_clear()
    _MEMOS.clear()
