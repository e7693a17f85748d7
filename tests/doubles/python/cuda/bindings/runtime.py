"""TEST DOUBLE of cuda-python's CUDA runtime bindings (``from cuda.bindings import runtime as cudart``). Not CUDA.

Mimics, with cuda-python's names and its (error, value...) return tuples, the calls the TensorRT runner makes:
cudaGetDeviceCount, cudaGetDeviceProperties (name as bytes, major, minor), cudaMalloc / cudaFree, cudaMemcpy /
cudaMemcpyAsync, cudaStreamCreate / cudaStreamSynchronize / cudaStreamDestroy. "Device" memory is host memory
(ctypes buffers), which the fake ``tensorrt`` reads and writes; the device itself is fake_device's (FAKE_GPU_NAME,
FAKE_GPU_CC, FAKE_NO_GPU). Put tests/doubles/python first on PYTHONPATH to use it; never install it.
"""
from __future__ import annotations

import ctypes
import enum
from types import SimpleNamespace

import fake_device


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorNoDevice = 100


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStream_t:  # noqa: N801 - cuda-python's name
    """A stream handle; int() gives its value, as cuda-python's handles do."""

    def __init__(self, value: int):
        self._value = value

    def __int__(self) -> int:
        return self._value


_allocations: dict[int, ctypes.Array] = {}
_streams = [0]


def cudaGetDeviceCount():  # noqa: N802
    return (cudaError_t.cudaSuccess, 1) if fake_device.gpu() else (cudaError_t.cudaErrorNoDevice, 0)


def cudaGetDeviceProperties(device: int):  # noqa: N802
    found = fake_device.gpu()
    if found is None or device != 0:
        return cudaError_t.cudaErrorInvalidValue, None
    major, minor = (int(p) for p in found[1].split("."))
    return cudaError_t.cudaSuccess, SimpleNamespace(name=found[0].encode(), major=major, minor=minor)


def cudaMalloc(size: int):  # noqa: N802
    buffer = ctypes.create_string_buffer(int(size))
    _allocations[ctypes.addressof(buffer)] = buffer
    return cudaError_t.cudaSuccess, ctypes.addressof(buffer)


def cudaFree(ptr: int):  # noqa: N802
    return (cudaError_t.cudaSuccess,) if _allocations.pop(int(ptr), None) is not None else \
        (cudaError_t.cudaErrorInvalidValue,)


def cudaMemcpy(dst: int, src: int, count: int, kind: cudaMemcpyKind):  # noqa: N802
    ctypes.memmove(int(dst), int(src), int(count))
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream):  # noqa: N802
    return cudaMemcpy(dst, src, count, kind)


def cudaStreamCreate():  # noqa: N802
    _streams[0] += 1
    return cudaError_t.cudaSuccess, cudaStream_t(_streams[0])


def cudaStreamSynchronize(stream):  # noqa: N802
    return (cudaError_t.cudaSuccess,)


def cudaStreamDestroy(stream):  # noqa: N802
    return (cudaError_t.cudaSuccess,)
