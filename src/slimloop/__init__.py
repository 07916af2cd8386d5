"""slimloop: compress YOLOv5-style detectors by sparse training, pruning, padding and distillation."""

__version__ = "0.1.0"
