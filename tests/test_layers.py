"""Dependencies run one way: core <- training <- analysis (which reads corpora and models through
training's loaders), core <- server, and the `rudder` command (cli) above them all: no research
module carries the server, and the server carries no training or analysis.

Read from the source's import statements (those inside functions too), so a lazy import that
crosses a layer is caught as well as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "core", "training": "training", "analysis": "analysis", "server": "server", "cli": "cli"}
MAY_NOT_IMPORT = {
    "core": {"training", "analysis", "server", "cli"},
    "training": {"analysis", "server", "cli"},
    "analysis": {"server", "cli"},
    "server": {"training", "analysis", "cli"},
}


def rudder_imports(path: Path) -> set[str]:
    """The Rudder packages a module imports (`rudder.server...` -> "server")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "rudder" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_a_package_imports_no_layer_above_it(package):
    crossing = {f"{path.relative_to(ROOT)}: rudder.{bad}"
                for path in (ROOT / PACKAGES[package]).rglob("*.py")
                for bad in rudder_imports(path) & MAY_NOT_IMPORT[package]}
    assert not crossing, f"{package} must not import these (see tests/test_layers.py's docstring): {sorted(crossing)}"


def test_the_scan_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from rudder.server.app import BackgroundServer\n    import rudder.cli\n")
    assert rudder_imports(module) == {"server", "cli"}
