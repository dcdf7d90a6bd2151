"""Recurrent layers: RNNCell / LSTMCell / GRUCell and batch-first multi-layer RNN / LSTM / GRU.

The LSTM runs its whole sequence in one fused primitive (``F.lstm_seq``: the input projection of every step
is one GEMM first, then one kernel call runs the steps forward and one the reverse loop backward). The GRU
and RNN run one clean per-step function (``F.gru_cell``, ``F.rnn_cell``) over time with ``jn.scan``: a Python
loop eagerly, one compiled loop under ``jitnet.jit``. ``lengths=`` or ``mask=`` (batch, time) stop the state
of finished rows (their outputs are zero past their length and the final state is the one at their last valid
step).
Weights: W_ih (in, G*H), W_hh (H, G*H) with gates in the order [i, f, g, o] (LSTM) and [r, z, n] (GRU).
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..compiler.loops import scan
from ..tensor import Parameter, Tensor, _infer_array, float32
from . import functional as F
from . import init as I
from .module import Module

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU"]


def _t(x):
    return x if isinstance(x, Tensor) else Tensor._wrap(_infer_array(x))


def _uniform(shape, hidden, dtype):
    a = 1.0 / math.sqrt(hidden)
    return Parameter(I.uniform(shape, -a, a, dtype=dtype))


class _CellBase(Module):
    _gates = 1

    def __init__(self, input_size, hidden_size, dtype=float32):
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        g = self._gates * self.hidden_size
        self.W_ih = _uniform((self.input_size, g), self.hidden_size, dtype)
        self.W_hh = _uniform((self.hidden_size, g), self.hidden_size, dtype)

    def _check(self, x):
        x = _t(x)
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"{type(self).__name__}({self.input_size}, {self.hidden_size}): expected input "
                             f"(batch, {self.input_size}), got shape {x.shape}")
        return x

    def _zeros(self, x):
        return ops.zeros((x.shape[0], self.hidden_size), self.W_hh.dtype, device=x.device)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}"


class RNNCell(_CellBase):
    """Elman cell h' = act(x @ W_ih + h @ W_hh + b) with act 'tanh' or 'relu'."""

    def __init__(self, input_size, hidden_size, nonlinearity="tanh", dtype=float32):
        super().__init__(input_size, hidden_size, dtype)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.b = Parameter(np.zeros(self.hidden_size, dtype))

    def forward(self, x, h=None):
        """Return the next hidden state (batch, hidden_size)."""
        x = self._check(x)
        h = self._zeros(x) if h is None else h
        return F.rnn_cell(x, h, self.W_ih, self.W_hh, self.b, self.nonlinearity)


class LSTMCell(_CellBase):
    """LSTM cell with gates [i, f, g, o]; the forget-gate bias starts at ``forget_bias``."""

    _gates = 4

    def __init__(self, input_size, hidden_size, forget_bias=1.0, dtype=float32):
        super().__init__(input_size, hidden_size, dtype)
        b = np.zeros(4 * self.hidden_size, dtype)
        b[self.hidden_size:2 * self.hidden_size] = forget_bias
        self.b = Parameter(b)

    def forward(self, x, state=None):
        """Return the next (h, c), each (batch, hidden_size)."""
        x = self._check(x)
        h, c = (self._zeros(x), self._zeros(x)) if state is None else state
        return F.lstm_cell(x, h, c, self.W_ih, self.W_hh, self.b)


class GRUCell(_CellBase):
    """GRU cell with gates [r, z, n] (PyTorch's equations, separate input and hidden biases)."""

    _gates = 3

    def __init__(self, input_size, hidden_size, dtype=float32):
        super().__init__(input_size, hidden_size, dtype)
        self.b_ih = Parameter(np.zeros(3 * self.hidden_size, dtype))
        self.b_hh = Parameter(np.zeros(3 * self.hidden_size, dtype))

    def forward(self, x, h=None):
        """Return the next hidden state (batch, hidden_size)."""
        x = self._check(x)
        h = self._zeros(x) if h is None else h
        return F.gru_cell(x, h, self.W_ih, self.W_hh, self.b_ih, self.b_hh)


def _sequence_mask(x, lengths, mask, op):
    """Return the (batch, time) float mask as a NumPy array, or None when every step is valid."""
    b, t = x.shape[0], x.shape[1]
    if lengths is not None and mask is not None:
        raise ValueError(f"{op}: give lengths= or mask=, not both")
    if lengths is not None:
        ln = np.asarray(_t(lengths).numpy()).reshape(-1)
        if ln.shape != (b,):
            raise ValueError(f"{op}: lengths must have shape ({b},), got {ln.shape}")
        if (ln < 0).any() or (ln > t).any():
            raise ValueError(f"{op}: lengths must be in [0, {t}], got {ln.tolist()}")
        m = (np.arange(t)[None, :] < ln[:, None])
    elif mask is not None:
        m = np.asarray(_t(mask).numpy()).astype(bool)
        if m.shape != (b, t):
            raise ValueError(f"{op}: mask must have shape ({b}, {t}), got {m.shape}")
    else:
        return None
    if m.all():
        return None
    return m.astype(x.dtype)


class _SeqBase(Module):
    """Shared plumbing of the sequence layers: each runs its cell over time with ``jn.scan``."""

    _cell = None

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, dtype=float32, **cell_kw):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.dropout = float(dropout)
        for i in range(self.num_layers):
            cell = self._cell(self.input_size if i == 0 else self.hidden_size, self.hidden_size, dtype=dtype,
                              **cell_kw)
            self.add_module(f"layer_{i}", cell)

    def cells(self):
        """Return the per-layer cells."""
        return [getattr(self, f"layer_{i}") for i in range(self.num_layers)]

    def _prepare(self, x, lengths, mask):
        x = _t(x)
        name = type(self).__name__
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"{name}({self.input_size}, {self.hidden_size}): expected batch-first input "
                             f"(batch, time, {self.input_size}), got shape {x.shape}")
        if x.dtype != self.layer_0.W_ih.dtype:
            x = x.astype(self.layer_0.W_ih.dtype)
        return x, _sequence_mask(x, lengths, mask, name)

    @staticmethod
    def _time_major(x, m):
        """Return x as (time, batch, features) and the mask as (time, batch) (or None)."""
        seq = ops.transpose(x, (1, 0, 2))
        mt = None if m is None else Tensor._wrap(np.ascontiguousarray(m.T))
        if mt is not None and x.is_cuda:                # (a host mask: one copy to the device per call)
            mt = mt.to(x.device)
        return seq, mt

    def _run_h(self, x, h0, lengths, mask, cell_fn):
        """Run ``h = cell_fn(x_t, h, cell)`` over time for every layer; return (outputs, final h per layer)."""
        x, m = self._prepare(x, lengths, mask)
        seq, mt = self._time_major(x, m)
        finals = []
        for i, cell in enumerate(self.cells()):
            h = ops.zeros((x.shape[0], self.hidden_size), x.dtype, device=x.device) if h0 is None else _t(h0)[i]

            def body(h, inp, cell=cell):
                xt, mk = inp if mt is not None else (inp, None)
                hn = cell_fn(xt, h, cell)
                h = hn if mk is None else ops.where(ops.reshape(mk, (-1, 1)) > 0, hn, h)
                return h, h
            h, seq = scan(body, h, seq if mt is None else (seq, mt))
            finals.append(h)
            seq = self._between(seq, i)
        return self._outputs(seq, m), ops.stack(finals)

    def _between(self, seq, i):
        if self.dropout and self.training and i < self.num_layers - 1:
            return F.dropout(seq, self.dropout, True)
        return seq

    def _outputs(self, seq, m):
        out = ops.transpose(seq, (1, 0, 2))
        if m is not None:
            mk = Tensor._wrap(m[:, :, None])
            out = out * (mk.to(out.device) if out.is_cuda else mk)
        return out

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first=True"


class RNN(_SeqBase):
    """Multi-layer Elman RNN over batch-first sequences; returns (outputs (B, T, H), h (layers, B, H))."""

    _cell = RNNCell

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", dropout=0.0,
                 dtype=float32):
        super().__init__(input_size, hidden_size, num_layers, dropout, dtype, nonlinearity=nonlinearity)

    def forward(self, x, h0=None, lengths=None, mask=None):
        """Return (outputs (batch, time, hidden), final h (num_layers, batch, hidden))."""
        return self._run_h(x, h0, lengths, mask,
                           lambda xt, h, c: F.rnn_cell(xt, h, c.W_ih, c.W_hh, c.b, c.nonlinearity))


class GRU(_SeqBase):
    """Multi-layer GRU over batch-first sequences; returns (outputs (B, T, H), h (layers, B, H))."""

    _cell = GRUCell

    def forward(self, x, h0=None, lengths=None, mask=None):
        """Return (outputs (batch, time, hidden), final h (num_layers, batch, hidden))."""
        return self._run_h(x, h0, lengths, mask,
                           lambda xt, h, c: F.gru_cell(xt, h, c.W_ih, c.W_hh, c.b_ih, c.b_hh))


class LSTM(_SeqBase):
    """Multi-layer LSTM over batch-first sequences; returns (outputs (B, T, H), (h, c) each (layers, B, H)).

    Each step is ``z = x_t W_ih + h W_hh + b``: the input projection of all steps is one GEMM up front, then
    ``F.lstm_seq`` runs every step (a BLAS call and one fused gate pass each) in one kernel call, and its
    backward is one reverse loop plus one GEMM over all steps for ``W_hh``'s gradient, eagerly and under
    ``jitnet.jit`` alike (so a jitted step compiles once whatever the length).
    """

    _cell = LSTMCell

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, forget_bias=1.0, dtype=float32):
        super().__init__(input_size, hidden_size, num_layers, dropout, dtype, forget_bias=forget_bias)

    def forward(self, x, state=None, lengths=None, mask=None):
        """Return (outputs (batch, time, hidden), (h, c) with each (num_layers, batch, hidden))."""
        x, m = self._prepare(x, lengths, mask)
        seq, mt = self._time_major(x, m)
        bsz, hd = x.shape[0], self.hidden_size
        hs_final, cs_final = [], []
        for i, cell in enumerate(self.cells()):
            if state is None:
                h = c = ops.zeros((bsz, hd), x.dtype, device=x.device)
                s0 = ops.zeros((bsz, 6 * hd), x.dtype, device=x.device)      # the packed zero state
            else:
                h, c = _t(state[0])[i], _t(state[1])[i]
                s0 = F.lstm_state(h, c)
            xw = ops.matmul(seq, cell.W_ih)            # the input projection of every step: one GEMM
            if seq.shape[0] == 0:
                seq = ops.zeros((0, bsz, hd), x.dtype, device=x.device)
            else:                                      # every step in one primitive (a kernel call each way)
                S = F.lstm_seq(xw, s0, cell.W_hh, cell.b, mask=mt)
                seq, h, c = S[:, :, :hd], S[-1, :, :hd], S[-1, :, hd:2 * hd]
            hs_final.append(h)
            cs_final.append(c)
            seq = self._between(seq, i)
        return self._outputs(seq, m), (ops.stack(hs_final), ops.stack(cs_final))
