"""Execution plans: the scheduled kernels of a compiled step, with buffers reused across steps.

A plan is a list of steps over an environment of arrays (one slot per graph value). Fused groups run their
generated kernel into a buffer the plan owns; a buffer whose value (and every view of it) is dead is reused
by a later group of the same size and dtype, and all plan-owned buffers persist across calls, so a
steady-state step allocates only what non-fused kernels and returned values need.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .. import kernelgen
from ..autodiff import nans
from ..autodiff.sparse import IndexedSlices
from ..tensor import Tensor
from .codegen import cpu_kernels
from .native import nativize
from .passes import _grad_values, absorb_views, fuse
from .specialize import specializer

__all__ = ["Plan", "build_plan"]


class Plan:
    """A compiled step: slots, steps, and how inputs, variables and outputs map to slots."""

    debug_note = ""              # appended to the per-step times JITNET_DEBUG prints

    def __init__(self):
        self.nslots = 0
        self.arg_slots = []        # (slot, flat tensor-argument index)
        self.state_slots = []      # (slot, variable)
        self.gradin_slots = []     # (slot, variable) reading var.grad
        self.const_env = []        # (slot, array)
        self.steps = []            # callables(env)
        self.step_names = []
        self.out_slots = []        # slot per returned tensor (or ("state", var))
        self.grad_writes = []      # (variable, slot or None)
        self.groups = []           # FusionGroups, in schedule order
        self.sources = []          # generated kernel sources
        self.kernel_count = 0
        self.buffer_bytes = 0
        self.var_shapes = []
        self.infos = []            # per step: what it computes, for native segments (see native.py)
        self.slot_shapes = {}      # slot -> shape of its value

    def run(self, tensors):
        """Run the step on the flattened tensor arguments; return the environment of arrays."""
        return self.run_arrays([t._data for t in tensors])

    def outputs(self, env):
        """Return the arrays of the returned values from an environment."""
        return [s[1]._data if isinstance(s, tuple) else env[s] for s in self.out_slots]

    def run_arrays(self, arrays):
        """Run the step on the flattened argument arrays; return the environment of arrays."""
        env = [None] * self.nslots
        for slot, arr in self.const_env:
            env[slot] = arr
        for slot, i in self.arg_slots:
            env[slot] = arrays[i]
        for slot, var in self.state_slots:
            env[slot] = var._data
        for slot, var in self.gradin_slots:
            g = var._grad
            if g is None:
                raise RuntimeError(f"jitnet.jit: the compiled step reads the accumulated .grad of variable "
                                   f"{var.name or ''} {var.shape}, which is now None; call the step with the "
                                   f"same gradient state as when it was traced (e.g. always zero_grad() first)")
            env[slot] = g._data
        dbg = _debug_level()
        if dbg:
            for name, step in zip(self.step_names, self.steps):
                t0 = time.perf_counter()
                step(env)
                print(f"[jitnet] {name}: {(time.perf_counter() - t0) * 1e6:.1f} us{self.debug_note}")
        else:
            for step in self.steps:
                step(env)
        for var, slot in self.grad_writes:
            if slot is None:
                var._grad = None
            elif isinstance(slot, tuple):              # ("sparse", values slot, indices slot, dense shape)
                var._grad = IndexedSlices(Tensor._wrap(env[slot[1]]), Tensor._wrap(env[slot[2]]), slot[3])
            else:
                var._grad = Tensor._wrap(env[slot])
        return env


def _debug_level():
    try:
        return int(os.environ.get("JITNET_DEBUG", "0") or 0)
    except ValueError:
        return 0


def _schedule(g, group_of):
    """Return units (a FusionGroup or a Node) in execution order: a group runs at its root's position."""
    units = []
    for n in g.nodes:
        if not n.alive:
            continue
        grp = group_of.get(n.id)
        if grp is None:
            units.append(n)
        elif grp.root is n:
            units.append(grp)
    return units


def build_plan(g, fuse_ops=True):
    """Return a Plan for graph ``g`` (after DCE/CSE): fuse, schedule, assign slots and buffers."""
    plan = Plan()
    checking = nans.debug_nans_enabled()       # debug_nans: one checked step per primitive, nothing fused
    if checking:
        fuse_ops = False
    group_of = fuse(g) if fuse_ops else {}
    absorb_views(g, group_of)
    units = _schedule(g, group_of)
    slot_of = {}

    def slot(v):
        s = slot_of.get(v.id)
        if s is None:
            s = slot_of[v.id] = plan.nslots
            plan.nslots += 1
            plan.slot_shapes[s] = v.shape
        return s

    # inputs
    for v in g.values:
        if v.kind == "arg":
            plan.arg_slots.append((slot(v), v.arg_index))
        elif v.kind == "state":
            plan.state_slots.append((slot(v), v.var))
        elif v.kind == "gradin":
            plan.gradin_slots.append((slot(v), v.var))
        elif v.kind == "const":
            plan.const_env.append((slot(v), v.const))

    # liveness, with views extending the life of the value they alias
    alias_root = {}
    for u in units:
        if not hasattr(u, "members") and u.prim.kind == "view" and u.inputs:
            src = u.inputs[0]
            alias_root[u.out.id] = alias_root.get(src.id, src.id)
    last_use = {}
    for pos, u in enumerate(units):
        for v in u.inputs:
            r = alias_root.get(v.id, v.id)
            last_use[r] = pos
    escaping = {v.id for v in g.outputs} | {v.id for v in _grad_values(g)}
    escaping = {alias_root.get(i, i) for i in escaping}

    # an assign whose value is a fused group's result used nowhere else: the group writes into the variable
    pos_of = {}
    for pos, u in enumerate(units):
        for m in (u.members if hasattr(u, "members") else [u]):
            pos_of[m.id] = pos
    n_consumers = {}
    for u in units:
        for v in u.inputs:
            n_consumers[v.id] = n_consumers.get(v.id, 0) + 1
    write_into = {}        # group root value id -> state Value of the variable it writes
    folded = set()         # ids of assign nodes done by their group
    for u in units:
        if hasattr(u, "members") or u.prim.name != "assign":
            continue
        var_v, val = u.inputs
        grp = group_of.get(val.node.id) if val.kind == "node" else None
        if (grp is None or grp.root is not val.node or val.id in escaping or n_consumers.get(val.id) != 1
                or val.shape != var_v.shape or val.dtype != var_v.dtype or var_v.kind != "state"):
            continue
        gpos = pos_of[grp.root.id]
        if all(pos_of.get(d.id, -1) <= gpos for d in u.order_deps if d.id != grp.root.id):
            write_into[val.id] = var_v
            folded.add(u.id)

    free = {}              # (shape, dtype.str) -> list of buffers
    release_at = {}        # pos -> list of (key, buffer)
    def buffer_for(out, pos):
        """A plan-owned buffer for ``out`` (None when it escapes: it is then recycled per call)."""
        if out.id in escaping or out.id not in last_use:
            return None
        key = (out.shape or (1,), out.dtype.str)
        lst = free.get(key)
        if lst:
            buf = lst.pop()
        else:
            buf = np.empty(out.shape or (1,), out.dtype)
            plan.buffer_bytes += buf.nbytes
        release_at.setdefault(last_use[out.id], []).append((key, buf))
        return buf

    for pos, u in enumerate(units):
        if hasattr(u, "members"):
            ks, kp, src = cpu_kernels(u)
            plan.groups.append(u)
            plan.sources.append(src)
            plan.kernel_count += 1
            out = u.root.out
            in_slots = [slot(v) for v in u.inputs]
            o = slot(out)
            kernel = kp if out.size >= kernelgen.PARALLEL_THRESHOLD else ks
            kshape = out.shape or (1,)
            name = f"fused[{'+'.join(m.prim.name for m in u.members)}"
            if out.id in write_into:
                vs = slot(write_into[out.id])
                plan.steps.append(_group_step_into(kernel, in_slots, o, vs, kshape))
                plan.step_names.append(f"{name}+assign] -> {out.shape}")
                plan.infos.append(("group", u, kernel, in_slots, o, vs))
            else:
                buf = buffer_for(out, pos)
                plan.steps.append(_group_step(kernel, in_slots, o, kshape, out.shape, out.dtype, buf))
                plan.step_names.append(f"{name}] -> {out.shape}")
                plan.infos.append(("group", u, kernel, in_slots, o, None))
        else:
            n = u
            if n.id in folded:
                slot_of[n.out.id] = slot(n.inputs[0])
                continue
            in_slots = [slot(v) for v in n.inputs]
            o = slot(n.out)
            fn = specializer(n) if n.out.dtype != np.dtype(object) else None
            if fn is not None:
                buf = buffer_for(n.out, pos)
                plan.steps.append(_special_step(fn, n.prim.impl["cpu"], in_slots, o, n.params, n.out, buf))
                plan.step_names.append(f"{n.prim.name}* -> {n.out.shape}")
            else:
                plan.steps.append(_node_step(n.prim.impl["cpu"], in_slots, o, n.params))
                plan.step_names.append(f"{n.prim.name} -> {n.out.shape}")
            plan.infos.append(("node", n, None, in_slots, o, None))
            if n.prim.kind != "view":
                plan.kernel_count += 1
        for key, buf in release_at.pop(pos, ()):
            free.setdefault(key, []).append(buf)

    for v in g.outputs:
        plan.out_slots.append(("state", v.var) if v.kind == "state" else slot(v))
    plan.grad_writes = [(var, None if v is None else ("sparse", slot(v[1]), slot(v[2]), v[3])
                         if isinstance(v, tuple) else slot(v)) for var, v in g.grad_outputs]
    plan.var_shapes = [(var, var.shape) for _, var in plan.state_slots]
    if checking:
        plan.steps = [nans.checked_step(step, info[1], info[3], info[4])
                      for step, info in zip(plan.steps, plan.infos)]
    else:
        nativize(plan)
    return plan


def _fast(kernel):
    """Return a caller of ``kernel`` that skips type dispatch while its operands keep the first call's strides.

    A compiled entry point does not check array layouts (a strided view passed where a contiguous array was
    compiled for is read as if it were contiguous), so it is used only when every operand has the strides it
    was compiled for; dtypes and shapes are fixed by the plan, so equal strides mean an equal Numba type.
    """
    box = [None, None]          # strides of the operands the entry point was compiled for, the entry point

    def call(*args):
        key = tuple([a.strides for a in args])
        if key == box[0]:
            try:
                return box[1](*args)
            except TypeError:          # an operand of another Numba type (read-only)
                pass
        r = kernel(*args)
        ep = kernelgen.entry_point(kernel, args)
        box[0], box[1] = (key, ep) if ep is not None else (None, None)
        return r
    return call


def _special_step(fn, impl, in_slots, o, params, out, buf):
    oshape, dtype, kshape = out.shape, out.dtype, out.shape or (1,)
    if buf is not None:
        view = buf.reshape(oshape)

        def step(env):
            if fn(*[env[i] for i in in_slots], buf):
                env[o] = view
            else:
                env[o] = impl(*[env[i] for i in in_slots], **params)
    else:
        held = [None, None]

        def step(env):
            dst = _recycled(held, kshape, dtype)
            if fn(*[env[i] for i in in_slots], dst):
                env[o] = dst.reshape(oshape)
            else:
                env[o] = impl(*[env[i] for i in in_slots], **params)
    return step


def _group_step(kernel, in_slots, o, kshape, oshape, dtype, buf):
    kernel = _fast(kernel)
    if buf is not None:
        view = buf.reshape(oshape)

        def step(env):
            kernel(*[env[i] for i in in_slots], buf)
            env[o] = view
    else:
        held = [None, None]

        def step(env):
            out = _recycled(held, kshape, dtype)
            kernel(*[env[i] for i in in_slots], out)
            env[o] = out.reshape(oshape)
    return step


def _recycled(held, shape, dtype):
    """Return an output array for a value the step returns: one of two earlier outputs if the caller dropped it.

    A returned array is recycled only when nothing but this plan refers to it (its reference count), so
    results the caller still holds are never overwritten; steady-state steps then allocate no new memory
    for their outputs and skip the page faults of fresh large arrays.
    """
    for k in (0, 1):
        a = held[k]
        if a is not None and sys.getrefcount(a) == 3:      # held[k], the local name, getrefcount's argument
            return a
    a = np.empty(shape, dtype)
    held[1] = held[0]
    held[0] = a
    return a


def _group_step_into(kernel, in_slots, o, var_slot, kshape):
    kernel = _fast(kernel)

    def step(env):
        dst = env[var_slot]
        kernel(*[env[i] for i in in_slots], dst.reshape(kshape))
        env[o] = dst
    return step


def _node_step(impl, in_slots, o, params):
    if len(in_slots) == 1:
        (a,) = in_slots

        def step(env):
            env[o] = impl(env[a], **params)
    elif len(in_slots) == 2:
        a, b = in_slots

        def step(env):
            env[o] = impl(env[a], env[b], **params)
    else:
        def step(env):
            env[o] = impl(*[env[i] for i in in_slots], **params)
    return step
