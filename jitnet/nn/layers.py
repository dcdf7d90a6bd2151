"""Layers: Linear, Conv2d, pooling, BatchNorm, Dropout, Embedding, activations, Flatten."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..autodiff import core as _ad
from ..autodiff.core import no_grad
from ..tensor import Parameter, Tensor, _infer_array, float32
from . import functional as F
from . import init as I
from .embedding_ops import embedding
from .module import Module

__all__ = ["Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Dropout", "Embedding",
           "ReLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "LeakyReLU", "Identity", "Flatten",
           "get_initializer"]

_INITS = {"he": I.he_normal, "he_normal": I.he_normal, "he_uniform": I.he_uniform, "xavier": I.xavier_uniform,
          "xavier_uniform": I.xavier_uniform, "glorot": I.xavier_uniform, "xavier_normal": I.xavier_normal,
          "zeros": I.zeros, "normal": I.normal, "truncated_normal": I.truncated_normal, "uniform": I.uniform,
          "orthogonal": I.orthogonal}


def get_initializer(init):
    """Return the initializer function named by ``init`` ('he', 'xavier', ...) or ``init`` if callable."""
    if callable(init):
        return init
    try:
        return _INITS[init]
    except KeyError:
        raise ValueError(f"unknown initializer {init!r}; choose one of {sorted(_INITS)} or pass a function") \
            from None


def _param(init, shape, dtype, name, trainable=True):
    v = get_initializer(init)(shape, dtype=dtype)
    return Parameter(v, trainable=trainable, name=name)


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


class Linear(Module):
    """Fully connected layer y = x @ W + b with W of shape (in_features, out_features)."""

    def __init__(self, in_features, out_features, bias=True, init="xavier", dtype=float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.W = _param(init, (self.in_features, self.out_features), dtype, "W")
        self.b = Parameter(np.zeros(self.out_features, dtype), name="b") if bias else None

    def forward(self, x):
        """Return x @ W + b (x of shape (..., in_features))."""
        x = _t(x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Linear({self.in_features}, {self.out_features}): input of shape {x.shape} does "
                             f"not end in {self.in_features}")
        y = ops.matmul(x, self.W)
        if self.b is None:
            return y
        return y + (self.b if _ad._AUTOCAST is None else _ad._AUTOCAST.lower(self.b))   # (autocast: bias too)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.b is not None}"


class Conv2d(Module):
    """2-D convolution over NCHW images with W (out_channels, in_channels, KH, KW) and bias (out_channels,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 init="he", dtype=float32):
        super().__init__()
        k = F._pair(kernel_size, "kernel_size", "Conv2d")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), k
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.W = _param(init, (self.out_channels, self.in_channels) + k, dtype, "W")
        self.b = Parameter(np.zeros(self.out_channels, dtype), name="b") if bias else None

    def forward(self, x):
        """Return the convolution of x (N, C, H, W): shape (N, out_channels, OH, OW)."""
        x = _t(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d({self.in_channels}, {self.out_channels}): expected input (N, "
                             f"{self.in_channels}, H, W), got shape {x.shape}")
        return F.conv2d(x, self.W, self.b, self.stride, self.padding, self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}")


class MaxPool2d(Module):
    """Max pooling over NCHW windows (stride defaults to the window size)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        """Return the window maxima of x."""
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}"


class AvgPool2d(Module):
    """Average pooling over NCHW windows (stride defaults to the window size)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.count_include_pad = count_include_pad

    def forward(self, x):
        """Return the window means of x."""
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}"


class _BatchNorm(Module):
    """Batch normalization over axis 1; batch moments in training, moving averages in eval."""

    _ndims: tuple = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, dtype=float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        n = self.num_features
        self.gamma = Parameter(np.ones(n, dtype), name="gamma") if affine else None
        self.beta = Parameter(np.zeros(n, dtype), name="beta") if affine else None
        self.moving_mean = Parameter(np.zeros(n, dtype), trainable=False, name="moving_mean")
        self.moving_var = Parameter(np.ones(n, dtype), trainable=False, name="moving_var")

    def forward(self, x):
        """Return the normalized x; in training also update the moving averages (``Variable.assign``).

        moving = (1 - momentum) * moving + momentum * batch statistic (the variance one unbiased).
        """
        x = _t(x)
        name = type(self).__name__
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{name}({self.num_features}): expected input with {self._ndims} dims and "
                             f"{self.num_features} channels on axis 1, got shape {x.shape}")
        if not self.training:
            return F.batch_norm(x, self.moving_mean, self.moving_var, self.gamma, self.beta, self.eps)
        axes = (0,) + tuple(range(2, x.ndim))
        n = int(np.prod([x.shape[a] for a in axes]))
        if n < 2:
            raise ValueError(f"{name}: training needs more than one value per channel, got input shape {x.shape}")
        mean, var = F.batch_moments(x)
        m = self.momentum
        with no_grad():
            mm = ops.stop_gradient(mean)
            vv = ops.stop_gradient(var) * (n / (n - 1.0))
            self.moving_mean.assign(self.moving_mean * (1.0 - m) + mm * m)
            self.moving_var.assign(self.moving_var * (1.0 - m) + vv * m)
        # y = x * a + b per channel: the (C,)-sized algebra stays in ops, the two passes over x are primitives
        a = ops.reciprocal(ops.sqrt(var + self.eps))
        if self.gamma is not None:
            a = a * self.gamma
        b = -mean * a
        if self.beta is not None:
            b = b + self.beta
        return F.channel_affine(x, a, b)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) inputs over every axis but the channel axis 1."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of NCHW inputs over N, H and W per channel."""

    _ndims = (4,)


class Dropout(Module):
    """Inverted dropout: zero a fraction ``rate`` of entries in training and scale the rest by 1/(1-rate)."""

    def __init__(self, rate=0.5):
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x):
        """Return x with dropout applied in training mode, x itself in eval mode."""
        return F.dropout(x, self.rate, self.training)

    def extra_repr(self):
        return f"rate={self.rate}"


class Embedding(Module):
    """A lookup table W (num_embeddings, dim) whose rows are gathered by integer ids (sparse gradient)."""

    def __init__(self, num_embeddings, embedding_dim, init="normal_1", dtype=float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        shape = (self.num_embeddings, self.embedding_dim)
        if init == "normal_1":
            w = I.normal(shape, 0.0, 1.0, dtype=dtype)
        else:
            w = get_initializer(init)(shape, dtype=dtype)
        self.W = Parameter(w, name="W")

    def forward(self, ids):
        """Return the rows of W at ``ids``: shape ids.shape + (embedding_dim,)."""
        return embedding(self.W, ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class _Act(Module):
    _fn = None

    def forward(self, x):
        """Return the activation applied elementwise to x."""
        return type(self)._fn(x)


class ReLU(_Act):
    """max(x, 0) elementwise."""

    _fn = staticmethod(ops.relu)


class Sigmoid(_Act):
    """The logistic sigmoid elementwise."""

    _fn = staticmethod(ops.sigmoid)


class Tanh(_Act):
    """tanh elementwise."""

    _fn = staticmethod(ops.tanh)


class Identity(Module):
    """Returns its input unchanged."""

    def forward(self, x):
        """Return x."""
        return x


class LeakyReLU(Module):
    """x where x > 0, else negative_slope * x."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        """Return leaky_relu(x)."""
        return F.leaky_relu(x, self.negative_slope)


class Softmax(Module):
    """Softmax along ``axis`` (default the last)."""

    def __init__(self, axis=-1):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        """Return softmax(x, axis)."""
        return ops.softmax(x, self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"


class LogSoftmax(Softmax):
    """Log-softmax along ``axis`` (default the last)."""

    def forward(self, x):
        """Return log_softmax(x, axis)."""
        return ops.log_softmax(x, self.axis)


class Flatten(Module):
    """Merges axes start_axis..end_axis (default: all but the batch axis)."""

    def __init__(self, start_axis=1, end_axis=-1):
        super().__init__()
        self.start_axis, self.end_axis = start_axis, end_axis

    def forward(self, x):
        """Return x flattened from start_axis to end_axis."""
        return ops.flatten(_t(x), self.start_axis, self.end_axis)
