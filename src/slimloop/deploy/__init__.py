"""Deployment: a detector exported for edge runtimes (ONNX)."""
