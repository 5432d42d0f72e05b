"""Check that qlora_plugin's imports flow one way: no import circle, no import from a higher layer.

    python scripts/check_layers.py [--graph]

Every ``import`` and ``from ... import`` of the package's own modules counts: at module
level, inside functions and under ``if TYPE_CHECKING:`` alike (an annotation that needs a
module is a dependency on it, and an import deferred into a function is still a way from
one module to another). Layers, lowest first, are the subpackages named in :data:`LAYERS`;
a module may import from its own layer or a lower one. The package's ``__init__`` and
``axolotl`` (the public facade) sit above every layer.

Imports of the package's own modules belong at the top of a module. One inside a function is
allowed only where :data:`DEFERRED` names the module and the heavy third-party import it
defers (so ``qlora --help`` and the config-only subcommands never load torch). Exits 1 with one
line per violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "qlora_plugin"
LAYERS = ("core", "build", "fastpath", "integrations", "tools", "commands")
FACADE = 99
# Modules allowed to import package modules inside functions, and the heavy import each defers.
DEFERRED = {
    "qlora_plugin": "the seams it fills: each layer behind them imports torch, transformers or TRL",
    "qlora_plugin.tools.inspection": "the recipe (PEFT) and the model loader (transformers), only for a model",
    "qlora_plugin.tools.merge": "the recipe (PEFT) and the model loader (transformers), only when merging",
    "qlora_plugin.tools.gguf_export": "the model loader (transformers), only when exporting",
    "qlora_plugin.tools.adapter_fit": "the model built on the meta device (transformers), only for a base's shapes",
    "qlora_plugin.fastpath.kernels.lora_linear": "bitsandbytes and the Triton dropout kernels (both load Triton)",
    "qlora_plugin.fastpath.kernels.dequant": "the Triton NF4 kernel, on CUDA only",
    "qlora_plugin.fastpath.kernels.loss_stats": "the Triton loss-statistics kernel, on CUDA only",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return FACADE


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package's own modules that ``path`` imports, anywhere in it (functions and ``TYPE_CHECKING`` too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in modules and name != this}


def deferred_imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package's own modules ``path`` imports inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module)
    return {name for name in found if name in modules}


def deferred_problems(root: Path = ROOT) -> list[str]:
    """One line per function-local import of a package module where :data:`DEFERRED` allows none."""
    paths = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    problems = []
    for module, path in sorted(paths.items()):
        if module in DEFERRED:
            continue
        for target in sorted(deferred_imports(path, set(paths), root)):
            problems.append(f"import inside a function: {module} imports {target} (move it to the top)")
    return problems


def missing_imports(root: Path = ROOT) -> list[str]:
    """One line per import of a package module that does not exist (a stale path after a move:
    inside a function it fails only when that function runs)."""
    paths = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    problems = []
    for module, path in sorted(paths.items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                if (name == PACKAGE or name.startswith(PACKAGE + ".")) and name not in paths:
                    problems.append(f"missing module: {module} imports {name}, which does not exist")
    return problems


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module of the package under ``root`` and the package modules it imports."""
    paths = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules, root) for name, path in sorted(paths.items())}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in edges:
        if node not in index:
            connect(node)
    return found


def is_package_parent(importer: str, imported: str) -> bool:
    """A module importing its own package's ``__init__`` (Python runs it first anyway)."""
    return importer.startswith(imported + ".")


def problems_in(edges: dict[str, set[str]]) -> list[str]:
    """One line per upward import and per import circle."""
    problems = []
    for module, targets in edges.items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(module) and not is_package_parent(module, target):
                problems.append(
                    f"upward import: {module} ({_layer_name(module)}) imports {target} ({_layer_name(target)})"
                )
    for component in cycles({m: {t for t in ts if not is_package_parent(m, t)} for m, ts in edges.items()}):
        problems.append("import circle: " + " <-> ".join(component))
    return problems


def main() -> int:
    edges = graph()
    problems = problems_in(edges) + deferred_problems() + missing_imports()
    if "--graph" in sys.argv:
        for module, targets in edges.items():
            print(f"{module} -> {', '.join(sorted(targets)) or '-'}")
    for problem in problems:
        print(problem)
    print(f"{len(edges)} modules, {sum(len(t) for t in edges.values())} imports, {len(problems)} problems")
    return 1 if problems else 0


def _layer_name(module: str) -> str:
    layer = layer_of(module)
    return "facade" if layer == FACADE else LAYERS[layer]


if __name__ == "__main__":
    sys.exit(main())
