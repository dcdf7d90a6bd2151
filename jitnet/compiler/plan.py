"""Execution plans: the scheduled kernels of a compiled step, with buffers reused across steps.

A plan is a list of steps over an environment of arrays (one slot per graph value). Fused groups run their
generated kernel into a buffer the plan owns; a buffer whose value (and every view of it) is dead is reused
by a later group of the same size and dtype, and all plan-owned buffers persist across calls, so a
steady-state step allocates only what non-fused kernels and returned values need.
"""
from __future__ import annotations

import os
import time


from .. import backends
from ..autodiff import nans
from ..autodiff.sparse import IndexedSlices
from ..tensor import Tensor
from .codegen import group_program, index_maps
from .native import nativize
from .passes import _grad_values, absorb_views, fuse

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
        self.devices = ["cpu"]     # the device kinds its steps run on
        self.stream = None         # the CUDA stream its GPU steps launch on (made on the first run)

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


def _split_devices(group_of):
    """Drop fusion groups whose members or array inputs live on different devices (they run node by node).

    A group whose output is on one device may still read 1-element operands of the host (a learning rate on
    a CPU step counter): they are passed by value."""
    for grp in {id(x): x for x in group_of.values()}.values():
        devs = {m.out.device for m in grp.members} | {v.device for v in grp.inputs if v.size != 1}
        if len(devs) > 1 or (devs == {"cpu"} and any(v.device != "cpu" for v in grp.inputs)):
            for m in grp.members:
                group_of.pop(m.id, None)


def _unit_device(u):
    """The device kind a plan unit runs on: a group's output's; a node's first non-CPU value's, else cpu."""
    if hasattr(u, "members"):
        return u.root.out.device
    if u.out is not None and u.out.device != "cpu":
        return u.out.device
    for v in u.inputs:
        if v.device != "cpu":
            return v.device
    return "cpu"


def build_plan(g, fuse_ops=True):
    """Return a Plan for graph ``g`` (after DCE/CSE): fuse, schedule, assign slots and buffers.

    One builder serves every device: each unit (a fusion group or a node) runs on the backend of its IR values'
    device (``jitnet.backends``), which supplies the group's kernel, the plan step that launches it, a node's
    implementation and buffer allocation. Liveness, buffer reuse, assign folding and reading views in place are
    shared; specialization to static shapes and native segments are what the CPU backend adds.
    """
    plan = Plan()
    checking = nans.debug_nans_enabled()       # debug_nans: one checked step per primitive, nothing fused
    if checking:
        fuse_ops = False
    group_of = fuse(g) if fuse_ops else {}
    _split_devices(group_of)
    absorb_views(g, group_of)
    units = _schedule(g, group_of)
    devices = [_unit_device(u) for u in units]
    kinds_used = set(devices)
    if kinds_used - {"cpu"}:
        plan.debug_note = "".join(backends.get(d).debug_note for d in sorted(kinds_used - {"cpu"}))
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
                or val.shape != var_v.shape or val.dtype != var_v.dtype or var_v.kind != "state"
                or var_v.device != val.device):
            continue
        gpos = pos_of[grp.root.id]
        if all(pos_of.get(d.id, -1) <= gpos for d in u.order_deps if d.id != grp.root.id):
            write_into[val.id] = var_v
            folded.add(u.id)

    free = {}              # (device, shape, dtype.str) -> list of buffers
    release_at = {}        # pos -> list of (key, buffer)

    def buffer_for(out, pos, be):
        """A plan-owned buffer for ``out`` (None when it escapes: it is then recycled per call)."""
        if out.id in escaping or out.id not in last_use:
            return None
        key = (be.name, out.shape or (1,), out.dtype.str)
        lst = free.get(key)
        if lst:
            buf = lst.pop()
        else:
            buf = be.empty(out.shape or (1,), out.dtype)
            plan.buffer_bytes += out.size * out.dtype.itemsize
        release_at.setdefault(last_use[out.id], []).append((key, buf))
        return buf

    for pos, (u, dev) in enumerate(zip(units, devices)):
        be = backends.get(dev)
        if hasattr(u, "members"):
            out = u.root.out
            maps = index_maps(u)
            kinds = ["host" if (m == "scalar" and v.device == "cpu") else "device" for m, v in zip(maps, u.inputs)]
            kernel, src = be.group_kernel(group_program(u), len(out.shape or (1,)), maps, kinds, out.size)
            plan.groups.append(u)
            plan.sources.append(src)
            plan.kernel_count += 1
            in_slots = [slot(v) for v in u.inputs]
            o = slot(out)
            name = f"fused[{'+'.join(m.prim.name for m in u.members)}"
            if out.id in write_into:
                vs = slot(write_into[out.id])
                plan.steps.append(be.group_step(kernel, in_slots, o, out, None, vs, maps, kinds))
                plan.step_names.append(f"{name}+assign] -> {out.shape}")
                plan.infos.append(("group", u, kernel, in_slots, o, vs))
            else:
                buf = buffer_for(out, pos, be)
                plan.steps.append(be.group_step(kernel, in_slots, o, out, buf, None, maps, kinds))
                plan.step_names.append(f"{name}] -> {out.shape}")
                plan.infos.append(("group", u, kernel, in_slots, o, None))
        else:
            n = u
            if n.id in folded:
                slot_of[n.out.id] = slot(n.inputs[0])
                continue
            in_slots = [slot(v) for v in n.inputs]
            o = slot(n.out)
            step, special = be.node_step(n, in_slots, o, lambda n=n, pos=pos, be=be: buffer_for(n.out, pos, be))
            plan.steps.append(step)
            plan.step_names.append(f"{n.prim.name}{'*' if special else ''}{'' if dev == 'cpu' else f' ({dev})'}"
                                   f" -> {n.out.shape}")
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
    plan.devices = sorted(kinds_used) or ["cpu"]
    if checking:
        plan.steps = [nans.checked_step(step, info[1], info[3], info[4])
                      for step, info in zip(plan.steps, plan.infos)]
    elif all(backends.get(d).native for d in kinds_used):
        nativize(plan)
    for d in plan.devices:
        if d != "cpu":
            backends.get(d).finish_plan(plan)
    return plan
