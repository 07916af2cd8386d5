"""Datasets: synthetic barcodes, YOLO/COCO import with validation, the canonical COCO form."""
