"""Graph IR of a traced step: values, nodes, and the graph that owns them."""
from __future__ import annotations

import numpy as np

__all__ = ["Value", "Node", "Graph"]


class Value:
    """A value in the graph: an argument, a variable read, a constant, or a node's output."""

    __slots__ = ("id", "shape", "dtype", "kind", "node", "const", "var", "arg_index", "after", "name", "device")

    def __init__(self, vid, shape, dtype, kind, node=None, const=None, var=None, arg_index=None, after=None):
        self.id = vid
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.kind = kind            # "arg", "state", "const", "node"
        self.node = node            # producing Node for kind == "node"
        self.const = const          # the array for kind == "const"
        self.var = var              # the Variable for kind == "state"
        self.arg_index = arg_index  # position among flattened tensor arguments for kind == "arg"
        self.after = after          # for a state read: the effect Node it must follow (or None)
        self.name = None
        self.device = "cpu"         # the device kind its array lives on (a ``jitnet.backends`` name)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def __repr__(self):
        return f"%{self.id}"


class Node:
    """One primitive application: ``out = prim(*inputs, **params)``; ``effects`` lists mutated variables."""

    __slots__ = ("id", "prim", "inputs", "params", "out", "effects", "order_deps", "alive", "where")

    def __init__(self, nid, prim, inputs, params, out=None, effects=()):
        self.id = nid
        self.prim = prim
        self.inputs = list(inputs)
        self.params = params
        self.out = out
        self.effects = tuple(effects)
        self.order_deps = set()     # nodes that must run before this one (write-after-read on variables)
        self.alive = True
        self.where = None           # the user's line (and forward op, for a backward op), under debug_nans

    @property
    def is_elementwise(self):
        return self.prim.kind == "elementwise"

    def __repr__(self):
        ps = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        ins = ", ".join(repr(v) for v in self.inputs)
        eff = f"  # writes {', '.join(getattr(v, 'name', None) or 'var' for v in self.effects)}" \
            if self.effects else ""
        out = f"{self.out!r}: {self.out.dtype}{list(self.out.shape)} = " if self.out is not None else ""
        return f"{out}{self.prim.name}({ins}{', ' if ps and ins else ''}{ps}){eff}"


def _short(v):
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}"
    r = repr(v)
    return r if len(r) < 40 else r[:37] + "..."


class Graph:
    """Values and nodes in trace order, the flattened outputs, and the variables the step writes."""

    def __init__(self):
        self.values: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []          # flattened returned tensors
        self.grad_outputs: list = []             # (variable, Value or None) to write back into .grad

    def new_value(self, shape, dtype, kind, **kw):
        v = Value(len(self.values), shape, dtype, kind, **kw)
        self.values.append(v)
        return v

    def new_node(self, prim, inputs, params, effects=()):
        n = Node(len(self.nodes), prim, inputs, params, effects=effects)
        self.nodes.append(n)
        return n

    def live_nodes(self):
        return [n for n in self.nodes if n.alive]

    def __str__(self):
        lines = []
        args = [v for v in self.values if v.kind == "arg"]
        states = [v for v in self.values if v.kind == "state"]
        lines.append("inputs: " + ", ".join(f"{v!r}: {v.dtype}{list(v.shape)}" for v in args))
        if states:
            lines.append("variables: " + ", ".join(f"{v!r}={v.var.name or 'var'}: {v.dtype}{list(v.shape)}"
                                                   for v in states))
        for n in self.live_nodes():
            lines.append("  " + repr(n))
        lines.append("outputs: " + ", ".join(repr(v) for v in self.outputs))
        return "\n".join(lines)
