"""TEST DOUBLE of NVIDIA's cuda-python package (``cuda.bindings.runtime``). Not CUDA: see cuda/bindings/runtime.py."""
