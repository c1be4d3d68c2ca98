"""The package's layering, read from its source (every import, module-level or inside a
function): no import cycles, lower layers never import higher ones, no private name
(`_name`) used outside its module, and the library never reaches into the repo's bench/.
docs/ARCHITECTURE.md draws the same layers."""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "sparsekern"

# Bottom to top; a module may import modules of its own layer or below.
LAYERS = [
    {"patterns", "precisions", "memory"},           # 2-D views, bit layouts; value precisions; freed memory
    {"reference", "_extension"},                    # pure-torch references; loading the extension
    {"triton", "semi_structured", "tuning", "dispatch_rules"},  # backends; measured timings; every dispatch rule
    {"decisions"},                                  # the on-disk cache of modules' per-bucket path choices
    {"ops"},                                        # the one door: checks, dispatch, fakes, autograd
    {"formats"},                                    # typed compressed weights over ops
    {"prune"},                                      # scores, masks, calibration, torch-prune-style functions
    {"kinds"},                                      # the registry of pattern kinds (grammar, format, masks)
    {"sparsegpt"},                                  # reconstruction
    {"nn", "sparsify", "serialization"},            # modules and swap; loading saved sparse models
    {"parallel"},                                   # tensor parallelism, DCP, FSDP2 helpers
    {"simplify", "selection"},                      # surgery; sensitivity, allocation, sweeps
    {"recover"},                                    # distillation with masks kept, gradual pruning
    {"reporting"},                                  # tables and plots
    {"models", "bench"},                            # benchmark models and the measurement suite
    {"optimize"},                                   # per-layer search under a quality floor (times with bench)
    {"demo", "__main__", "__init__"},               # the app (and the package's front door)
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield ".".join(rel.parts), path


def _top(dotted: str) -> str:
    """The layer unit of a module: its first component under sparsekern (a package counts
    as one unit: sparsekern.prune.masks belongs to prune)."""
    return dotted.split(".")[0]


def _is_module(name: str) -> bool:
    """A Python module, a subpackage or a compiled extension (sparsekern._C) of the package."""
    return (PKG / f"{name}.py").is_file() or (PKG / name / "__init__.py").is_file() or \
        any(PKG.glob(f"{name}.*.so")) or any(PKG.glob(f"{name}.*.pyd"))


def _imports(module: str, path: pathlib.Path):
    """(imported sparsekern module, imported names, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "sparsekern" or a.name.startswith("sparsekern."):
                    yield a.name[len("sparsekern."):] or "__init__", [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and (node.module == "sparsekern" or node.module.startswith("sparsekern.")):
                target = node.module[len("sparsekern."):] if node.module != "sparsekern" else ""
            else:
                continue
            names = [a.name for a in node.names]
            if not target:  # from sparsekern import ops, formats / from .. import NMWeight
                for n in names:
                    # A name that is not a module of the package comes from its face
                    # (sparsekern/__init__.py, the app layer), whatever it re-exports.
                    yield (n if _is_module(n) else "__init__"), [], node.lineno
            else:
                yield target, names, node.lineno


def _graph():
    edges = {}
    for module, path in _modules():
        unit = _top(module)
        for target, _, line in _imports(module, path):
            tunit = _top(target)
            if tunit != unit:
                edges.setdefault(unit, {}).setdefault(tunit, (module, line))
    return edges


def test_every_module_has_a_layer():
    units = {_top(m) for m, _ in _modules()}
    missing = sorted(units - set(LAYER_OF))
    assert not missing, f"modules with no layer (add them to LAYERS and docs/ARCHITECTURE.md): {missing}"


def test_a_name_from_the_package_face_counts_as_the_app_layer(tmp_path):
    """`from .. import NMWeight` inside a low module imports the package face (the app layer),
    not a module called NMWeight that no layer knows."""
    src = tmp_path / "ops.py"
    src.write_text("from . import NMWeight\nfrom . import formats\n")
    found = [t for t, _, _ in _imports("ops", src)]
    assert found == ["__init__", "formats"], found
    assert LAYER_OF["__init__"] > LAYER_OF[_top("ops")]


def test_no_import_cycles():
    edges = _graph()
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in edges.get(u, {}):
            if state.get(v) == 1:
                cycle = stack[stack.index(v):] + [v]
                pytest.fail("import cycle: " + " -> ".join(cycle) + " (" + ", ".join(
                    f"{a} imports {b} at {edges[a][b][0]}:{edges[a][b][1]}" for a, b in zip(cycle, cycle[1:])) + ")")
            if state.get(v) is None:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in list(edges):
        if u not in state:
            visit(u)


def test_lower_layers_never_import_higher_ones():
    bad = [f"{a} (layer {LAYER_OF.get(a)}) imports {b} (layer {LAYER_OF.get(b)}) at {where[0]}:{where[1]}"
           for a, targets in _graph().items() for b, where in targets.items()
           if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a]]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_used_outside_its_module():
    bad = []
    for module, path in _modules():
        imported_modules = {}
        for target, names, line in _imports(module, path):
            if _top(target) == _top(module):
                continue  # inside one unit (a package's own modules) private names are shared
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in _PRIVATE_MODULES:
                    bad.append(f"{module}:{line} imports {target}.{n}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # `from . import prune` then prune._as_2d
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    imported_modules[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in imported_modules and node.attr.startswith("_") and \
                    not node.attr.startswith("__") and _top(imported_modules[node.value.id]) != _top(module):
                bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


# Private *modules* (a leading underscore on the file) are the package's own plumbing.
_PRIVATE_MODULES = {"._extension", "_extension"}


def test_the_library_never_reaches_into_the_repos_bench_folder():
    """No runpy, no loading files by path, no path built from __file__ to a bench folder:
    a non-editable install has no repo around it (tests/test_standalone.py runs one)."""
    bad = []
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        uses_file = any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(tree))
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and any(a.name == "runpy" for a in n.names):
                bad.append(f"{module}:{n.lineno} imports runpy")
            if isinstance(n, ast.Attribute) and n.attr == "spec_from_file_location":
                bad.append(f"{module}:{n.lineno} loads a module from a file path")
            if uses_file and isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings \
                    and (n.value == "bench" or n.value.startswith("bench/") or "/bench" in n.value):
                bad.append(f"{module}:{n.lineno} builds a path to {n.value!r} next to __file__")
    assert not bad, "the installed package must not load files from the repo's bench/ folder:\n" + "\n".join(bad)
