"""Imports go downward (DESIGN.md's layout table): a module may import its own layer or a
lower one, never a higher one, with no exception.  The walk reads every module under
src/qlora_ext with `ast`, so an import inside a function counts as much as one at the top.
Shared contracts live in leaf modules (options, hyperparams, launcher, model/lora's
projection names, model/dropout's hash) so that no layer needs one above it."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "qlora_ext"

# lower number = lower layer
LAYERS = {
    "_native": 0, "nf4": 0, "profile": 0, "progress": 0, "data": 0, "finite": 0, "options": 0, "hyperparams": 0,
    "launcher": 0,
    "model": 1,
    "cpu": 2, "gpu": 2,
    "engine": 4,
    "device": 5, "placement": 5,
    "train": 6,
    "api": 7, "cli": 7, "profile_command": 7, "export_command": 7, "info_command": 7, "run_config": 7, "cli_checks": 7, "cli_args": 7, "__init__": 7,
}


def _top(mod_path: Path) -> str:
    rel = mod_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    """Top-level qlora_ext packages/modules imported by the file at `path`."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(PKG)
    depth = len(rel.parts) - 1                  # packages between qlora_ext and the file
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > depth:
                    continue
                base = list(rel.parts[:depth - up])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:                       # `from . import x` at the package root
                    for alias in node.names:
                        yield alias.name
                    continue
                yield parts[0]
            elif node.module and node.module.startswith("qlora_ext."):
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qlora_ext."):
                    yield alias.name.split(".")[1]


def test_every_module_is_in_a_layer():
    tops = {_top(p) for p in PKG.rglob("*.py")}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS"


def test_imports_go_downward():
    found = set()
    for path in sorted(PKG.rglob("*.py")):
        me = _top(path)
        for target in _imports(path):
            if target not in LAYERS or target == me:
                continue
            if LAYERS[target] > LAYERS[me]:
                found.add((str(path.relative_to(PKG)), target))
    assert not found, f"upward imports: {sorted(found)}"


def test_the_walk_sees_relative_and_in_function_imports():
    """engine/gpu_memory.py imports ..options at the top and .gpu_device inside a function."""
    found = set(_imports(PKG / "engine" / "gpu_memory.py"))
    assert {"options", "gpu", "model", "engine"} <= found, found
