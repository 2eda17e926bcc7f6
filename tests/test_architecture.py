"""The layering of the package: imports point down, never up, and form no cycle.

Every module under ``mpotn/`` is parsed with :mod:`ast` (imports inside
functions and ``TYPE_CHECKING`` blocks included) and mapped to its tier:

0. core -- the flat modules (``mpotn.shapes``, ``mpotn.mpo``, ...) and ``mpotn.data``;
1. ``mpotn.methods``; 2. ``mpotn.layers``; 3. ``mpotn.compression``;
4. ``mpotn.finetune``; 5. ``mpotn.analysis``; 6. ``mpotn.cli``.

The package root ``mpotn/__init__.py`` re-exports the public names from every
tier and is no tier itself (nothing inside the package may import it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpotn"

#: Subpackages above the core, lowest first.
TIERS = {"data": 0, "methods": 1, "layers": 2, "compression": 3, "finetune": 4,
         "analysis": 5, "cli": 6}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def tier(name: str) -> int | None:
    """The tier of a module: 0 for a flat core module, its subpackage's tier, ``None`` for the
    package root and for a subpackage the layout does not know."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    if len(parts) == 2 and not (PACKAGE / parts[1]).is_dir():
        return 0  # a flat module of the core
    return TIERS.get(parts[1])


def resolve(node: ast.ImportFrom, importer: str, modules: dict[str, Path]) -> str:
    """The absolute module named by a ``from ... import`` statement."""
    if not node.level:
        return node.module or ""
    package = importer if is_package(importer, modules) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(source: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``source`` imports (``from pkg import sub`` names ``sub``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, importer, modules)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a package member
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def import_graph(sources: dict[str, str], modules: dict[str, Path]) -> nx.DiGraph:
    """Edges ``importer -> imported`` between modules of the package."""
    graph = nx.DiGraph()
    graph.add_nodes_from(sources)
    for name, source in sources.items():
        for target in imports(source, name, modules):
            if target != name:
                graph.add_edge(name, target)
    return graph


def violations(graph: nx.DiGraph, modules: dict[str, Path]) -> list[str]:
    """Every broken rule: upward imports, imports of an own package, cycles."""
    found = []
    for importer, target in graph.edges:
        low, high = tier(importer), tier(target)
        if target == importer.partition(".")[0] and importer != target:
            found.append(f"{importer} imports the package root {target}")
        elif low is not None and high is not None and high > low:
            found.append(f"{importer} (tier {low}) imports {target} (tier {high})")
        own = importer.rpartition(".")[0]
        if (is_package(target, modules) and target == own and target != importer
                and importer.rpartition(".")[2] != "__main__"):
            found.append(f"{importer} imports its own package's __init__ {target}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in nx.simple_cycles(graph)]
    return found


def package_graph() -> tuple[nx.DiGraph, dict[str, Path]]:
    modules = module_names()
    sources = {name: path.read_text() for name, path in modules.items()}
    return import_graph(sources, modules), modules


def test_every_module_has_a_tier_and_the_layout_is_the_documented_one():
    modules = module_names()
    assert {"mpotn.types", "mpotn.truncation", "mpotn.methods.base", "mpotn.layers.mpo",
            "mpotn.compression.model", "mpotn.finetune.core_changes", "mpotn.data.hub",
            "mpotn.analysis.fidelity", "mpotn.cli.common"} <= set(modules)
    assert all(tier(name) is not None for name in modules if name != "mpotn")
    assert tier("mpotn.mpo") == tier("mpotn.data.tasks") == 0
    assert tier("mpotn.cli.squeeze") == 6
    assert tier("mpotn.newtier.module") is None


def test_the_architecture_page_describes_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in module_names() if name != "mpotn"
               and not name.endswith("__main__") and f"[`{name}`][{name}]" not in page]
    assert missing == []


def test_imports_point_down_without_cycles():
    graph, modules = package_graph()
    assert graph.number_of_edges() > 50  # the parser sees the imports at all
    assert ("mpotn.compression.model", "mpotn.compression.serialization") in graph.edges
    assert violations(graph, modules) == []


def test_function_level_imports_are_seen():
    modules = module_names()
    source = "def run():\n    from mpotn.finetune.training import finetune\n"
    assert imports(source, "mpotn.cli.finetune", modules) == {"mpotn.finetune.training"}


SYNTHETIC = {
    "pkg": Path("pkg/__init__.py"),
    "pkg.mpo": Path("pkg/mpo.py"),
    "pkg.layers": Path("pkg/layers/__init__.py"),
    "pkg.layers.mpo": Path("pkg/layers/mpo.py"),
    "pkg.layers.factorized": Path("pkg/layers/factorized.py"),
    "pkg.compression": Path("pkg/compression/__init__.py"),
    "pkg.compression.compress": Path("pkg/compression/compress.py"),
    "pkg.compression.serialization": Path("pkg/compression/serialization.py"),
}


@pytest.mark.parametrize(("sources", "message"), [
    ({"pkg.mpo": "def draw():\n    from pkg.layers import mpo\n"}, "tier 0) imports"),
    ({"pkg.layers.mpo": "from pkg.compression.compress import compress\n"}, "tier 2) imports"),
    ({"pkg.compression.compress": "from pkg.compression import serialization\n",
      "pkg.compression.serialization": "def save():\n"
                                       "    from pkg.compression.compress import x\n"},
     "import cycle"),
    ({"pkg.layers.factorized": "from pkg.layers import MPOLinear\n"},
     "own package's __init__"),
    ({"pkg.layers.factorized": "import pkg\n"}, "package root"),
])
def test_the_checks_flag_a_bad_layout(sources, message):
    graph = import_graph(sources, SYNTHETIC)
    found = violations(graph, SYNTHETIC)
    assert any(message in v for v in found), found


def test_the_checks_pass_a_good_layout():
    sources = {"pkg.layers.factorized": "from pkg.mpo import MPO\n",
               "pkg.compression.compress": "from pkg.compression.serialization import save\n"
                                           "from pkg.layers import MPOLinear\n"}
    assert violations(import_graph(sources, SYNTHETIC), SYNTHETIC) == []


def test_the_command_line_parses_without_importing_torch_or_transformers():
    """``mpotn --help`` builds every subcommand's parser from light modules only."""
    code = ("import sys; from mpotn.cli import build_parser; build_parser(); import mpotn; "
            "print(sorted(m for m in ('torch', 'transformers', 'tensornetwork') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_exports_resolve_on_first_use():
    """``mpotn.MPO`` and the other re-exports are the objects of their home modules."""
    import importlib

    import mpotn

    for name, module in mpotn._EXPORTS.items():
        assert getattr(mpotn, name) is getattr(importlib.import_module(module), name)
    assert sorted(mpotn.__all__) == sorted(mpotn._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mpotn.nothing  # noqa: B018
