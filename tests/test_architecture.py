"""The package's layers (docs/ARCHITECTURE.md): every import goes down, none goes up or sideways.

Imports are read from the source with :mod:`ast` (module level and inside functions alike), so the
test sees what the code would import, not what one run happened to import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "densenet"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# layer -> modules; a module may import only modules of lower layers
LAYERS: list[tuple[str, set[str]]] = [
    ("package root and errors", {"__init__", "errors"}),
    ("runtime and files", {"runtime", "files"}),
    ("parts", {"models", "resnet", "data", "augment", "distributed", "plots", "onnx_runtime", "pretrained", "lookahead",
               "muon", "budget"}),
    ("registry", {"registry"}),
    ("services", {"weights", "inference", "analysis"}),
    ("run building blocks", {"reuse", "config", "rundir", "optimization"}),
    ("trainer", {"trainer"}),
    ("commands", {"analyze", "download", "export", "train", "evaluate", "predict", "bench", "compare", "sweep",
                  "report"}),
    ("command line", {"cli"}),
    ("python -m densenet", {"__main__"}),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def package_imports(path: Path) -> set[str]:
    """The ``densenet`` modules that ``path`` imports (``from densenet import x`` counts as module x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "densenet":
            if node.module == "densenet":
                found.update(alias.name for alias in node.names if alias.name != "__version__")
                if any(alias.name == "__version__" for alias in node.names):
                    found.add("__init__")
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("densenet."))
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: package_imports(p) - {p.stem} for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    assert set(graph()) == set(LAYER_OF), "add new modules to LAYERS here and to docs/ARCHITECTURE.md"


def test_imports_only_go_down():
    upward = [f"{m} ({LAYERS[LAYER_OF[m]][0]}) imports {d} ({LAYERS[LAYER_OF[d]][0]})"
              for m, deps in graph().items() for d in sorted(deps) if LAYER_OF[d] >= LAYER_OF[m]]
    assert upward == []


def test_no_import_cycles():
    deps = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for d in sorted(deps[module]):
            if state.get(d) == 1:
                return path + [module, d]
            if d not in state and (cycle := visit(d, path + [module])):
                return cycle
        state[module] = 2
        return None

    for module in deps:
        if module not in state:
            assert visit(module, []) is None


def test_cli_imports_commands_by_name_only():
    # cli imports a command's module with importlib when that command runs; it names every command
    from densenet.cli import COMMANDS

    assert {module.split(".")[1] for module, _ in COMMANDS.values()} == LAYERS[7][1]


def test_the_documented_layers_are_these():
    """docs/ARCHITECTURE.md's layer table lists the same modules in the same layers."""
    rows = re.findall(r"^\| (\d) \| [^|]+ \| ([^|]+) \|", DOC.read_text(encoding="utf-8"), re.M)
    documented = {int(n): set(re.findall(r"`(\w+)\.py`", cell)) for n, cell in rows}
    assert documented == {i: modules for i, (_, modules) in enumerate(LAYERS)}
