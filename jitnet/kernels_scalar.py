"""Scalar helpers that the elementwise templates call (inlined into the generated kernels).

Generated kernels import only this module, and its hash salts their cache keys: editing the array kernels
in ``kernels_cpu.py`` does not invalidate any generated kernel, editing a helper here invalidates them all.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["fexp", "exp_f32", "tanh_v", "sigmoid_v", "floor_s", "fmod_raw", "sigmoid_s", "softplus_s", "sign_s",
           "maximum_s", "minimum_s", "combine_s", "floordiv_s", "ifloordiv_s", "imod_s", "fmod_s", "sgd_elem",
           "adagrad_elem", "rmsprop_elem", "adam_elem", "adamw_elem", "adam_scalars", "SHARED", "scalar"]


# --------------------------------------------------------------------------------------------------------------
# A vectorizable float32 exp. Numba's math.exp is a call into libm, which stops LLVM from vectorizing a loop;
# this one is branch-free arithmetic (Cody-Waite range reduction, a degree-6 polynomial on |r| <= ln2/2, and
# the power of two built in the exponent bits), within 4 ulp of the exact value, with exp(nan) = nan,
# exp(+inf) = inf and exp(-inf) = 0.
# --------------------------------------------------------------------------------------------------------------

@intrinsic
def _i32_as_f32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return sig, codegen


@njit(cache=True, inline="always")
def exp_f32(x):
    """Return exp(x) for a float32 x (vectorizable, within 4 ulp)."""
    xc = min(max(x, np.float32(-87.33654)), np.float32(88.72283))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))     # stays float32: vectorizes
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    ni = np.int32(n)
    h = ni >> 1
    s = p * _i32_as_f32((h + 127) << 23) * _i32_as_f32((ni - h + 127) << 23)
    s = np.float32(0.0) if x < np.float32(-87.33654) else s
    s = np.float32(np.inf) if x > np.float32(88.72283) else s
    return x if x != x else s


def fexp(x):
    """Return exp(x): the vectorizable float32 exp for float32, libm's exp otherwise."""
    return math.exp(x)


@overload(fexp, inline="always")
def _fexp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)

# --------------------------------------------------------------------------------------------------------------
# Vectorizable float32 tanh and sigmoid built on exp_f32 (libm's tanh is a call LLVM cannot vectorize: 20x
# slower over a row); other dtypes keep libm's functions (float64 is what the gradient checks use).
# --------------------------------------------------------------------------------------------------------------

def tanh_v(x):
    """Return tanh(x) (a vectorizable float32 version inside kernels)."""
    return math.tanh(x)


@njit(cache=True, inline="always", error_model="numpy")
def _tanh_f32(x):
    a = abs(x)
    e = exp_f32(np.float32(-2.0) * a)
    r = (np.float32(1.0) - e) / (np.float32(1.0) + e)        # accurate to a few ulp for |x| >= 0.125
    x2 = x * x                                                # odd Taylor series below 0.125 (error < 1e-9)
    p = x * (np.float32(1.0) + x2 * (np.float32(-1.0 / 3) + x2 * (np.float32(2.0 / 15)
                                                                    + x2 * np.float32(-17.0 / 315))))
    r = r if x >= np.float32(0.0) else -r
    r = p if a < np.float32(0.125) else r
    return x if x != x else r


@overload(tanh_v)
def _tanh_v_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


def sigmoid_v(x):
    """Return the logistic sigmoid of x (vectorizable for float32 inside kernels)."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f32(x):
    e = exp_f32(-abs(x))
    r = np.float32(1.0) / (np.float32(1.0) + e)
    return r if x >= np.float32(0.0) else e * r


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f64(x):
    e = math.exp(-abs(x))
    r = 1.0 / (1.0 + e)
    return r if x >= 0.0 else e * r


@overload(sigmoid_v)
def _sigmoid_v_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: _sigmoid_f64(x)


# --------------------------------------------------------------------------------------------------------------
# Scalar helpers used by the elementwise templates (inlined into the generated kernels), and the per-element
# optimizer updates. Each body is written once, here, and compiled for both targets: for the CPU by the
# ``@scalar`` decorator below (``njit(inline="always")``), for CUDA by ``kernels_gpu.device_form`` (a CUDA
# device function of the same Python body whose calls to the target-dependent primitives ``fexp``,
# ``floor_s``, ``fmod_raw`` resolve to the GPU's forms). A body may call only those primitives, ``math``,
# and other helpers of this section.
# --------------------------------------------------------------------------------------------------------------

#: Python bodies of the helpers shared with kernels_gpu, by name (the CUDA forms are compiled from these)
SHARED = {}


def scalar(fn=None, **flags):
    """Compile ``fn`` as an inlined CPU helper and record its Python body in :data:`SHARED` for the CUDA form."""
    def wrap(f):
        SHARED[f.__name__] = f
        return njit(cache=True, inline="always", **flags)(f)
    return wrap(fn) if fn is not None else wrap


@njit(cache=True, inline="always")
def floor_s(x):
    """Return floor(x) as a float (NaN and inf unchanged)."""
    return np.floor(x)


@njit(cache=True, inline="always")
def fmod_raw(a, b):
    """Return C's fmod(a, b) (NaN when b is 0 or a is infinite)."""
    return np.fmod(a, b)


@scalar
def sigmoid_s(x, one):
    """Return the logistic sigmoid of x, stable for large |x|."""
    z = fexp(-abs(x))
    return one / (one + z) if x >= 0 else z / (one + z)


@scalar
def softplus_s(x, zero):
    """Return log(1 + exp(x)), stable for large |x|."""
    m = x if x > zero else zero
    return m + math.log1p(fexp(-abs(x)))


@scalar
def sign_s(x, zero):
    """Return -1, 0 or 1 with the sign of x (NaN stays NaN)."""
    if x > zero:
        return zero + 1
    if x < zero:
        return zero - 1
    return x * zero


@scalar
def maximum_s(a, b):
    """Return the larger of a and b, NaN if either is NaN (NumPy's maximum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@scalar
def minimum_s(a, b):
    """Return the smaller of a and b, NaN if either is NaN (NumPy's minimum)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@scalar
def combine_s(acc, v, op):
    """Combine two partial reductions: op 0 sum, 1 product, 2 max, 3 min (NaN wins in max and min)."""
    if op == 0:
        return acc + v
    if op == 1:
        return acc * v
    if op == 2:
        return maximum_s(acc, v)
    return minimum_s(acc, v)


@scalar
def floordiv_s(a, b):
    """Return floor(a / b) (NumPy's floor_divide for floats)."""
    return floor_s(a / b)


@scalar
def ifloordiv_s(a, b):
    """Return a // b for integers, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a // b


@scalar
def imod_s(a, b):
    """Return a mod b for integers with the sign of b, 0 where b == 0 (NumPy's convention)."""
    if b == 0:
        return a * 0
    return a % b


@scalar
def fmod_s(a, b):
    """Return a mod b for floats with the sign of b (NumPy's remainder)."""
    r = fmod_raw(a, b)
    if r != 0 and ((r < 0) != (b < 0)):
        r += b
    return r


# -- optimizer updates of element i, in place over 1-D views of the parameter, its gradient and its slots ------
# The CPU kernels (kernels_cpu.*_update, serial, prange and sparse-row forms) and the CUDA kernels
# (kernels_gpu.*_update, grid-stride loops) call these; scalars arrive in the parameter's dtype.

_FM = {"reassoc", "nsz", "arcp", "contract"}     # fast math without nnan/ninf: NaN and inf stay exact


@scalar(fastmath=_FM)
def sgd_elem(p, g, buf, i, lr, wd, momentum, omd, nesterov, use_mom):
    """p -= lr * (g + wd p), through a momentum buffer (optionally Nesterov) when use_mom."""
    gi = g[i]
    if wd != 0:
        gi = gi + wd * p[i]
    if use_mom:
        b = momentum * buf[i] + omd * gi
        buf[i] = b
        if nesterov:
            gi = gi + momentum * b
        else:
            gi = b
    p[i] = p[i] - lr * gi


@scalar(fastmath=_FM)
def adagrad_elem(p, g, acc, i, lr, wd, eps):
    """acc += g^2; p -= lr * g / (sqrt(acc) + eps)."""
    gi = g[i]
    if wd != 0:
        gi = gi + wd * p[i]
    a = acc[i] + gi * gi
    acc[i] = a
    p[i] = p[i] - lr * gi / (math.sqrt(a) + eps)


@scalar(fastmath=_FM)
def rmsprop_elem(p, g, ms, mg, mom, i, lr, wd, rho, omr, eps, momentum, centered, use_mom):
    """ms = rho ms + (1-rho) g^2 (centered: minus mg^2); p -= (momentum of) lr g / sqrt(ms + eps)."""
    gi = g[i]
    if wd != 0:
        gi = gi + wd * p[i]
    s = rho * ms[i] + omr * gi * gi
    ms[i] = s
    if centered:
        a = rho * mg[i] + omr * gi
        mg[i] = a
        s = s - a * a
        if s < 0:
            s = s * 0
    step = lr * gi / math.sqrt(s + eps)
    if use_mom:
        step = momentum * mom[i] + step
        mom[i] = step
    p[i] = p[i] - step


@scalar(fastmath=_FM)
def adam_elem(p, g, m, v, i, lr_c, wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps):
    """Adam: m, v moments; p -= lr_c * m / (sqrt(v) / sqrt(bc2) + eps) with lr_c = lr / bc1."""
    gi = g[i]
    if wd != 0:
        gi = gi + wd * p[i]
    mi = b1 * m[i] + omb1 * gi
    vi = b2 * v[i] + omb2 * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] = p[i] - lr_c * mi / (math.sqrt(vi) * inv_sqrt_bc2 + eps)


@scalar(fastmath=_FM)
def adamw_elem(p, g, m, v, i, lr_c, lr_wd, b1, omb1, b2, omb2, inv_sqrt_bc2, eps):
    """AdamW: p -= lr * wd * p (decoupled decay), then adam_elem's step without an L2 term."""
    gi = g[i]
    pi = p[i] - lr_wd * p[i]
    mi = b1 * m[i] + omb1 * gi
    vi = b2 * v[i] + omb2 * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] = pi - lr_c * mi / (math.sqrt(vi) * inv_sqrt_bc2 + eps)


@njit(cache=True, inline="always")
def adam_scalars(lr, step, beta1, beta2, eps, weight_decay, decoupled):
    """Return the scalars of adam_elem/adamw_elem for step ``step`` (from 1): Adam's bias correction, once.

    (lr / bc1, weight decay (AdamW: lr * weight_decay), beta1, 1 - beta1, beta2, 1 - beta2, 1 / sqrt(bc2), eps)
    with bc_k = 1 - beta_k ** step, in float64. The eager CPU and CUDA updates call the Python body
    (``adam_scalars.py_func``), a native driver calls this compiled form.
    """
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    wd = lr * weight_decay if decoupled else weight_decay
    return (lr / bc1, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 / math.sqrt(bc2), eps)
