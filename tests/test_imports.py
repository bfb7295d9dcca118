"""Imports run one way (cli -> train/finetune -> run/loop -> model/data/... -> config): no
module imports, even inside a function, one that imports it back; and the training path never
imports TensorFlow, which GPU and TPU images may lack and which costs seconds at startup."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bert_jax"
ROOT = PACKAGE.name


def _module(path: str) -> tuple[str, bool]:
    """`bert_jax/data/__init__.py` -> ("bert_jax.data", True: a package)."""
    parts = path.removesuffix(".py").split("/")
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def _imported(node: ast.AST, importer: str, package: bool, modules: set[str]) -> list[str]:
    """The bert_jax modules an import statement loads: `from bert_jax import x` loads the
    submodule x where one exists, else takes the name x from bert_jax itself."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == ROOT]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: the importer's package, one level up per further dot
        parts = importer.split(".")
        base = ".".join(parts[:len(parts) - node.level + package] + ([base] if base else []))
    if base.split(".")[0] != ROOT:
        return []
    names = [f"{base}.{alias.name}" for alias in node.names]
    submodules = [name for name in names if name in modules]
    return submodules if len(submodules) == len(names) else [base, *submodules]


def _with_packages(name: str) -> list[str]:
    """The module and the packages above it that its import runs. Not the root `bert_jax`:
    every import runs its `__init__`, which imports nothing at its top level (its functions
    import lazily), so it is a dependency only of the modules that import from it."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(2, len(parts) + 1)] or [name]


def import_graph(files: dict[str, str]) -> dict[str, dict[str, str]]:
    """module -> {module it imports: where (file:line of the first such import)}, from the
    sources of `files` (path -> text), over every import statement: at top level or inside
    functions and conditionals."""
    modules = {_module(path)[0] for path in files}
    graph = {}
    for path, source in sorted(files.items()):
        importer, package = _module(path)
        edges = graph.setdefault(importer, {})
        for node in ast.walk(ast.parse(source, path)):
            for name in _imported(node, importer, package, modules):
                for target in _with_packages(name):
                    if target != importer:
                        edges.setdefault(target, f"{path}:{node.lineno}")
    return graph


def first_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """A cycle as a path [a, b, ..., a], or None: depth-first search with colours, where an
    edge back to a module still on the stack (grey) closes a cycle. Sorted order makes the
    cycle reported the same on every run."""
    done, stack, on_stack = set(), [], {}

    def visit(module: str) -> list[str] | None:
        on_stack[module] = len(stack)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target in on_stack:
                return stack[on_stack[target]:] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        del on_stack[stack.pop()]
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_cycles_are_found_as_paths():
    assert first_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) is None
    assert first_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": "", "b": ""}}) == [
        "a", "b", "c", "a"]
    assert first_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"b": ""}}) == ["b", "c", "b"]


def test_the_graph_reads_every_kind_of_import():
    files = {
        "bert_jax/__init__.py": "def load():\n    from bert_jax.pretrained import load\n",
        "bert_jax/config.py": "",
        "bert_jax/pretrained.py": "",
        "bert_jax/data/__init__.py": "",
        "bert_jax/data/masking.py": "from . import packing\nfrom .. import config\n",
        "bert_jax/data/packing.py": "import numpy\n",
        "bert_jax/train.py": ("from bert_jax.config import ModelConfig\n"
                              "if True:\n    import bert_jax.pretrained as p\n"
                              "def f():\n    from bert_jax.data import masking\n"),
        "bert_jax/cli.py": "from bert_jax import train, load\n",
    }
    graph = import_graph(files)
    assert graph["bert_jax.train"] == {"bert_jax.config": "bert_jax/train.py:1",
                                       "bert_jax.pretrained": "bert_jax/train.py:3",
                                       "bert_jax.data": "bert_jax/train.py:5",
                                       "bert_jax.data.masking": "bert_jax/train.py:5"}
    assert set(graph["bert_jax.cli"]) == {"bert_jax", "bert_jax.train"}
    assert set(graph["bert_jax.data.masking"]) == {"bert_jax.data", "bert_jax.data.packing",
                                                   "bert_jax.config"}
    assert graph["bert_jax"] == {"bert_jax.pretrained": "bert_jax/__init__.py:2"}
    assert graph["bert_jax.data.packing"] == {}


def test_imports_have_no_cycle():
    files = {path.relative_to(PACKAGE.parent).as_posix(): path.read_text()
             for path in PACKAGE.rglob("*.py")}
    graph = import_graph(files)
    cycle = first_cycle(graph)
    if cycle:
        where = "\n".join(f"  {a} -> {b}: {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))
        pytest.fail(f"import cycle {' -> '.join(cycle)}:\n{where}\nimports run one way (cli "
                    f"-> train -> model/data/... -> config): move what both sides need into "
                    f"the lower module, or pass it in", pytrace=False)


# Imports a module; prints, for each TensorFlow package it loaded, the bert_jax lines that led
# to its first import.
_WHO_IMPORTS = """
import importlib, json, sys, traceback
NAMES, chains = ("tensorflow", "tensorflow_datasets"), {}

class Finder:
    def find_spec(self, name, path=None, target=None):
        if name in NAMES and name not in chains:
            chains[name] = [f"bert_jax/{frame.filename.split('/bert_jax/')[-1]}:{frame.lineno}"
                            for frame in traceback.extract_stack()
                            if "/bert_jax/" in frame.filename]

sys.meta_path.insert(0, Finder())
importlib.import_module(sys.argv[1])
print(json.dumps({name: chains.get(name, []) for name in NAMES if name in sys.modules}))
"""

LIGHT = ["train", "model", "benchmark", "finetune",
         *(name for name in ("run", "loop") if (PACKAGE / f"{name}.py").is_file())]


@pytest.mark.parametrize("module", LIGHT)
def test_training_modules_do_not_import_tensorflow(module):
    result = subprocess.run([sys.executable, "-c", _WHO_IMPORTS, f"{ROOT}.{module}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert not imported, f"import {ROOT}.{module} imports " + "; ".join(
        f"{name} (via {' -> '.join(chain)})" for name, chain in imported.items())
