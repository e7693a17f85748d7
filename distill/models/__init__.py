"""Detectors built from a ModelSpec: torchvision RetinaNet (and Faster R-CNN) on ResNet/ResNeXt FPN backbones."""
from distill.models.build import build_detector, count_parameters, gflops

__all__ = ["build_detector", "count_parameters", "gflops"]
