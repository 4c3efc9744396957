"""The code version of each CLI command, so that a science fix makes exactly the results it affects stale.

A rule records `code_hash(<its command>)` as a param; Snakemake re-runs a job whose params changed. The hash covers
the command's handler (`cmd_<command>`), the functions and constants of its CLI module that the handler reaches, the
module's `register` (option defaults), and every `metalign` module those import, transitively, found by reading the
source (no import, so the Snakefile stays torch-free and fast). Imports inside functions count too. The hash is of
file contents under repository-relative names: another interpreter, venv or checkout path gives the same hash, and
an edit to a module that a command never imports leaves its jobs alone. The hashes are kept in `CACHE` under a stamp of
every source file's size and mtime, so a no-op dry run reads no AST.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT_NAME = PACKAGE.name
CACHE = PACKAGE / "__pycache__" / "codehash.json"  # git-ignored, next to the sources it describes


def _module_file(module: str) -> Path | None:
    """Source file of a `metalign…` module name (package → its __init__.py); None if it is not a module."""
    parts = module.split(".")
    if parts[0] != ROOT_NAME:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _name_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


@lru_cache(maxsize=None)
def _source(path: Path) -> str:
    return path.read_text()


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(_source(path), filename=str(path))


@lru_cache(maxsize=None)
def _lines(path: Path) -> tuple[str, ...]:
    return tuple(_source(path).splitlines(keepends=True))


def _segment(path: Path, node: ast.AST) -> str:
    """The source lines of a top-level definition (ast.get_source_segment re-splits the file on every call)."""
    return "".join(_lines(path)[node.lineno - 1:node.end_lineno])


def _targets(node: ast.Import | ast.ImportFrom, here: str) -> dict[str, str]:
    """Local name → the metalign module it makes available (for `from m import f`: m; for a submodule: itself)."""
    bound: dict[str, str] = {}
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == ROOT_NAME:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name
        return bound
    if node.level:
        package = here.split(".")
        is_package = _module_file(here) is not None and _module_file(here).name == "__init__.py"
        package = package if is_package else package[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != ROOT_NAME:
        return bound
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        bound[alias.asname or alias.name] = submodule if _module_file(submodule) else base
    return bound


@lru_cache(maxsize=None)
def _imports(module: str) -> frozenset[str]:
    """Every metalign module that `module` imports anywhere in its source, with the parent packages of each."""
    found: set[str] = set()
    for node in ast.walk(_tree(_module_file(module))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_targets(node, module).values())
    return frozenset(_with_parents(found))


def _with_parents(modules: set[str]) -> set[str]:
    return {".".join(m.split(".")[:k]) for m in modules for k in range(1, len(m.split(".")) + 1)
            if _module_file(".".join(m.split(".")[:k]))}


def _closure(seeds: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(_with_parents(seeds))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return seen


def _handler_parts(cli_module: str, command: str) -> tuple[list[str], set[str]]:
    """Source of the handler, what it reaches in its module and `register`; the metalign modules those use."""
    path = _module_file(cli_module)
    tree = _tree(path)
    bindings: dict[str, str] = {}
    definitions: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bindings.update(_targets(node, cli_module))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    definitions[target.id] = node
    handler = f"cmd_{command.replace('-', '_')}"
    if handler not in definitions:
        raise KeyError(f"{path}: no handler {handler} for command {command!r}")
    reached, todo, modules = set(), [handler], set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in ast.walk(definitions[name]):
            if isinstance(node, ast.Name) and node.id in definitions:
                todo.append(node.id)
            elif isinstance(node, ast.Name) and node.id in bindings:
                modules.add(bindings[node.id])
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules.update(_targets(node, cli_module).values())
    parts = [_segment(path, definitions[name]) for name in sorted(reached | {"register"}) if name in definitions]
    return parts, modules


@lru_cache(maxsize=1)
def _stamp() -> str:
    """Name, size and mtime of every source file: while it is unchanged, the hashes stored last time still hold."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        status = path.stat()
        digest.update(f"{path.relative_to(PACKAGE).as_posix()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _stored() -> dict[str, str]:
    """Hashes computed by an earlier run on the same sources (reading every AST costs most of a no-op dry run)."""
    try:
        cached = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return dict(cached["hashes"]) if isinstance(cached, dict) and cached.get("stamp") == _stamp() else {}


def _store(hashes: dict[str, str]) -> None:
    """Atomic write; a read-only checkout just recomputes next time."""
    try:
        CACHE.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=CACHE.parent, prefix=".codehash.", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump({"stamp": _stamp(), "hashes": hashes}, handle)
        os.replace(tmp, CACHE)
    except OSError:
        pass


def code_hash(command: str) -> str:
    """sha256 (first 16 hex digits) of the code that `python -m metalign <command>` runs."""
    stored = _stored()
    if command not in stored:
        stored[command] = _compute(command)
        _store(stored)
    return stored[command]


def _compute(command: str) -> str:
    from metalign.cli import COMMANDS

    if command not in COMMANDS:
        raise KeyError(f"unknown metalign command {command!r}")
    parts, modules = _handler_parts(COMMANDS[command], command)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
    for module in sorted(_closure(modules) - {COMMANDS[command]}):
        digest.update(f"\0{module}\0".encode() + _source(_module_file(module)).encode())
    return digest.hexdigest()[:16]


def command_modules(command: str) -> list[str]:
    """The metalign modules whose edits make `command`'s results stale (besides its handler)."""
    from metalign.cli import COMMANDS

    return sorted(_closure(_handler_parts(COMMANDS[command], command)[1]) - {COMMANDS[command]})
