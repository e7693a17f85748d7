"""Deployment: export a trained detector to ONNX, quantize it to INT8 (explicit Q/DQ), build or script a TensorRT
engine, and write a self-describing bundle the torch-free runtime loads.

``python -m deploy.build --target jetson`` runs the whole chain; ``python -m deploy.verify BUNDLE`` re-checks one.
"""
