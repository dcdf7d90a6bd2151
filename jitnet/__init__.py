"""jitnet: a deep-learning library whose tensor ops and gradients are Numba kernels.

Eager like NumPy; ``jitnet.jit`` compiles a whole step. See README.md.
"""
__version__ = "0.1.0"

import warnings as _warnings  # noqa: E402

from numba.core.errors import NumbaPerformanceWarning as _NPW  # noqa: E402

# Numba's advice about jitnet's own kernels (e.g. np.dot on strided views) is for jitnet's developers, not
# its users; the kernels that trigger it handle those layouts on purpose. Numba reports a compile warning at
# the compiled function's file (warn_explicit: the "module" is that path without ".py"), so the filter is
# limited to jitnet's package and its generated kernels: other code's Numba warnings still show.
_warnings.filterwarnings("ignore", category=_NPW, module=r".*([/\\]jitnet[/\\]|[/\\]jitnet_k_)")
# Numba's SSA pass flags a phi variable of the vectorizable float32 exp (kernels_scalar.fexp) as "not in scope"
# (a pedantic internal check; the compiled code is tested against NumPy): not something a user can act on.
_warnings.filterwarnings("ignore", message=r".*variable '_fexp_overload", module=r"numba\.core\.ssa")

from . import runtime  # noqa: E402  (first: selects Numba's threading layer before any kernel runs)
from . import autodiff, kernelgen, ops, random, testing  # noqa: E402
from .autodiff import enable_grad, is_grad_enabled, no_grad  # noqa: E402
from .autodiff.backprop import grad, gradients, value_and_grad  # noqa: E402
from .autodiff.nans import debug_nans, debug_nans_enabled  # noqa: E402
from .ops import *  # noqa: E402,F401,F403
from .ops import __all_ops__ as _ops_names  # noqa: E402
from .tensor import (Device, Parameter, Tensor, Variable, as_tensor, bfloat16, bool_, device, float16,  # noqa: E402
                     float32, float64, get_default_device, get_default_dtype, int8, int32, int64,
                     set_default_device, tensor, uint8)
from . import cuda  # noqa: E402  (no numba.cuda import until a GPU is used)
from .dlpack import from_dlpack  # noqa: E402
from .autocast import autocast  # noqa: E402
from . import nn  # noqa: E402
from .runtime import (compile_stats, denormals_flushed, flush_denormals, get_num_threads,  # noqa: E402
                      set_malloc_tuning, set_num_threads)
from . import data, io  # noqa: E402
from . import onnx  # noqa: E402  (ONNX export; the onnx package is imported only when exporting)
from . import optim  # noqa: E402
from .autodiff.sparse import IndexedSlices  # noqa: E402
from .compiler import TracingError, explain, jit  # noqa: E402
from .compiler.loops import scan, while_loop  # noqa: E402
from . import habits  # noqa: E402  (PyTorch spellings: cat, permute, dim=, x[i] = v, x.at[i].set)
from .habits import *  # noqa: E402,F401,F403
from . import cache  # noqa: E402
from .cache import CacheRepairWarning  # noqa: E402
from . import runtime as _runtime  # noqa: E402

cache.protect_loaded()                # jitnet's kernels check and repair their Numba cache files (theirs only)

_runtime._flush_on_import()           # FTZ/DAZ only with JITNET_FLUSH_DENORMALS=1 (the process's FP environment)
_runtime._tune_malloc_on_import()     # malloc tuning only with JITNET_MALLOC_TUNING=1 (the process's allocator)


def save(state, path, metadata=None):
    """Save a dict of tensors (nested dicts flatten to 'a/b' names) to a safetensors file; return the path."""
    return io.save(state, path, metadata)


def load(path):
    """Load a safetensors file into a dict of tensors (no code runs while loading)."""
    return {k: Tensor(v) for k, v in io.load(path).items()}


def __getattr__(name):
    err = habits.unsupported(name)
    if err is not None:
        raise err
    raise AttributeError(f"module 'jitnet' has no attribute {name!r}")
