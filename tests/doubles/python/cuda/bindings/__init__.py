"""TEST DOUBLE of cuda-python's ``cuda.bindings`` package: only ``runtime`` (the CUDA runtime API) is mimicked."""
