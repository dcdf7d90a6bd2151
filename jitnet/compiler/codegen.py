"""From a fusion group to a device-neutral program: what every backend's elementwise code generator takes.

``group_program`` turns a :class:`FusionGroup` into an :class:`ElementwiseProgram` (scalar expressions over
named values, with dtypes) and ``index_maps`` gives, for each external input, how it indexes into the output's
loop nest. The backend of the group's device (``jitnet.backends``) turns both into a kernel: ``kernelgen`` on the
CPU, ``kernelgen_cuda`` on CUDA.
"""
from __future__ import annotations

from ..kernelgen import ElementwiseProgram, dtype_name

__all__ = ["group_program", "index_maps"]


def _format(template, names, cdt, odt):
    return template.format(*names, T=dtype_name(cdt), O=dtype_name(odt))


def group_program(grp) -> ElementwiseProgram:
    """Return the scalar program of fusion group ``grp`` (inputs ``x{i}``, member results ``t{k}``)."""
    names, dtypes = {}, {}
    inputs = []
    views = getattr(grp, "views", None) or {}
    for i, v in enumerate(grp.inputs):
        if i in views:                      # read through a view: members name the view's value
            v = views[i][0]
        names[v.id] = f"x{i}"
        dtypes[v.id] = v.dtype
        inputs.append((v.dtype, v.size == 1 and i not in views))
    ops = []
    for k, m in enumerate(grp.members):
        in_dts = tuple(dtypes[v.id] for v in m.inputs)
        cdt, odt = m.prim.dtype_rule(in_dts, m.params)
        tpl = m.prim.template(m.params) if callable(m.prim.template) else m.prim.template
        cn = dtype_name(cdt)
        args = [names[v.id] if dtypes[v.id] == cdt else f"{cn}({names[v.id]})" for v in m.inputs]
        ops.append((_format(tpl, args, cdt, odt), odt))
        names[m.out.id] = f"t{k}"
        dtypes[m.out.id] = odt
    root = grp.root.out
    return ElementwiseProgram(inputs, ops, [(names[root.id], root.dtype)])


def index_maps(grp):
    """Return, per external input, its index map into the output loop nest (see kernelgen.indexed_source)."""
    oshape = grp.root.out.shape or (1,)
    r = len(oshape)
    maps = []
    views = getattr(grp, "views", None) or {}
    for i, v in enumerate(grp.inputs):
        view = views.get(i)
        if view is None and v.size == 1:
            maps.append("scalar")
            continue
        shp = (view[0].shape if view else v.shape) or (1,)
        off = r - len(shp)
        m = tuple(None if (d == 1 and oshape[off + j] != 1) else off + j for j, d in enumerate(shp))
        maps.append(m if view is None else _through_view(m, view[1]))
    return maps


def _through_view(m, items):
    """Compose an index map of a view with its basic index: per base dim, a source expression."""
    out, k = [], 0
    for it in items:
        if it[0] == "int":
            out.append(str(it[1]))
            continue
        d = m[k]
        k += 1
        start, step = it[1], it[2]
        if d is None:
            out.append(str(start))
        else:
            term = f"i{d}" if step == 1 else f"{step} * i{d}"
            out.append(term if start == 0 else f"{start} + {term}")
    return tuple(out)
