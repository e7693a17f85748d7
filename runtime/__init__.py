"""Torch-free bottom layer: data formats, pre/post-processing, metrics, backends, tiling, latency.

Nothing under runtime/ may import torch: it must run on a Jetson where only numpy, onnxruntime and
JetPack's TensorRT exist.
"""
