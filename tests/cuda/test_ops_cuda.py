"""The op suite on the GPU: the very test functions of tests/test_ops.py and tests/test_ops_nn.py, collected here
so that they run with ``device`` = "cuda" (tests/cuda/conftest.py), in the simulator or on a real GPU. They check
every primitive's CUDA kernel forward against NumPy and its gradient against central differences, on tiny shapes
with fewer hypothesis examples (tests/helpers.py). A test that reaches a row without a CUDA implementation is
skipped with the row's ``no_cuda`` reason. Checks of CUDA kernels alone are in test_cuda_kernels.py.
"""
from test_ops import *  # noqa: F401,F403  (tests/ is on sys.path: tests/cuda/conftest.py)
from test_ops_nn import *  # noqa: F401,F403
