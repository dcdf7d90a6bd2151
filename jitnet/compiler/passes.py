"""Graph passes: dead-code elimination, common-subexpression elimination, elementwise fusion.

Constant folding happens while tracing (an op whose inputs are all constants is computed then and becomes
a constant), so these passes see only work that depends on the step's inputs and variables.
"""
from __future__ import annotations

import numpy as np

from .ir import Graph, Node

__all__ = ["dce", "cse", "fuse", "absorb_views", "FusionGroup"]


def _roots(g: Graph):
    roots = [v.node for v in g.outputs if v.kind == "node"]
    roots += [v.node for v in _grad_values(g) if v.kind == "node"]
    roots += [n for n in g.nodes if n.effects]
    return roots


def _grad_values(g):
    """Return the Values written back into .grad (both parts of a sparse gradient)."""
    out = []
    for _, v in g.grad_outputs:
        if isinstance(v, tuple):
            out += [v[1], v[2]]
        elif v is not None:
            out.append(v)
    return out


def dce(g: Graph) -> int:
    """Mark nodes that no output, gradient write-back or variable update needs as dead; return how many."""
    live = set()
    stack = [n for n in _roots(g) if n is not None]
    while stack:
        n = stack.pop()
        if n.id in live:
            continue
        live.add(n.id)
        for v in n.inputs:
            if v.kind == "node" and v.node.id not in live:
                stack.append(v.node)
        for d in n.order_deps:
            if d.effects and d.id not in live:
                stack.append(d)
    removed = 0
    for n in g.nodes:
        if n.alive and n.id not in live:
            n.alive = False
            removed += 1
    for n in g.nodes:
        n.order_deps = {d for d in n.order_deps if d.alive}
    return removed


def prune_scan_saves(g: Graph) -> int:
    """Stop scans from storing their per-step carries when nothing reads them; return how many changed.

    A scan traced with gradients enabled saves every step's carry for its own backward pass. The reverse
    scan of a backward pass is traced that way too (for a possible second-order gradient), and when no
    second-order gradient follows, those saves are dead weight: with three weight gradients in the carry
    they were 64 MB of the 77 MB peak of an LSTM h128 T=200 value-and-grad step. Run after DCE.
    """
    used = {}
    for n in g.nodes:
        if not n.alive:
            continue
        for v in n.inputs:
            if v.kind == "node" and v.node.prim.name == "scan":
                idx = n.params.get("index") if n.prim.name == "tuple_get" else None
                used.setdefault(v.node.id, []).append(idx)
    changed = 0
    for n in g.nodes:
        if not (n.alive and n.prim.name == "scan" and n.params.get("save")):
            continue
        first_saved = n.params["body"].n_carry + len(n.params["y_specs"])
        if any(i is None or i >= first_saved for i in used.get(n.id, [])):
            continue
        if any(v.id == n.out.id for v in g.outputs):
            continue
        n.params = dict(n.params, save=False)
        changed += 1
    return changed


def _freeze(v):
    if isinstance(v, np.ndarray):
        raise TypeError
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, np.dtype):
        return ("dtype", v.str)
    hash(v)
    return v


def cse(g: Graph) -> int:
    """Merge nodes computing the same primitive on the same inputs with equal parameters; return how many."""
    seen = {}
    rep = {}          # Value id -> replacement Value
    removed = 0
    for n in g.nodes:
        if not n.alive:
            continue
        n.inputs = [rep.get(v.id, v) for v in n.inputs]
        if n.effects or (n.prim.extra and n.prim.extra.get("random")) or n.order_deps:
            continue
        try:
            key = (n.prim.name, tuple(v.id for v in n.inputs), _freeze(n.params))
        except TypeError:
            continue
        other = seen.get(key)
        if other is None:
            seen[key] = n
            continue
        rep[n.out.id] = other.out
        n.alive = False
        removed += 1
    if rep:
        g.outputs = [rep.get(v.id, v) for v in g.outputs]
        g.grad_outputs = [(var, None if v is None else (v[0], rep.get(v[1].id, v[1]), rep.get(v[2].id, v[2]), v[3])
                           if isinstance(v, tuple) else rep.get(v.id, v)) for var, v in g.grad_outputs]
        for n in g.nodes:
            if n.alive:
                n.inputs = [rep.get(v.id, v) for v in n.inputs]
    return removed


class FusionGroup:
    """Elementwise nodes computed by one generated kernel; ``root`` produces the group's output."""

    __slots__ = ("root", "members", "inputs", "views")

    def __init__(self, root):
        self.root = root
        self.members = [root]       # in trace order after finalize()
        self.inputs = []            # external Values in first-use order
        self.views = {}             # input position -> (view Value, basic index): the input is read through it

    def finalize(self):
        self.members.sort(key=lambda n: n.id)
        inside = {m.out.id for m in self.members}
        seen = set()
        for m in self.members:
            for v in m.inputs:
                if v.id not in inside and v.id not in seen:
                    seen.add(v.id)
                    self.inputs.append(v)


def fuse(g: Graph):
    """Return a dict node id -> FusionGroup for every live elementwise node (single-consumer inlining).

    A producer joins its consumer's group when it is elementwise, has exactly one consumer, is not an
    output of the step, has the consumer's output shape (no recomputation under broadcasting), and no
    variable update that must follow it comes before the group's root (the group runs at the root's place).
    """
    consumers = {}
    for n in g.nodes:
        if n.alive:
            for v in n.inputs:
                consumers.setdefault(v.id, set()).add(n.id)
    pinned = {v.id for v in g.outputs}
    pinned |= {v.id for v in _grad_values(g)}
    must_precede = {}       # node id -> earliest trace position of a node ordered after it
    for n in g.nodes:
        if n.alive:
            for d in n.order_deps:
                must_precede[d.id] = min(must_precede.get(d.id, n.id), n.id)
    group_of = {}
    for n in reversed(g.nodes):
        if not n.alive or not n.is_elementwise or n.effects or n.id in group_of:
            continue
        grp = FusionGroup(n)
        group_of[n.id] = grp
        stack = [n]
        while stack:
            m = stack.pop()
            for v in m.inputs:
                p = v.node if v.kind == "node" else None
                if (p is None or not p.alive or not p.is_elementwise or p.effects or p.id in group_of
                        or v.id in pinned or must_precede.get(p.id, n.id + 1) <= n.id
                        or v.shape != n.out.shape
                        or len(consumers.get(v.id, ())) != 1):
                    continue
                group_of[p.id] = grp
                grp.members.append(p)
                stack.append(p)
        grp.finalize()
    return group_of


def _basic_index(template, shape):
    """Return a basic index (ints and slices only) as [("int", k) | ("slice", start, step)] normalized for a
    base of ``shape`` (one item per base dim), or None for any other index."""
    if len(template) > len(shape):
        return None
    items = []
    for it, d in zip(template, shape):
        if isinstance(it, bool) or not isinstance(it, (int, slice)):
            return None
        if isinstance(it, int):
            if not -d <= it < d:
                return None
            items.append(("int", it % d))
        else:
            start, _, step = it.indices(d)
            items.append(("slice", start, step))
    items += [("slice", 0, 1)] * (len(shape) - len(template))
    return items


def absorb_views(g: Graph, group_of) -> int:
    """Let fusion groups read basic slices of their inputs in place; return how many getitem nodes died.

    A group input made by ``x[t]`` or ``x[:, a:b]`` (ints and slices) becomes ``x`` itself, read at offset
    indices by the kernel (``grp.views``): no view object per call, and the kernel indexes a contiguous base
    (a strided view stops LLVM from vectorizing the loop: an LSTM's gate slices ran 5x slower through one).
    CPU plans only; the getitem dies when nothing else reads it.
    """
    groups = {id(grp): grp for grp in group_of.values()}.values()
    changed = False
    for grp in groups:
        for i, v in enumerate(grp.inputs):
            p = v.node if v.kind == "node" else None
            if (p is None or not p.alive or p.prim.name != "getitem" or len(p.inputs) != 1 or v.size <= 1
                    or not v.shape or p.inputs[0].dtype != v.dtype):
                continue
            items = _basic_index(p.params["template"], p.inputs[0].shape)
            if items is None:
                continue
            grp.inputs[i] = p.inputs[0]
            grp.views[i] = (v, items)
            changed = True
    if not changed:
        return 0
    used = {v.id for v in g.outputs} | {v.id for v in _grad_values(g)}
    for n in g.nodes:
        if n.alive and n.id not in group_of:
            used.update(v.id for v in n.inputs)
    for grp in groups:
        used.update(v.id for v in grp.inputs)
    died = 0
    for n in g.nodes:
        if n.alive and n.prim.name == "getitem" and n.id not in group_of and n.out.id not in used:
            n.alive = False
            died += 1
    return died
