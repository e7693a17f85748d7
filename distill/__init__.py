"""Torch layer: datasets, detectors, DS2D2 and baseline distillation losses, the trainer and the `run` CLI."""
