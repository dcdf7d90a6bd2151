"""The package's layers, checked from the source: the core (tensors, autodiff, ops and the registry, the
compiler, kernels, backends, runtime) imports nothing from the layers built on it (nn, optim, data, io,
models, the CLI, ...), and the library layers import neither the models nor the CLI. Imports inside functions
and ``LazyModule("...")`` names count as imports."""
import ast
import os

import jitnet

ROOT = os.path.dirname(jitnet.__file__)

CORE = ("jitnet.tensor", "jitnet.ops", "jitnet.autodiff", "jitnet.compiler", "jitnet.kernels_cpu", "jitnet.kernels_gpu",
        "jitnet.kernels_scalar", "jitnet.kernels_conv", "jitnet.kernelgen", "jitnet.kernelgen_cuda",
        "jitnet.backend_cuda", "jitnet.cuda", "jitnet.runtime", "jitnet.lazy", "jitnet.blas", "jitnet.bounds",
        "jitnet.cache", "jitnet.random", "jitnet.lowp", "jitnet.winograd", "jitnet.nans_cuda", "jitnet.dlpack")
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
