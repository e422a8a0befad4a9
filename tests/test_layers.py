"""The package's layers import downward only, and no import cycle exists (read from the source).

Every ``import`` of a module of ``lowmem_optim`` in ``lowmem_optim/`` is read from the syntax
tree, at module level and inside functions alike. Importing ``a.b.c`` also runs the package
``a.b``'s ``__init__`` when the importer lies outside ``a.b``, so that is an edge too: that is
how ``engine -> rules -> rules.adafactor -> quant.int8_linear -> groups -> engine`` closed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowmem_optim"

#: top to bottom: a module imports nothing of a layer above its own
LAYERS: tuple[tuple[str, ...], ...] = (
    ("lowmem_optim.tools",),
    ("lowmem_optim.registry", "lowmem_optim.integrations"),
    ("lowmem_optim.optimizers", "lowmem_optim.groups", "lowmem_optim.layerwise"),
    ("lowmem_optim.engine",),
    ("lowmem_optim.projection", "lowmem_optim.rules", "lowmem_optim.schedules", "lowmem_optim.update_forms"),
    (
        "lowmem_optim.parts",
        "lowmem_optim.finite",
        "lowmem_optim.sharding",
        "lowmem_optim.shapes",
        "lowmem_optim.selection",
        "lowmem_optim.quant",
    ),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, importer: str, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (``from a import b``: ``a.b`` if a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    source = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1
        package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        source = f"{base}.{source}" if source else base
    if source not in modules:
        return []
    submodules = [f"{source}.{alias.name}" for alias in node.names]
    return [source, *(name for name in submodules if name in modules)]


def _in_function(tree: ast.Module) -> set[ast.AST]:
    return {
        inner
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        if isinstance(inner, (ast.Import, ast.ImportFrom))
    }


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """Per module, the package's modules its import runs; and every import inside a function."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    local: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        inside = _in_function(tree)
        edges = set()
        for node in ast.walk(tree):
            targets = _imported(node, name, modules)
            if targets and node in inside:
                local.append(f"{name}:{node.lineno} imports {', '.join(targets)}")
            for target in targets:
                edges.add(target)
                parent = target.rpartition(".")[0]
                while parent != "lowmem_optim" and not (name + ".").startswith(parent + "."):  # its __init__ runs
                    edges.add(parent)
                    parent = parent.rpartition(".")[0]
        graph[name] = edges - {name}
    return graph, local


def _layer(module: str) -> int | None:
    for depth, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return depth
    return None


def test_every_module_of_the_package_sits_in_a_layer():
    unplaced = [m for m in _modules() if m != "lowmem_optim" and _layer(m) is None]
    assert not unplaced, f"add these modules to a layer of LAYERS: {unplaced}"


def test_a_layer_imports_nothing_of_the_layers_above_it():
    """quant, projection, rules and schedules import nothing of the engine, registry, groups or
    optimizers; the engine imports no registry, named optimizer or param-group builder; nothing
    but the tools imports the tools."""
    graph, _ = _imports()
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if module != "lowmem_optim" and _layer(target) is not None and _layer(target) < _layer(module)
    ]
    assert not upward, f"imports of a higher layer: {upward}"


def test_no_module_of_the_package_imports_another_inside_a_function():
    """A function-local import of the package dodges a cycle (only optional third-party
    packages, as bitsandbytes or transformers, may be imported lazily)."""
    _, local = _imports()
    assert not local, f"function-local imports of lowmem_optim: {local}"


def test_the_package_has_no_import_cycle():
    graph, _ = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail(f"import cycle: {' -> '.join([*path[path.index(module) :], module])}")
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
