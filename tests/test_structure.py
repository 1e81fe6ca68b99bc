"""The structural limits zaya's code keeps (docs/architecture.md):

- no import cycle among zaya modules, counting the imports inside functions;
- at most MAX_LOCAL_IMPORTS zaya imports inside functions in all (each for an optional dependency
  or start-up time, never to dodge a cycle);
- no function over MAX_FUNCTION_LINES lines and no file over MAX_FILE_LINES lines in zaya/;
- imports point down the layers: the import-linter contract in pyproject.toml (``lint-imports``
  runs the same check from the shell).

The import graph is grimp's (the engine of import-linter), which reads every import statement,
those inside functions included; imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zaya"
MAX_LOCAL_IMPORTS = 20
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file(module: str) -> str:
    path = ROOT.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    assert Path(importlib.util.find_spec("zaya").origin).parent == PACKAGE, "zaya must be imported from this tree"
    return grimp.build_graph("zaya", exclude_type_checking_imports=True, cache_dir=None)


# -- import cycles ------------------------------------------------------------------------------------
def _cycles(graph: grimp.ImportGraph) -> list[tuple[set[str], tuple[str, ...]]]:
    """Each group of modules that import each other (directly or not), with a shortest cycle in it."""
    found, grouped = [], set()
    for module in sorted(graph.modules):
        if module in grouped:
            continue
        group = {module} | (graph.find_upstream_modules(module) & graph.find_downstream_modules(module))
        if len(group) == 1:
            continue
        grouped |= group
        back = [graph.find_shortest_chain(importer=m, imported=module)
                for m in sorted(graph.find_modules_directly_imported_by(module) & group)]
        found.append((group, (module, *min(back, key=len))))
    return found


def _describe_cycle(graph: grimp.ImportGraph, group: set[str], cycle: tuple[str, ...]) -> str:
    lines = [f"{len(group)} modules import each other ({', '.join(sorted(group))}); a shortest cycle: "
             + " -> ".join(cycle)]
    for importer, imported in zip(cycle, cycle[1:]):
        for d in graph.get_import_details(importer=importer, imported=imported):
            lines.append(f"    {_file(importer)}:{d['line_number']}: {d['line_contents']}")
    return "\n".join(lines)


def test_no_import_cycles(graph):
    if cycles := _cycles(graph):
        pytest.fail(f"{len(cycles)} import cycle(s) among zaya modules (imports inside functions count):\n"
                    + "\n".join(_describe_cycle(graph, g, c) for g, c in cycles), pytrace=False)


# -- imports inside functions -------------------------------------------------------------------------
@dataclass
class LocalImport:
    where: str  # path:line
    function: str
    statement: str
    modules: tuple[str, ...]  # the zaya modules it imports


def _imported_modules(node: ast.Import | ast.ImportFrom, package: str, known: set[str]) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(a.name for a in node.names if a.name.split(".")[0] == "zaya")
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    if base.split(".")[0] != "zaya":
        return ()
    # `from zaya import packed, quant` imports two modules; `from zaya.chat import a, b` imports one
    return tuple(sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}))


def _local_imports() -> list[LocalImport]:
    known = {_module(p) for p in _sources()}
    found = []
    for path in _sources():
        source = path.read_text()
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def visit(node, names: list[str], in_function: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, names + [child.name], in_function or not isinstance(child, ast.ClassDef))
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    modules = _imported_modules(child, package, known)
                    if in_function and modules:
                        found.append(LocalImport(f"{path.relative_to(ROOT)}:{child.lineno}", ".".join(names),
                                                 " ".join(ast.get_source_segment(source, child).split()), modules))
                else:
                    visit(child, names, in_function)

        visit(ast.parse(source), [], False)
    return found


def test_few_zaya_imports_inside_functions():
    found = _local_imports()
    count = sum(len(i.modules) for i in found)
    if count > MAX_LOCAL_IMPORTS:
        pytest.fail(f"{count} zaya imports inside functions (at most {MAX_LOCAL_IMPORTS}; import at the top of the "
                    f"module unless it is for an optional dependency or start-up time):\n"
                    + "\n".join(f"    {i.where} in {i.function}: {i.statement}"
                                + (f"  ({len(i.modules)} modules)" if len(i.modules) > 1 else "") for i in found),
                    pytrace=False)


# -- sizes --------------------------------------------------------------------------------------------
def _functions():
    """(path:line, qualified name, lines from `def` to the end of the body) for every function."""
    for path in _sources():
        def visit(node, names):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualname = names + [child.name]
                    if not isinstance(child, ast.ClassDef):
                        yield (f"{path.relative_to(ROOT)}:{child.lineno}", ".".join(qualname),
                               child.end_lineno - child.lineno + 1)
                    yield from visit(child, qualname)
                else:
                    yield from visit(child, names)

        yield from visit(ast.parse(path.read_text()), [])


def test_no_function_over_the_limit():
    if long := sorted((f for f in _functions() if f[2] > MAX_FUNCTION_LINES), key=lambda f: -f[2]):
        pytest.fail(f"{len(long)} function(s) over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
            f"    {where} {name}: {n} lines" for where, name, n in long), pytrace=False)


def test_no_file_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _sources()}
    if long := sorted(((n, p) for p, n in sizes.items() if n > MAX_FILE_LINES), reverse=True):
        pytest.fail(f"{len(long)} file(s) over {MAX_FILE_LINES} lines:\n" + "\n".join(
            f"    {p}: {n} lines" for n, p in long), pytrace=False)


# -- layers -------------------------------------------------------------------------------------------
def test_imports_follow_the_layers():
    """The layers contract of pyproject.toml ([tool.importlinter]), through import-linter itself."""
    from importlinter import cli
    from importlinter.application import output

    with output.console.capture() as report:
        code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    if code != 0:
        pytest.fail("imports that point up the layers (pyproject.toml [tool.importlinter]):\n" + report.get(),
                    pytrace=False)
