"""The folder tree is the architecture: imports flow one way, cli -> bench -> run -> output -> (scene, models)
-> method, with catalog and errors shared by all; run/ talks to a model family's protocol only; the CLI
parses, calls and prints."""
from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "multidiff_cli"

# Lower layers never import higher ones. The shared modules (errors, the torch-free catalog of families,
# the package root) import nothing but each other.
LAYERS = {
    "method": 0,
    "scene": 1,
    "models": 1,
    "output": 2,
    "run": 3,
    "bench": 4,
    "edit": 4,  # the browser editor: a server over run/ and scene/, beside the bench
    "cli": 5,
    "__main__": 6,
}
SHARED = {"errors", "catalog", "__init__"}
# What the paper's code must never see: files, YAML, tokenizers, the command line, a model library.
METHOD_FORBIDDEN = {"yaml", "typer", "rich", "pydantic", "PIL", "numpy", "transformers", "diffusers", "peft",
                    "huggingface_hub", "safetensors", "accelerate"}
# What the CLI may call: the run layer (and the bench's), what prints, and the shared modules.
CLI_MAY_IMPORT = {"run", "bench", "edit", "output", "cli", *SHARED}
PRINTERS = {"say", "print_path", "echo", "print"}  # say(...), typer.echo(...), out.print(...)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports when it runs, relative imports resolved (also imports inside
    functions; not those for annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(tree):
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


def modules_of(layer: str) -> list[str]:
    return sorted(m for m in MODULES if layer_of(m) == layer)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_layers(module):
    layer = layer_of(module)
    if layer in SHARED:
        assert all(layer_of(name) in SHARED for name in internal_imports(module)), "shared modules import no layer"
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


@pytest.mark.parametrize("module", modules_of("method"))
def test_the_method_sees_no_files_yaml_tokenizers_cli_or_model_library(module):
    outside = {name.split(".")[0] for name in imports_of(MODULES[module])}
    assert not outside & METHOD_FORBIDDEN


@pytest.mark.parametrize("module", modules_of("run"))
def test_run_talks_to_the_model_protocol_and_nothing_below_it(module):
    below = {name for name in internal_imports(module) if layer_of(name) == "models" and name != "multidiff_cli.models"}
    assert not below, f"{module} imports {below}: run/ imports the models package (models/__init__.py) only"


@pytest.mark.parametrize("module", modules_of("run"))
def test_run_never_says_a_familys_name(module):
    from multidiff_cli.catalog import FAMILIES

    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in FAMILIES}
    assert not named, f"{module} names the families {named}: ask the model (its protocol, its facts) instead"


def test_every_family_is_a_module_with_one_concrete_class_of_the_protocol():
    from multidiff_cli.catalog import FAMILIES
    from multidiff_cli.models.family import Model, family_class

    for family in FAMILIES.values():
        assert (PACKAGE / "models" / f"{family.module}.py").is_file(), family.name
        cls = family_class(family)
        assert issubclass(cls, Model) and not inspect.isabstract(cls), f"{cls.__name__} leaves protocol methods out"
        assert cls.facts is family


@pytest.mark.parametrize("module", modules_of("cli"))
def test_the_cli_parses_calls_and_prints(module):
    """The CLI imports what it calls (run/, the bench) and what prints (output/), never a model, a scene or the
    method; it imports no torch; and a loop among its commands only prints."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    reached = {layer_of(name) for name in internal_imports(module)}
    assert reached <= CLI_MAY_IMPORT, f"{module} reaches {reached - CLI_MAY_IMPORT}: call run/ instead"
    assert not any(name.split(".")[0] == "torch" for name in imports_of(MODULES[module]))
    if module != "multidiff_cli.cli.app":
        return  # the edge (errors to lines, plain help) is plumbing, not commands
    for loop in (node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While))):
        calls = [node for node in ast.walk(ast.Module(body=loop.body, type_ignores=[])) if isinstance(node, ast.Call)]
        names = {call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "") for call in calls}
        assert names <= PRINTERS, f"{module}:{loop.lineno}: a loop that does more than print ({names - PRINTERS})"


def test_validate_and_preview_paths_never_import_torch(tmp_path):
    """The one no-torch check: the CLI, scene loading, layout drawing, PNG records, the catalog of families
    and the models package itself load without torch (validate and preview stay fast)."""
    code = (
        "import sys\n"
        "from multidiff_cli import cli, catalog, models\n"
        "from multidiff_cli.run import workflow\n"
        "from multidiff_cli.scene import load_scene\n"
        "from multidiff_cli.output.preview import draw_layout\n"
        "from multidiff_cli.output.png import read_metadata\n"
        "catalog.detect_family('tiny-random')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
