"""The house's layers are real: over every package (``zsad``, ``zsad_cli``) and the entry points beside them, no module
imports a module of a higher layer and no import circle exists, counting imports inside functions too (a lazy import
hides an upward import or a circle, it does not remove it)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*(REPO / "zsad").rglob("*.py"), *(REPO / "zsad_cli").rglob("*.py"), REPO / "app.py", *(REPO / "train").glob("*.py")]

# docs/ARCHITECTURE.md's layers, lowest first: a module may import from its own layer and those below. A module's
# layer is that of the longest prefix listed here, so a new module lands in its package's layer.
LAYERS = (
    ("zsad.modeling", "zsad_cli.choices"),  # travels with checkpoints; the parser's vocabulary, a leaf
    ("zsad.runtime", "zsad.metrics", "zsad.testing"),
    ("zsad.data",),
    ("zsad.detection",),
    ("zsad.evaluation", "zsad.deploy", "zsad.hub"),
    ("zsad.cli",),
    ("zsad", "zsad.space", "zsad_cli", "app", "train"),  # zsad's __init__ is the public face over every layer
)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    prefixes = [(len(prefix), rank) for rank, layer in enumerate(LAYERS) for prefix in layer
                if module == prefix or module.startswith(f"{prefix}.")]
    assert prefixes, f"{module} is in no layer of LAYERS: add it where docs/ARCHITECTURE.md puts it"
    return max(prefixes)[1]


def imported_modules(path: Path, modules: set[str], root: Path = REPO) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from .x import y`` counts x, or x.y when y is a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(candidate for candidate in candidates if candidate in modules and candidate != name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports; a module's own parent packages left out (Python runs them first anyway)."""
    paths = {module_name(path): path for path in SOURCES}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    return {name: {target for target in targets if not name.startswith(f"{target}.")} for name, targets in graph.items()}


def upward_imports(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(target for target in graph[module] if layer_of(target) > layer_of(module))


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as the modules along it, or None."""
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if name in trail:
            return trail[trail.index(name):] + [name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            if circle := visit(target, trail + [name]):
                return circle
        done.add(name)
        return None

    return next((circle for name in sorted(graph) if (circle := visit(name, []))), None)


GRAPH = import_graph()


def test_the_graph_covers_every_package():
    assert {"zsad", "zsad_cli", "zsad_cli.choices", "zsad.runtime.loading", "zsad.cli.commands", "app"} <= set(GRAPH)
    assert "zsad_cli.choices" in GRAPH["zsad.runtime.loading"]  # the parser's vocabulary is read from the leaf
    assert "zsad.cli.commands" in GRAPH["zsad_cli"]  # the parser calls into the commands, never the other way
    assert "zsad.data.hf" not in GRAPH["zsad.data.readers"] and "zsad.data.readers" in GRAPH["zsad.data.hf"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_nothing_imports_upward(module):
    upward = upward_imports(GRAPH, module)
    assert not upward, f"{module} (layer {layer_of(module)}) imports from higher layers: {upward}"


def test_the_models_import_nothing_of_zsad():
    """The Hub's remote-code loader ships only zsad/modeling/ with a checkpoint."""
    for module, targets in GRAPH.items():
        if module.startswith("zsad.modeling"):
            assert all(target.startswith("zsad.modeling.") for target in targets), (module, targets)


def test_no_import_circles():
    circle = import_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checks_see_a_lazy_upward_import_and_the_circle_it_closes(tmp_path):
    """The fault this file was written for (runtime/loading.py reading the parser's package), planted in a copy."""
    planted = tmp_path / "zsad" / "runtime" / "loading.py"
    planted.parent.mkdir(parents=True)
    planted.write_text((REPO / "zsad/runtime/loading.py").read_text() + "\n\ndef parser():\n    from zsad_cli import build_parser\n")
    graph = {**GRAPH, "zsad.runtime.loading": imported_modules(planted, set(GRAPH), root=tmp_path)}
    assert upward_imports(graph, "zsad.runtime.loading") == ["zsad_cli"]
    circle = import_circle(graph)
    assert circle is not None and "zsad_cli" in circle and "zsad.runtime.loading" in circle


def test_zsaderror_is_imported_from_where_it_is_defined():
    """Inside zsad from ``zsad.modeling.exceptions``; outside it (tests, benchmarks, the Space's entry) as ``zsad.ZSADError``."""
    sources = SOURCES + [*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    for path in sources:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "ZSADError" in {alias.name for alias in node.names}:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{anchor}.{node.module}".strip(".") if node.level else node.module
                inside = name == "zsad" or name.startswith("zsad.")
                allowed = "zsad.modeling.exceptions" if inside else "zsad"
                assert source == allowed, f"{path.relative_to(REPO)} imports ZSADError from {source}, not {allowed}"
