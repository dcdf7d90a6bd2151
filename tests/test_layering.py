"""The package's layers, checked from the source: the core (tensors, autodiff, ops and the registry, the
compiler, kernels, backends, runtime) imports nothing from the layers built on it (nn, optim, data, io,
models, the CLI, ...), and the library layers import neither the models nor the CLI. Imports inside functions
and ``LazyModule("...")`` names count as imports.

The import graph of every jitnet module (module-level imports, imports inside functions and ``LazyModule``
handles) has no cycle, and a function imports a jitnet module only where the allow-list below says why."""
import ast
import os

import jitnet

ROOT = os.path.dirname(jitnet.__file__)

CORE = ("jitnet.tensor", "jitnet.ops", "jitnet.autodiff", "jitnet.compiler", "jitnet.kernels_cpu", "jitnet.kernels_gpu",
        "jitnet.kernels_scalar", "jitnet.kernels_conv", "jitnet.kernelgen", "jitnet.kernelgen_cuda",
        "jitnet.backend_cuda", "jitnet.cuda", "jitnet.runtime", "jitnet.lazy", "jitnet.blas", "jitnet.bounds",
        "jitnet.cache", "jitnet.random", "jitnet.lowp", "jitnet.winograd", "jitnet.nans_cuda", "jitnet.dlpack",
        "jitnet.cuda_runtime")
LIBRARY = ("jitnet.nn", "jitnet.optim", "jitnet.data", "jitnet.io", "jitnet.distributed", "jitnet.export",
           "jitnet.interop")
APPS = ("jitnet.models", "jitnet.__main__", "jitnet.warmup")


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[:-9] if rel.endswith(".__init__") else rel), path, f == "__init__.py"


def _imports(name, path, is_pkg):
    """Yield (line, imported module) for every import in the file, at any depth, and LazyModule names."""
    tree = ast.parse(open(path).read())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            yield n.lineno, mod
            for a in n.names:                          # `from . import nn` imports jitnet.nn
                yield n.lineno, f"{mod}.{a.name}"
        elif isinstance(n, ast.Import):
            for a in n.names:
                yield n.lineno, a.name
        elif isinstance(n, ast.Call) and getattr(n.func, "id", None) == "LazyModule" and n.args \
                and isinstance(n.args[0], ast.Constant):
            yield n.lineno, n.args[0].value


def _violations(lower, upper):
    bad = []
    for name, path, is_pkg in _modules():
        if not _within(name, lower):
            continue
        for line, mod in _imports(name, path, is_pkg):
            if _within(mod, upper):
                bad.append(f"{name}:{line} imports {mod}")
    return sorted(set(bad))


def test_the_core_imports_nothing_from_the_layers_above_it():
    assert not _violations(CORE, LIBRARY + APPS + ("jitnet.habits", "jitnet.onnx", "jitnet.testing"))


def test_the_library_imports_neither_the_models_nor_the_command_line():
    assert not _violations(LIBRARY, APPS)


def test_the_checker_sees_imports_inside_functions_and_lazy_names(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .nn import layers\n_G = LazyModule('jitnet.models.vision')\n")
    found = {m for _, m in _imports("jitnet.m", str(src), False)}
    assert "jitnet.nn" in found and "jitnet.nn.layers" in found and "jitnet.models.vision" in found


# ----------------------------------------------------------------------------------------------------------------
# The import graph: no module imports (at any depth) a module that imports it back
# ----------------------------------------------------------------------------------------------------------------

#: Function-level imports of jitnet modules that are allowed: (importing module, imported module) -> reason. None
#: is: a function-level import is for an optional third-party dependency (torch, mpi4py, onnx, ...), and a jitnet
#: module deferred for start-up speed is a module-level ``LazyModule`` handle instead.
FUNCTION_IMPORTS_ALLOWED: dict = {}


def _import_targets(name, is_pkg, node, known):
    """Return the jitnet modules an Import/ImportFrom node (or a LazyModule call) of module ``name`` loads."""
    if isinstance(node, ast.Call):
        mods = [node.args[0].value]
    elif isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
    else:
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        mods = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    out = set()
    for m in mods:
        if not (m == "jitnet" or m.startswith("jitnet.")):
            continue
        while m not in known and "." in m:          # a name inside a module: the module
            m = m.rpartition(".")[0]
        # importing a.b.c runs the __init__ of a.b first: every package above the target is loaded too, except
        # the packages the importer itself lives in (already loading) and the top-level jitnet (loaded first)
        parts = m.split(".")
        for k in range(2, len(parts) + 1):
            anc = ".".join(parts[:k])
            if anc != name and not (name + ".").startswith(anc + ".") and anc in known:
                out.add(anc)
    return out


def _module_imports(name, is_pkg, tree, known):
    """Return (the jitnet modules module ``name`` imports at any depth or names in a LazyModule, [(line, module)
    for its imports inside functions])."""
    targets, in_functions = set(), []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = _import_targets(name, is_pkg, child, known)
                targets.update(found)
                if in_function:
                    in_functions.extend((child.lineno, t) for t in sorted(found))
            elif isinstance(child, ast.Call) and getattr(child.func, "id", None) == "LazyModule" and child.args \
                    and isinstance(child.args[0], ast.Constant):
                targets.update(_import_targets(name, is_pkg, child, known))
            walk(child, inner)

    walk(tree, False)
    targets.discard(name)
    return targets, in_functions


def _graph():
    """Return ({module: {imported jitnet modules}}, [(module, line, imported module) of function-level imports])."""
    files = {name: (path, is_pkg) for name, path, is_pkg in _modules()}
    edges, in_functions = {}, []
    for name, (path, is_pkg) in files.items():
        edges[name], inner = _module_imports(name, is_pkg, ast.parse(open(path).read()), set(files))
        in_functions += [(name, line, t) for line, t in inner]
    return edges, in_functions


def _cycles(edges):
    """Return the strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _a_cycle(edges, comp):
    """Return one cycle through the modules of ``comp`` as a list a -> b -> ... -> a (a shortest one from its first)."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_the_import_graph_has_no_cycle():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(_a_cycle(edges, c)) for c in cycles)


def test_functions_import_no_jitnet_module_outside_the_allow_list():
    _, in_functions = _graph()
    bad = [f"{m}:{line} imports {t}" for m, line, t in in_functions if (m, t) not in FUNCTION_IMPORTS_ALLOWED]
    assert not bad, "function-level imports of jitnet modules (import at module level, or use a module-level " \
                    "LazyModule handle):\n" + "\n".join(bad)


def test_the_graph_sees_packages_lazy_handles_function_imports_and_cycles():
    known = {"jitnet.a", "jitnet.a.b", "jitnet.c"}
    imp = ast.parse("from .a import b").body[0]
    assert _import_targets("jitnet.c", False, imp, known) == {"jitnet.a", "jitnet.a.b"}   # the package's __init__
    assert _import_targets("jitnet.a.x", False, ast.parse("from . import b").body[0], known) == {"jitnet.a.b"}
    lazy = ast.parse("LazyModule('jitnet.a.b.f')").body[0].value
    assert _import_targets("jitnet.c", False, lazy, known) == {"jitnet.a", "jitnet.a.b"}
    tree = ast.parse("import numpy\nfrom . import c\n_H = LazyModule('jitnet.a.b')\n"
                     "def f():\n    import torch\n    from .a.b import g\n")
    assert _module_imports("jitnet.m", False, tree, known | {"jitnet.m"}) == (
        {"jitnet.c", "jitnet.a", "jitnet.a.b"}, [(6, "jitnet.a"), (6, "jitnet.a.b")])   # torch: not jitnet
    g = {"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}
    assert _cycles(g) == [["x", "y", "z"]] and _a_cycle(g, ["x", "y", "z"]) == ["x", "y", "z", "x"]
    assert _cycles({"x": {"y"}, "y": set()}) == []


def test_model_modules_hold_models_not_kernels_or_rows():
    # The models are built from the library: their kernels live in the kernel layer, their rows in the registry.
    models = os.path.join(os.path.dirname(jitnet.__file__), "models")
    found = []
    for name in sorted(os.listdir(models)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(models, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    src = ast.unparse(d)
                    if "njit" in src or "cuda.jit" in src or src.startswith("jit(") or "vectorize" in src:
                        found.append(f"{name}:{node.lineno} @{src}")
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                if fn.endswith("Primitive") or fn.endswith("elementwise") or fn.endswith("_update_prim"):
                    found.append(f"{name}:{node.lineno} {fn}(...)")
    assert not found, "kernels or registry rows in model modules: " + ", ".join(found)
