"""ONNX export: ``jitnet.onnx.export(model, x, path="model.onnx")`` (needs ``pip install "jitnet[interop]"``).

The ``onnx`` package is imported only when a model is exported. See ``jitnet/export/onnx.py``.
"""
from .export.onnx import OPSET, UnsupportedPrimitiveError, export, supported_primitives

__all__ = ["export", "supported_primitives", "UnsupportedPrimitiveError", "OPSET"]
