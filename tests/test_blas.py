"""jitnet.blas.gemm: the in-kernel matrix product on NumPy's BLAS, for every operand layout it accepts."""
from __future__ import annotations

import numpy as np
import pytest

from jitnet import blas


def _layouts(a):
    """a itself, column-major, a view with padded rows, reversed rows (negative stride: copied), a transpose of
    a transpose with a padded leading dimension."""
    m, k = a.shape
    return [a, np.asfortranarray(a), np.pad(a, ((0, 0), (0, 3)))[:, :k], a[::-1],
            np.pad(np.ascontiguousarray(a.T), ((0, 0), (0, 2)))[:, :m].T]


def _outs(m, n, dtype):
    return [np.full((m, n), np.nan, dtype), np.full((n, m), np.nan, dtype).T,
            np.full((m, n + 2), np.nan, dtype)[:, :n], np.full((m, 2 * n), np.nan, dtype)[:, ::2]]


_SHAPES = [(5, 7, 3), (1, 4, 1), (6, 1, 5), (0, 3, 2), (3, 0, 2), (4, 3, 0)]


# Every combination of operand layouts (C, F or any-strided to Numba) is its own specialization, ~2 s to
# compile each: the slow tests check every combination in both dtypes; the default run checks each layout of
# each operand once (a cyclic pairing), float32.
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", _SHAPES)
def test_gemm_matches_numpy_for_every_layout(dtype, m, k, n):
    r = np.random.default_rng(m * 100 + k * 10 + n)
    A = r.standard_normal((m, k)).astype(dtype)
    B = r.standard_normal((k, n)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a in _layouts(A):
        for b in _layouts(B):
            for o in _outs(m, n, dtype):
                blas.gemm(a, b, o)
                np.testing.assert_allclose(o, a @ b, rtol=tol, atol=tol)


@pytest.mark.parametrize("m,k,n", _SHAPES)
def test_gemm_matches_numpy_for_each_layout(m, k, n):
    r = np.random.default_rng(m * 100 + k * 10 + n)
    A = r.standard_normal((m, k)).astype(np.float32)
    B = r.standard_normal((k, n)).astype(np.float32)
    las, lbs, outs = _layouts(A), _layouts(B), _outs(m, n, np.float32)
    for i in range(len(las)):
        a, b, o = las[i], lbs[(i + 1) % len(lbs)], outs[i % len(outs)]
        blas.gemm(a, b, o)
        np.testing.assert_allclose(o, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (0, 3, 2)])
def test_gemm_float64_common_layouts(m, k, n):
    r = np.random.default_rng(m * 100 + k * 10 + n)
    A, B = r.standard_normal((m, k)), r.standard_normal((k, n))
    for a, b in ((A, B), (np.asfortranarray(A), B[::-1][::-1])):
        o = np.full((m, n + 2), np.nan)[:, :n]
        blas.gemm(a, b, o)
        np.testing.assert_allclose(o, a @ b, rtol=1e-12, atol=1e-12)


def test_numpy_blas_found_where_numpy_ships_openblas():
    import numpy
    cfg = numpy.show_config(mode="dicts")
    name = cfg.get("Build Dependencies", {}).get("blas", {}).get("name", "")
    if "openblas" not in name:
        pytest.skip(f"NumPy is built on {name or 'an unknown BLAS'}: gemm falls back to np.dot")
    assert blas.HAVE_NUMPY_BLAS, "NumPy ships OpenBLAS but jitnet.blas did not find its cblas_?gemm"
