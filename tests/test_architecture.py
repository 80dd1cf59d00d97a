"""The folder tree is the architecture: imports flow one way, cli -> run -> output -> (scene, models) -> method."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "multidiff_cli"

# Lower layers never import higher ones. errors and the package root are shared by every layer.
LAYERS = {
    "method": 0,
    "scene": 1,
    "models": 1,
    "output": 2,
    "run": 3,
    "bench": 4,
    "smoke": 4,
    "bench_peer": 5,
    "gpu_check": 6,
    "cli": 7,
    "__main__": 8,
}
SHARED = {"errors", "__init__"}
# What the paper's code must never see: files, YAML, tokenizers, the command line.
METHOD_FORBIDDEN = {"yaml", "typer", "rich", "pydantic", "PIL", "transformers"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports, relative imports resolved (also imports inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import grid` imports a submodule, else names of target
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists()
                              else target)
            else:
                found.add(node.module)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def internal_imports(module: str) -> set[str]:
    return {name for name in imports_of(MODULES[module]) if name in MODULES and name != module}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_layers(module):
    layer = layer_of(module)
    if layer in SHARED:
        assert all(layer_of(name) in SHARED for name in internal_imports(module)), "errors/__init__ import no layer"
        return
    assert layer in LAYERS, f"{module}: a new top-level module needs a place in LAYERS"
    for name in internal_imports(module):
        other = layer_of(name)
        if other in SHARED or other == layer:
            continue
        assert LAYERS[other] < LAYERS[layer], f"{module} imports {name}: {layer} sits above {other}"


def test_no_import_cycles():
    graph = {module: internal_imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for name in graph[module]:
            visit(name, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "method"))
def test_the_method_sees_no_files_yaml_tokenizers_or_cli(module):
    outside = {name.split(".")[0] for name in imports_of(MODULES[module])}
    assert not outside & METHOD_FORBIDDEN


def test_cli_only_parses_calls_and_prints():
    assert len((PACKAGE / "cli.py").read_text().splitlines()) <= 300
    assert "import torch" not in (PACKAGE / "cli.py").read_text()


def test_validate_and_preview_paths_never_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from multidiff_cli import cli\n"
        "from multidiff_cli.scene import load_scene\n"
        "from multidiff_cli.output.preview import draw_layout\n"
        "from multidiff_cli.output.png import read_metadata\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
