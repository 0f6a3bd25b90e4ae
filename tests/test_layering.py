"""The folder tree is the architecture: model/ is pure torch (no Ray, nothing above it), actors/ the Ray workers
(never the pipeline that drives them), the world a self-contained data source and oracle (no model, actor or
stage), evaluation/ the pure math the stages and the report share (no Ray or vLLM). Checked on the source's import
statements, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"model": ("actors", "pipeline", "ray", "vllm"), "actors": ("pipeline",),
             "pipeline/world": ("actors", "model", "pipeline.stages", "ray", "vllm", "torch"),
             "pipeline/evaluation": ("actors", "ray", "vllm")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(package):
    offences = [f"{path.relative_to(ROOT)} imports {name}"
                for path in sorted((ROOT / package).rglob("*.py")) for name in sorted(imported_modules(path))
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not offences, "\n".join(offences)
