"""TEST DOUBLE of NVIDIA TensorRT's Python bindings (``import tensorrt``, TensorRT 10 API). Not TensorRT.

TensorRT cannot be installed on this project's machines. This fake mimics the subset of the real API the project
calls, with the real names and signatures (``Logger``, ``Runtime.deserialize_cuda_engine``,
``Runtime.engine_host_code_allowed`` / ``DLA_core``, ``ICudaEngine.num_io_tensors`` / ``get_tensor_name`` /
``get_tensor_mode`` / ``get_tensor_shape`` / ``get_tensor_dtype`` / ``get_tensor_profile_shape`` /
``hardware_compatibility_level`` / ``create_execution_context``, ``IExecutionContext.set_input_shape`` /
``get_tensor_shape`` / ``set_tensor_address`` / ``execute_async_v3``, ``TensorIOMode``, ``DataType``, ``nptype``,
``HardwareCompatibilityLevel``), and refuses plans the way TensorRT documents it does (other version, other GPU).

It only loads the fake plans the stand-in ``trtexec`` (tests/doubles/bin/trtexec) writes, and "executes" them by
running the ONNX model inside with ONNX Runtime on the CPU, reading inputs from and writing outputs to the "device"
memory of the fake cuda-python (tests/doubles/python/cuda), which is host memory. Put tests/doubles/python first on
PYTHONPATH to use it; never install it.
"""
from __future__ import annotations

import ctypes
import enum
import sys

import fake_device

__version__ = fake_device.trt_version()


class Logger:
    """TensorRT's ILogger with its severity constants; messages go to stderr like TensorRT's default logger."""

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = WARNING):
        self.min_severity = min_severity

    def log(self, severity: int, msg: str) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] [{'FEWIV'[severity]}] {msg}", file=sys.stderr)


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


class HardwareCompatibilityLevel(enum.Enum):
    NONE = 0
    AMPERE_PLUS = 1
    SAME_COMPUTE_CAPABILITY = 2


_ORT_TO_TRT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int8)": DataType.INT8,
               "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL, "tensor(int64)": DataType.INT64}


def nptype(dtype: DataType):
    """The numpy type of a TensorRT DataType."""
    import numpy as np

    return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
            DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.INT64: np.int64}[dtype]


def volume(shape) -> int:
    """Number of elements of a shape."""
    n = 1
    for d in shape:
        n *= d
    return n


class Runtime:
    """IRuntime: deserializes (fake) plans, refusing those TensorRT would refuse on this (fake) device."""

    def __init__(self, logger: Logger):
        self.logger = logger
        self.engine_host_code_allowed = False
        self.DLA_core = -1

    def deserialize_cuda_engine(self, serialized_engine: bytes):
        """The ICudaEngine, or None (with an error logged) when the plan cannot run here."""
        plan = fake_device.read_plan(bytes(serialized_engine))
        if plan is None:
            self.logger.log(Logger.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag)")
            return None
        header, onnx_bytes = plan
        why = fake_device.refusal(header, self.engine_host_code_allowed)
        if why is None and header.get("dla_core") is not None and self.DLA_core != header["dla_core"]:
            why = f"plan runs on DLA core {header['dla_core']}: set IRuntime.DLA_core"
        if why is not None:
            self.logger.log(Logger.ERROR, f"IRuntime::deserializeCudaEngine: {why}")
            return None
        return ICudaEngine(header, onnx_bytes)


class ICudaEngine:
    """A deserialized plan: I/O tensors from the ONNX model inside, the optimization profile from its header."""

    def __init__(self, header: dict, onnx_bytes: bytes):
        self.header = header
        self._onnx, self._loaded = onnx_bytes, None
        self.num_optimization_profiles = 1
        level = header.get("hardware_compatibility", "none")
        self.hardware_compatibility_level = {"none": HardwareCompatibilityLevel.NONE,
                                             "ampere+": HardwareCompatibilityLevel.AMPERE_PLUS}[level]

    def _ort(self):
        """The ONNX Runtime session, made on first use (registration only deserializes: no onnxruntime needed)."""
        if self._loaded is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(self._onnx, sess_options=options, providers=["CPUExecutionProvider"])
            io = [(i, TensorIOMode.INPUT) for i in session.get_inputs()] + \
                 [(o, TensorIOMode.OUTPUT) for o in session.get_outputs()]
            self._loaded = session, io
        return self._loaded

    @property
    def _session(self):
        return self._ort()[0]

    @property
    def _io(self):
        return self._ort()[1]

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0].name

    def _arg(self, name: str):
        return next(arg for arg, _ in self._io if arg.name == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next(mode for arg, mode in self._io if arg.name == name)

    def get_tensor_shape(self, name: str) -> list[int]:
        """Static dims as built; -1 where the ONNX axis is dynamic (the batch)."""
        return [d if isinstance(d, int) and d > 0 else -1 for d in self._arg(name).shape]

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT_TO_TRT[self._arg(name).type]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> tuple[list[int], list[int], list[int]]:
        profile = self.header.get("profile")
        if profile_index != 0 or profile is None or self.get_tensor_mode(name) != TensorIOMode.INPUT:
            raise RuntimeError(f"no optimization profile shape for {name}")
        return profile["min"], profile["opt"], profile["max"]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class IExecutionContext:
    """Runs the plan: inputs are read from, outputs written to the addresses set with set_tensor_address."""

    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        built = self.engine.get_tensor_shape(name)
        if len(shape) != len(built) or any(b not in (-1, s) for b, s in zip(built, shape)):
            return False
        profile = self.engine.header.get("profile")
        if profile is not None and not profile["min"][0] <= shape[0] <= profile["max"][0]:
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> list[int]:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return list(self._shapes.get(name, self.engine.get_tensor_shape(name)))
        batch = next(iter(self._shapes.values()), (1,))[0]
        return [batch if d == -1 else d for d in self.engine.get_tensor_shape(name)]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        import numpy as np

        feeds = {}
        for arg, mode in self.engine._io:
            if mode == TensorIOMode.INPUT:
                dtype = np.dtype(nptype(self.engine.get_tensor_dtype(arg.name)))
                shape = self._shapes[arg.name]
                raw = ctypes.string_at(self._addresses[arg.name], volume(shape) * dtype.itemsize)
                feeds[arg.name] = np.frombuffer(raw, dtype).reshape(shape)
        names = [arg.name for arg, mode in self.engine._io if mode == TensorIOMode.OUTPUT]
        for name, value in zip(names, self.engine._session.run(names, feeds)):
            value = np.ascontiguousarray(value)
            if list(value.shape) != self.get_tensor_shape(name):
                return False
            ctypes.memmove(self._addresses[name], value.ctypes.data, value.nbytes)
        return True
