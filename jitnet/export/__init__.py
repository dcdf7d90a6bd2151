"""Export of traced graphs: ONNX models (``jitnet.onnx.export``) and the graph ``SummaryWriter.add_graph`` writes.

``graph.trace_graph`` records a function's unfused graph once (no plan built); the ONNX exporter maps
its primitives to ONNX operators through the optional ``onnx`` package, imported only when exporting.
"""
from .graph import TracedGraph, find_modules, trace_graph

__all__ = ["TracedGraph", "trace_graph", "find_modules"]
