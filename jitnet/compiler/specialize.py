"""Specialized plan steps for library primitives whose shapes are known when a plan is built.

A row offers one as ``extra["specialize"]`` (``ops.py``: matmul, the reductions, the softmax family), beside
its implementations.

An eager ``impl`` re-derives layout decisions on every call (axis bookkeeping, reshapes, dtype checks: tens
of microseconds of Python). In a plan the shapes and dtypes are fixed, so a specializer decides once and
returns ``fn(*arrays, out)`` that calls the kernel straight into a buffer the plan owns. A specializer
returns None when it does not apply; ``fn`` returns False at run time when an operand's layout does not
fit (the plan then falls back to the general ``impl``).
"""
from __future__ import annotations

__all__ = ["specializer"]


def specializer(node):
    """Return ``fn(*arrays, out) -> bool`` for ``node`` with its static shapes, or None."""
    spec = node.prim.extra.get("specialize") if node.prim.extra else None
    if spec is None:
        return None
    return spec(node.inputs, node.params, node.out)
