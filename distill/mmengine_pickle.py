"""A restricted pickle module for MMEngine runner checkpoints: loads them without mmengine and without running code.

Pass it as `torch.load(path, weights_only=False, pickle_module=distill.mmengine_pickle)`. Its Unpickler resolves
only an allow-list of tensor / numpy / container reconstruction globals; every `mmengine.*`, `mmcv.*` or `mmdet.*`
name becomes an inert stub class (its metaclass answers attribute look-ups, since MMEngine's HistoryBuffer pickles
`getattr(HistoryBuffer, 'min')`); `getattr` itself only works on stubs; anything else (os.system, builtins.eval,
subprocess, ...) raises `RefusedGlobal` before it could be called.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import torch

STUB_PACKAGES = ("mmengine", "mmcv", "mmdet")

# module -> names the checkpoints of MMEngine / MMDetection (numpy 1 and 2, torch's own format) need to rebuild.
ALLOWED: dict[str, frozenset[str]] = {
    "collections": frozenset({"OrderedDict", "Counter", "defaultdict", "deque"}),
    "torch._utils": frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                               "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"}),
    "torch": frozenset({"Size", "device"}),
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "_codecs": frozenset({"encode"}),  # protocol-2 pickles store bytes as encode(str, 'latin1')
    "builtins": frozenset({"set", "frozenset", "complex", "slice", "range", "bytearray"}),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The file references a global outside the allow-list; nothing from it was called."""


class _StubMeta(type):
    """Metaclass of stubs: any attribute of a stub class is another stub (e.g. HistoryBuffer.min)."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return stub_class(cls.__module__, f"{cls.__qualname__}.{name}")

    def __repr__(cls) -> str:
        return f"<stub {cls.__module__}.{cls.__qualname__}>"


class Stub(metaclass=_StubMeta):
    """An inert stand-in for an object of a class that is not installed: keeps its constructor args and state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.stub_args, self.stub_kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["stub_state"] = state

    def __repr__(self) -> str:
        return f"<stub instance of {type(self).__module__}.{type(self).__qualname__}>"


def stub_class(module: str, qualname: str) -> type:
    """A new stub class standing for `module.qualname`."""
    cls = _StubMeta(qualname.rsplit(".", 1)[-1], (Stub,), {"__module__": module, "__qualname__": qualname})
    return cls


def _stub_getattr(obj: Any, name: str, *default: Any) -> Any:
    # getattr is how pickles reference methods; allowing it on real objects would reach anything (e.g. a module's
    # attributes), so it is only honoured on stubs.
    if isinstance(obj, _StubMeta) or isinstance(obj, Stub):
        return getattr(obj, name, *default)
    raise RefusedGlobal(f"refusing getattr({type(obj).__name__}, {name!r}) from the checkpoint")


def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class allows reconstruction globals, stubs MMEngine classes, refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global referenced by the pickle stream, or raise RefusedGlobal."""
        if module.split(".", 1)[0] in STUB_PACKAGES:
            return stub_class(module, name)
        if module in ("builtins", "__builtin__") and name == "getattr":
            return _stub_getattr
        if module == "__builtin__":
            module = "builtins"
        if name in ALLOWED.get(module, ()) or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise RefusedGlobal(f"refusing to load global {module}.{name} from the checkpoint")


def load(file, **kwargs: Any) -> Any:
    """pickle.load with the restricted Unpickler (torch.load calls this for legacy, non-zip checkpoints)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """pickle.loads with the restricted Unpickler."""
    return Unpickler(io.BytesIO(data), **kwargs).load()
