"""The folder tree is the architecture: model/ is pure torch (no Ray, nothing above it), actors/ the Ray workers
(never the pipeline that drives them), the world a self-contained data source and oracle (no model, actor or
stage), evaluation/ the pure math the stages and the report share (no Ray, vLLM or stage), data/ the schemas and
the run store under everything in pipeline/, the stages below the driver, and no module in a circle of imports.
Checked on the source's import statements (function-local ones too; `if TYPE_CHECKING:` blocks aside), so nothing
is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "actors", "pipeline", "bench", "scripts")
# The driver (pipeline/driver/: what runs the rounds) and what prints and writes their results (pipeline/output/, but
# its progress bars, which the stages draw); no stage or lower module imports them.
DRIVER = ("pipeline.driver", "pipeline.output.console", "pipeline.output.report", "pipeline.output.summary",
          "pipeline.output.profile")
FORBIDDEN = {"model": ("actors", "pipeline", "ray", "vllm"), "actors": ("pipeline",),
             "pipeline/world": ("actors", "model", "pipeline.stages", "ray", "vllm", "torch", *DRIVER),
             "pipeline/evaluation": ("actors", "ray", "vllm", "pipeline.stages", *DRIVER),
             "pipeline/data": ("pipeline.stages", "pipeline.world", "pipeline.evaluation", "pipeline.state", *DRIVER),
             "pipeline/stages": DRIVER,
             "pipeline/state.py": ("pipeline.stages", *DRIVER)}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (`from a import b` counts as a.b where that is a module of ours, else a)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            ours = {name for name in submodules if module_path(name) is not None}
            names |= ours if ours == submodules else ours | {node.module}
    return names


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def sources(package: str) -> list[Path]:
    path = ROOT / package
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(package):
    offences = [f"{path.relative_to(ROOT)} imports {name}"
                for path in sources(package) for name in sorted(imported_modules(path))
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not offences, "\n".join(offences)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_through_others():
    graph = {module_name(path): set() for package in PACKAGES for path in sources(package)}
    for package in PACKAGES:
        for path in sources(package):
            graph[module_name(path)] = {name for name in imported_modules(path) if name in graph} - {module_name(path)}
    circles = [circle for circle in strongly_connected(graph) if len(circle) > 1]
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in circles)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(component)
    return out
