"""The package's import graph runs one way (DESIGN.md principle 7), read from the source with ast.

Layers, lowest first; a module may import its own layer and the ones below, never above:

  0  errors, fileio, cli, backend, tree, random, nn     (the package root too)
  1  models, diffusion, lora
  2  checkpoint
  3  data
  4  pipelines
  5  train
  6  eval, deploy
  7  recipe                                             (runs train, then eval)

Also: imports of sd_func modules sit at module level (none inside a function, where it
would hide a cycle), none inside `try:` (an ImportError of our own code is a bug and
must surface), no import cycle even within a layer, and two process-wide facts have one
owner each: only train/distributed.py reads the launcher's RANK / WORLD_SIZE, and only
backend.py flips the TF32 / matmul-precision switches.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sd_func")
LAYERS = [
    {"sd_func", "errors", "fileio", "cli", "backend", "tree", "random", "nn"},
    {"models", "diffusion", "lora"},
    {"checkpoint"},
    {"data"},
    {"pipelines"},
    {"train"},
    {"eval", "deploy"},
    {"recipe"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, str]:
    """{"sd_func.train.loop": path} for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


def part(module: str) -> str:
    """The top-level part of sd_func a module belongs to ("sd_func" for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sd_func"


def imports(path: str, module: str) -> list[tuple[str, ast.stmt, list[ast.AST]]]:
    """(imported sd_func module, the import node, its enclosing nodes) for each import."""
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []

    def visit(node, parents):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child, parents) for a in child.names if a.name.split(".")[0] == "sd_func")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "sd_func":
                    for a in child.names:
                        name = f"{base}.{a.name}"
                        out.append((name if name in ALL else base, child, parents))
            visit(child, parents + [child])

    visit(tree, [])
    return out


ALL = modules()


def edges() -> dict[str, set[str]]:
    graph = {m: set() for m in ALL}
    for m, path in ALL.items():
        for target, _, _ in imports(path, m):
            while target not in ALL and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != m:
                graph[m].add(target)
    return graph


def test_every_part_has_a_layer():
    unknown = sorted({part(m) for m in ALL} - set(RANK))
    assert not unknown, f"sd_func parts without a layer in this test: {unknown}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_go_down(module):
    here = RANK[part(module)]
    bad = [(t, RANK.get(part(t))) for t, _, _ in imports(ALL[module], module) if RANK.get(part(t), 99) > here]
    assert not bad, f"{module} (layer {here}) imports a higher layer: {bad}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_hidden_imports(module):
    hidden = []
    for target, node, parents in imports(ALL[module], module):
        for p in parents:
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                hidden.append(f"line {node.lineno}: {target} imported inside {p.name}()")
            if isinstance(p, (ast.Try, ast.TryStar)):
                hidden.append(f"line {node.lineno}: {target} imported inside try:")
    assert not hidden, f"{module}: " + "; ".join(hidden)


def test_no_import_cycles():
    graph, state, stack = edges(), {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def _nodes(path: str) -> list[ast.AST]:
    with open(path) as fh:
        return list(ast.walk(ast.parse(fh.read())))


def _string_constants(path: str) -> set[str]:
    return {n.value for n in _nodes(path) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _attribute_names(path: str) -> set[str]:
    return {n.attr for n in _nodes(path) if isinstance(n, ast.Attribute)}


def test_one_owner_of_process_wide_state():
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    switches = {"set_float32_matmul_precision", "allow_tf32"}
    readers = sorted(m for m, p in ALL.items() if _string_constants(p) & launcher)
    setters = sorted(m for m, p in ALL.items() if _attribute_names(p) & switches)
    assert readers == ["sd_func.train.distributed"], readers
    assert setters == ["sd_func.backend"], setters
