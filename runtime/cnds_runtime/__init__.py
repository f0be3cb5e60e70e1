"""Torch-free deployment runtime for cnds ONNX exports (onnxruntime + numpy + Pillow only)."""

__version__ = "0.1.0"
