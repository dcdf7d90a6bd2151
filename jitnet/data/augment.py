"""Image augmentation for float32 NCHW batches, as Numba kernels.

Random parameters are drawn in Python from a ``numpy.random.Generator`` (one
value per image) and handed to the kernels as arrays, so a given generator
state always produces the same output.  Every function returns a new array
and leaves its input untouched.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from .. import lowp as _lowp

__all__ = [
    "center_crop",
    "per_image_standardization",
    "random_brightness",
    "random_contrast",
    "random_crop",
    "random_flip_left_right",
]


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


@njit(cache=True, parallel=True)
def _crop_kernel(x, off_y, off_x, out_h, out_w, pad, out):
    n, c, h, w = x.shape
    for i in prange(n):
        oy = off_y[i] - pad
        ox = off_x[i] - pad
        for ch in range(c):
            for r in range(out_h):
                sy = oy + r
                if sy < 0 or sy >= h:
                    for q in range(out_w):
                        out[i, ch, r, q] = 0.0
                    continue
                for q in range(out_w):
                    sx = ox + q
                    if sx < 0 or sx >= w:
                        out[i, ch, r, q] = 0.0
                    else:
                        out[i, ch, r, q] = x[i, ch, sy, sx]


@njit(cache=True, parallel=True)
def _flip_lr_kernel(x, flags, out):
    n, c, h, w = x.shape
    for i in prange(n):
        if flags[i]:
            for ch in range(c):
                for r in range(h):
                    for q in range(w):
                        out[i, ch, r, q] = x[i, ch, r, w - 1 - q]
        else:
            for ch in range(c):
                for r in range(h):
                    for q in range(w):
                        out[i, ch, r, q] = x[i, ch, r, q]


@njit(cache=True, parallel=True)
def _brightness_kernel(x, delta, out):
    n, c, h, w = x.shape
    for i in prange(n):
        d = delta[i]
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    out[i, ch, r, q] = x[i, ch, r, q] + d


@njit(cache=True, parallel=True)
def _contrast_kernel(x, factor, out):
    n, c, h, w = x.shape
    for i in prange(n):
        f = factor[i]
        for ch in range(c):
            s = 0.0
            for r in range(h):
                for q in range(w):
                    s += x[i, ch, r, q]
            mean = s / (h * w)
            for r in range(h):
                for q in range(w):
                    out[i, ch, r, q] = (x[i, ch, r, q] - mean) * f + mean


@njit(cache=True, parallel=True)
def _standardize_kernel(x, out):
    n, c, h, w = x.shape
    m = c * h * w
    min_std = 1.0 / math.sqrt(m)
    for i in prange(n):
        s = 0.0
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    s += x[i, ch, r, q]
        mean = s / m
        v = 0.0
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    d = x[i, ch, r, q] - mean
                    v += d * d
        std = math.sqrt(v / m)
        if std < min_std:
            std = min_std
        inv = 1.0 / std
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    out[i, ch, r, q] = (x[i, ch, r, q] - mean) * inv


# --------------------------------------------------------------------------- #
# Python front-ends: validation and parameter drawing
# --------------------------------------------------------------------------- #


def _as_batch(x: Any, fname: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 4:
        raise ValueError(f"{fname}: expected a 4-d NCHW batch, got an array with shape {arr.shape}")
    if not (_lowp.is_floating(arr.dtype) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{fname}: expected a real numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _crop_size(size: Any, h: int, w: int, fname: str, pad: int = 0) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        ch, cw = int(size), int(size)
    else:
        try:
            ch, cw = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"{fname}: size must be an int or a (height, width) pair, got {size!r}") from None
    if ch < 1 or cw < 1:
        raise ValueError(f"{fname}: crop size must be positive, got {(ch, cw)}")
    if ch > h + 2 * pad or cw > w + 2 * pad:
        extra = f" plus padding {pad}" if pad else ""
        raise ValueError(f"{fname}: crop size {(ch, cw)} is larger than the image size {(h, w)}{extra}")
    return ch, cw


def random_crop(x: Any, size: Any, rng: Any = None, padding: int = 0) -> np.ndarray:
    """Return a float32 (N, C, size_h, size_w) batch of crops at independent random offsets.

    ``padding`` zero-pads every side first (the usual CIFAR-style augmentation).
    """
    x = _as_batch(x, "random_crop")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"random_crop: padding must be a non-negative integer, got {padding!r}")
    pad = int(padding)
    n, c, h, w = x.shape
    ch, cw = _crop_size(size, h, w, "random_crop", pad)
    rng = _as_rng(rng)
    off_y = rng.integers(0, h + 2 * pad - ch + 1, size=n).astype(np.int64)
    off_x = rng.integers(0, w + 2 * pad - cw + 1, size=n).astype(np.int64)
    out = np.empty((n, c, ch, cw), dtype=np.float32)
    _crop_kernel(x, off_y, off_x, ch, cw, pad, out)
    return out


def center_crop(x: Any, size: Any) -> np.ndarray:
    """Return a float32 (N, C, size_h, size_w) batch cropped around the image centres."""
    x = _as_batch(x, "center_crop")
    n, c, h, w = x.shape
    ch, cw = _crop_size(size, h, w, "center_crop")
    off_y = np.full(n, (h - ch) // 2, dtype=np.int64)
    off_x = np.full(n, (w - cw) // 2, dtype=np.int64)
    out = np.empty((n, c, ch, cw), dtype=np.float32)
    _crop_kernel(x, off_y, off_x, ch, cw, 0, out)
    return out


def random_flip_left_right(x: Any, rng: Any = None, p: float = 0.5) -> np.ndarray:
    """Return a float32 batch where each image is mirrored horizontally with probability ``p``."""
    x = _as_batch(x, "random_flip_left_right")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_flip_left_right: p must be in [0, 1], got {p}")
    rng = _as_rng(rng)
    flags = (rng.random(x.shape[0]) < p).astype(np.uint8)
    out = np.empty_like(x)
    _flip_lr_kernel(x, flags, out)
    return out


def random_brightness(x: Any, max_delta: float, rng: Any = None) -> np.ndarray:
    """Return a float32 batch with a per-image delta drawn from [-max_delta, max_delta) added."""
    x = _as_batch(x, "random_brightness")
    if not (np.isfinite(max_delta) and max_delta >= 0):
        raise ValueError(f"random_brightness: max_delta must be a finite number >= 0, got {max_delta}")
    rng = _as_rng(rng)
    delta = rng.uniform(-max_delta, max_delta, size=x.shape[0]).astype(np.float32)
    out = np.empty_like(x)
    _brightness_kernel(x, delta, out)
    return out


def random_contrast(x: Any, lower: float, upper: float, rng: Any = None) -> np.ndarray:
    """Return a float32 batch with per-image contrast factors from [lower, upper) applied per channel.

    As in TensorFlow's ``adjust_contrast``: ``(x - mean) * factor + mean`` with
    the mean taken over each channel of each image.
    """
    x = _as_batch(x, "random_contrast")
    if not (np.isfinite(lower) and np.isfinite(upper)) or lower < 0 or upper < lower:
        raise ValueError(f"random_contrast: need 0 <= lower <= upper, got lower={lower}, upper={upper}")
    rng = _as_rng(rng)
    factor = rng.uniform(lower, upper, size=x.shape[0]).astype(np.float32)
    out = np.empty_like(x)
    _contrast_kernel(x, factor, out)
    return out


def per_image_standardization(x: Any) -> np.ndarray:
    """Return a float32 batch with each image scaled to ``(x - mean) / max(std, 1/sqrt(C*H*W))``."""
    x = _as_batch(x, "per_image_standardization")
    out = np.empty_like(x)
    if x.size:
        _standardize_kernel(x, out)
    return out


# Serial for small batches and when called from a DataLoader prefetch thread (Numba's workqueue layer takes
# parallel launches from one thread at a time).
from ..kernels_cpu import Adaptive as _Adaptive  # noqa: E402

_crop_kernel = _Adaptive(_crop_kernel)
_flip_lr_kernel = _Adaptive(_flip_lr_kernel)
_brightness_kernel = _Adaptive(_brightness_kernel)
_contrast_kernel = _Adaptive(_contrast_kernel)
_standardize_kernel = _Adaptive(_standardize_kernel)
