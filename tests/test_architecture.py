"""The import graph of armfast, read from its source files: no cycle (imports inside functions
included, and the package ``__init__`` each import runs), every module in a layer, no import
from a higher layer, and no module importing a package above it (the root ``armfast`` included)."""
from __future__ import annotations

import ast
from pathlib import Path

import armfast

ROOT = Path(armfast.__file__).resolve().parent

# lowest first; a module may import its own layer and the ones below (a package is named by its
# prefix: "armfast.ops" is the package and everything in it)
LAYERS = (
    ("armfast._version", "armfast._files", "armfast.kernels", "armfast.backbones",
     "armfast.precision", "armfast.background"),
    ("armfast.ops", "armfast.data"),
    ("armfast.arm",),
    ("armfast.clip",),
    ("armfast.protocols", "armfast.presets", "armfast.preflight"),
    ("armfast.inference",),
    ("armfast.eval", "armfast.train", "armfast.bench"),
    ("armfast.api",),
    ("armfast.cli",),
    ("armfast",),  # the root package: the public API, loaded lazily
)
# the only imports of a package by a module inside it: a __main__ runs its package's main
UPWARD_ALLOWED = {("armfast.cli.__main__", "armfast.cli")}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) of every module of the armfast source tree."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("armfast",) + path.relative_to(ROOT).with_suffix("").parts
        if "kernels" in parts[1:2]:  # installed Triton kernels: outside armfast's own code
            continue
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the armfast modules its execution imports, the packages each import runs
    first (their ``__init__``) included."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name.split(".") if package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "armfast")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".")
                else:
                    base = node.module or ""
                if base.split(".")[0] != "armfast":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges = set()
        for target in targets - {name}:
            edges.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):  # the packages the import runs first, unless running
                step = ".".join(parts[:i])
                if not name.startswith(step + "."):
                    edges.add(step)
        graph[name] = {t for t in edges if t in modules or t.startswith("armfast.kernels")}
    return graph


def layer_of(module: str) -> int | None:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    return None if best is None else best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"armfast", "armfast.inference.segmentor", "armfast.arm.folder", "armfast.ops"} <= set(graph)
    # what the graph must see: imports inside functions, and the package __init__ they run
    assert "armfast.inference.segmentor" in graph["armfast.eval.runner"]
    assert "armfast.clip" in graph["armfast.inference.segmentor"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    assert [m for m in graph if layer_of(m) is None] == []
    upward = sorted(f"{m} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
                    for m, targets in graph.items() for t in targets
                    if layer_of(t) > layer_of(m))
    assert upward == []


def test_no_module_imports_a_package_above_it():
    graph = import_graph()
    up = sorted((m, t) for m, targets in graph.items() for t in targets
                if m.startswith(t + ".") and (m, t) not in UPWARD_ALLOWED)
    assert up == []


def test_arm_folder_io_does_not_import_the_module_class():
    graph = import_graph()
    assert "armfast.arm.module" not in graph["armfast.arm.folder"]
    assert "armfast.arm" not in graph["armfast.arm.folder"]


def test_no_module_of_the_package_is_over_450_lines():
    long = {name: n for name, (path, _) in module_files().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 450}
    assert long == {}


def test_op_specs_belong_to_no_backend_and_no_backend_imports_another():
    graph = import_graph()
    backends = "armfast.ops._backends"
    assert not [t for t in graph["armfast.ops._specs"] if t.startswith(backends)]
    shared = {backends, f"{backends}._extension"}

    def backend_of(module):
        return ".".join(module.split(".")[:4]) if module.startswith(backends + ".") else None
    crossing = sorted((m, t) for m, targets in graph.items() if backend_of(m)
                      for t in targets if backend_of(t) and t not in shared
                      and backend_of(t) != backend_of(m))
    assert crossing == []
    # the op layer reaches the backends only through the registry (by name, at run time)
    ops_modules = [m for m in graph if m.startswith("armfast.ops") and not backend_of(m)]
    assert not [(m, t) for m in ops_modules for t in graph[m] if backend_of(t)]
