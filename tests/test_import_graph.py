"""The project's import graph stays one-way (STYLE.md, habit 9).

Builds the graph of every non-test module with `ast` (imports under `TYPE_CHECKING`
and inside functions count too: a cycle closed by a type annotation still hides the
order of the layers) and fails on any cycle, on an import of the scheduler service
from outside it, and on mixins in the engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "services", "kvtransport", "gateway", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            files[_module_name(path)] = path
    return files


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules that `name` imports (a `from pkg import sub` counts as pkg.sub)."""
    found: set[str] = set()

    def add(target: str) -> None:
        # The deepest project module that `target` names (a.b.Class -> a.b).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def _graph() -> dict[str, set[str]]:
    files = _source_files()
    modules = set(files)
    return {name: _imports(name, path, modules) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_checker_finds_a_cycle_and_a_package_edge() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    files = _source_files()
    modules = set(files)
    # A package's __init__ re-exporting its submodules is an edge to each of them.
    assert "services.worker.engine.engine" in _imports(
        "services.worker.engine", files["services.worker.engine"], modules
    )


def test_no_import_cycles() -> None:
    graph = _graph()
    # A package imports its own submodules to re-export them; that edge is not a layer.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not _is_within(t, name)}
    assert _cycles(graph) == []


def test_only_the_scheduler_imports_the_scheduler() -> None:
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if _is_within(target, "services.scheduler") and not _is_within(name, "services.scheduler")
    )
    assert offenders == []


def test_no_mixins_in_the_engine() -> None:
    engine = REPO_ROOT / "services" / "worker" / "engine"
    mixins = []
    for path in sorted(engine.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (
                node.name.endswith("Mixin")
                or any(isinstance(b, ast.Name) and b.id.endswith("Mixin") for b in node.bases)
            ):
                mixins.append(f"{path.relative_to(REPO_ROOT)}:{node.name}")
    assert mixins == []


def _engine_doc_rows() -> list[list[str]]:
    """The modules of each row of docs/engine.md's file table, top to bottom."""
    lines = (REPO_ROOT / "docs" / "engine.md").read_text().splitlines()
    start = lines.index("| file | job |") + 2  # below the header and its rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        names = line.split("|")[1].split("`")[1::2]
        rows.append(
            [f"services.worker.engine.{n.removesuffix('/').removesuffix('.py')}" for n in names]
        )
    return rows


def test_the_engine_modules_import_down_the_order_of_their_doc_table() -> None:
    """docs/engine.md says no engine module imports one listed below it: keep it true."""
    rows = _engine_doc_rows()
    row_of = {module: index for index, row in enumerate(rows) for module in row}
    engine = "services.worker.engine"
    graph = _graph()
    modules = {m for m in graph if m.startswith(engine + ".")}
    # Every engine module is in the table (a package's modules count as the package).
    missing = sorted(
        m for m in modules if m not in row_of and not any(_is_within(m, r) for r in row_of)
    )
    assert missing == []
    upward = sorted(
        f"{name} -> {target}"
        for name in modules
        for target in graph[name]
        if target in row_of and name in row_of and row_of[target] > row_of[name]
    )
    assert upward == []
