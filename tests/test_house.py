"""The house rules of the package, checked on its source: no import cycle, at most 8 parameters a function, each
metric named in one module (the registry; the named recipes of `adapruner.recipes` cite some), projections named only
in the model-family layer."""

import ast
from pathlib import Path

import pytest

from adapruner.choosing.allocation_rules import ALLOCATIONS
from adapruner.scoring.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    **{
        f"adapruner.{'.'.join(p.relative_to(ROOT / 'adapruner').with_suffix('').parts)}": p
        for p in (ROOT / "adapruner").rglob("*.py")
    },
    **{f"adapruner.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")},
}
SOURCES = {name.removesuffix(".__init__"): path for name, path in SOURCES.items()}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in SOURCES.items()}


def imported_modules(module: str, tree: ast.Module) -> set[str]:
    """The package's modules that `module` imports anywhere in its body (top level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in SOURCES and name != module}
    return found


def test_the_package_imports_no_cycle():
    graph = {module: imported_modules(module, tree) for module, tree in TREES.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' → '.join(path[path.index(target) :] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(decorator) for decorator in node.decorator_list)


def test_no_function_takes_more_than_eight_parameters():
    """Triton kernels are exempt: their parameters are pointers, strides and compile-time constants by nature."""
    wide = []
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = (
                    len([n for n in names if n not in ("self", "cls")])
                    + (args.vararg is not None)
                    + (args.kwarg is not None)
                )
                if count > 8:
                    wide.append(f"{module}.{node.name} ({count})")
    assert not wide, wide


def _code_strings(tree: ast.Module) -> set[str]:
    """String constants of the code (docstrings excluded), f-string parts included."""
    docstrings = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        for body in [node.body]
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


OTHER_MEANINGS = {"random": {"adapruner.cli", "adapruner.searching.study"}}  # Optuna's random sampler, not the metric


@pytest.mark.parametrize("metric", list(METRICS))
def test_each_metric_is_named_in_the_registry_alone(metric):
    naming = [module for module, tree in TREES.items() if metric in _code_strings(tree)]
    cited = OTHER_MEANINGS.get(metric, set()) | {"adapruner.recipes"}  # a recipe is a measured choice of metric
    assert sorted(set(naming) - cited) == ["adapruner.scoring.metrics"], naming


ALLOCATION_OTHER_MEANINGS = {  # "--uniform": the old spelling of --stock-config; prune names "--allocation uniform"
    "uniform": {"adapruner.cli", "adapruner.commands.prune"}
}


@pytest.mark.parametrize("name", ALLOCATIONS)
def test_each_allocation_is_named_in_the_registry_alone(name):
    """Code asks an allocation's rule (`adapruner.choosing.allocation_rules`) what it reads and how it counts; a recipe
    is a measured choice of allocation."""
    naming = [module for module, tree in TREES.items() if name in _code_strings(tree)]
    cited = ALLOCATION_OTHER_MEANINGS.get(name, set()) | {"adapruner.recipes"}
    assert sorted(set(naming) - cited) == ["adapruner.choosing.allocation_rules"], naming


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
FAMILY_LAYER = {
    "adapruner.model.families",
    "adapruner.model.family",
    "adapruner.model.derived",
    "adapruner.model.structure",
}


def test_projections_are_named_in_the_family_layer_alone():
    """Only the family layer names a projection in code (docstrings and messages aside); the shipped modeling file
    (`remote_code/`, which runs without adapruner) is the family layer's other half."""
    naming = {}
    for module, tree in TREES.items():
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in PROJECTIONS}
        found = sorted(names & set(PROJECTIONS))
        if found and module not in FAMILY_LAYER and not module.startswith("adapruner.remote_code"):
            naming[module] = found
    assert not naming, naming


def test_no_library_module_imports_a_command():
    """Commands sit on top of the library: only the CLI and the commands themselves import `adapruner.commands`."""
    importing = sorted(
        module
        for module, tree in TREES.items()
        if not module.startswith("adapruner.commands")
        and module not in ("adapruner.cli", "adapruner.__main__")
        and any(name.startswith("adapruner.commands") for name in imported_modules(module, tree))
    )
    assert importing == [], importing


def test_no_folder_of_the_package_holds_more_than_fifteen_modules():
    """The package is grouped by stage (model, data, scoring, choosing, cutting, searching, output, evaluation)."""
    folders = {p for p in (ROOT / "adapruner").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    crowded = {
        folder.relative_to(ROOT).as_posix(): count
        for folder in folders | {ROOT / "adapruner"}
        if (count := len([p for p in folder.glob("*.py") if p.name != "__init__.py"])) > 15
    }
    assert len(folders) >= 8 and not crowded, crowded
