"""Read PyTorch checkpoint files (tensors and plain containers) without the classes they name.

taming-transformers' `last.ckpt` files are PyTorch Lightning pickles: beside the state dict they
hold callback objects and hyper-parameters whose classes live in pytorch_lightning (and in
taming itself). `torch.load(weights_only=True)` refuses them and a plain `torch.load` needs those
packages. This unpickler resolves only what tensors and containers need (torch's own weights-only
allow-list) and turns every other class into an inert stub, so nothing from the file runs.
"""

from __future__ import annotations

import os
import pickle
import types
from typing import Any

import numpy as np

from vq_jax.convert.arch import ConversionError

# Safe builtins containers may use beyond torch's allow-list.
_EXTRA_ALLOWED = {
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "object"),
    ("collections", "defaultdict"),
}


class Stub:
    """Stands in for a class the file names but this process must not import: accepts any
    construction, state and (for dict / list subclasses) items, and does nothing with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # not called by NEWOBJ
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_list", []).extend(values)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            "reading PyTorch checkpoints needs torch; install it with pip install -e '.[torch]'."
        ) from e
    return torch


def _make_pickle_module() -> types.ModuleType:
    """A `pickle`-like module whose Unpickler stubs every class outside the allow-list."""
    from torch import _weights_only_unpickler

    allowed = _weights_only_unpickler._get_allowed_globals()
    stubs: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if f"{module}.{name}" in allowed:  # tensors, storages, dtypes, OrderedDict
                return allowed[f"{module}.{name}"]
            if (module, name) in _EXTRA_ALLOWED:
                return super().find_class(module, name)
            if (module, name) not in stubs:
                stubs[module, name] = type(name, (Stub,), {"__module__": module})
            return stubs[module, name]

    module = types.ModuleType("vq_jax_restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kw: Unpickler(f, **kw).load()
    module.__name__ = "vq_jax_restricted_pickle"
    return module


def load_torch_file(path: str, what: str) -> Any:
    """The object a `torch.save` file holds, tensors on the CPU, unknown classes stubbed."""
    if not os.path.isfile(path):
        raise ConversionError(f"{what} {path!r} does not exist; give the path of a local file.")
    torch = _torch()
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_make_pickle_module(), weights_only=False
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{what} {path!r} is not a readable PyTorch file ({first[:200]}); give the .ckpt / "
            ".pt file itself, complete."
        ) from e


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype) or array as float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)
