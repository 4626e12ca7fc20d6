"""Fill a vq-jax parameter tree from a PyTorch state dict, one checked key at a time.

Each source names its keys through a function from a vq-jax parameter path to the PyTorch key
(`taming.torch_key`, `llamagen.torch_key`); the tree itself comes from the vq-jax module, so
the state dict must hold exactly the keys the architecture implies: a missing key, an extra one
or a wrong shape is reported by name with the shape expected. Layouts: conv kernels OIHW ->
HWIO; 1x1 convs that vq-jax runs as Dense layers (attention q/k/v/proj_out) [O, I, 1, 1] ->
[I, O]; GroupNorm weight -> scale; embeddings as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from vq_jax.convert.arch import ConversionError
from vq_jax.convert.torch_file import to_numpy

KeyFn = Callable[[tuple[str, ...]], str]


def torch_shape(jax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The PyTorch shape of a vq-jax leaf: conv HWIO -> OIHW, Dense [I, O] -> [O, I, 1, 1]."""
    if leaf == "kernel" and len(jax_shape) == 4:
        kh, kw, i, o = jax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(jax_shape) == 2:
        i, o = jax_shape
        return (o, i, 1, 1)
    return tuple(jax_shape)


def to_jax_layout(value: np.ndarray, jax_shape: tuple[int, ...], leaf: str) -> np.ndarray:
    """A PyTorch array (already shape-checked) in the vq-jax leaf's layout."""
    if leaf == "kernel" and len(jax_shape) == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if leaf == "kernel" and len(jax_shape) == 2:
        return np.ascontiguousarray(value[:, :, 0, 0].T)
    return value


def leaf_name(leaf: str) -> str:
    """PyTorch's name of a vq-jax leaf (conv / dense kernel and GroupNorm scale are 'weight')."""
    return {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def fill_params(
    state_dict: Mapping[str, Any],
    abstract_params: Any,
    torch_key: KeyFn,
    *,
    source: str,
    ignored: Callable[[str], bool],
    hint: str,
) -> Any:
    """vq-jax params (numpy, float32) with `abstract_params`' tree, from `state_dict`.

    `ignored(key)` marks keys that are not generator weights (losses, usage buffers); `hint`
    ends every error with the likely fix (wrong source, architecture config not matching).
    """
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    expected: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for path, leaf in flat:
        names = tuple(p.key for p in path)
        expected[torch_key(names)] = (names, tuple(leaf.shape))
    for key in state_dict:
        if key not in expected and not ignored(key):
            example = next(iter(expected))
            raise ConversionError(
                f"unknown key {key!r} in the {source} checkpoint: this architecture has no such "
                f"weight (its keys look like {example!r}, shape "
                f"{torch_shape(expected[example][1], expected[example][0][-1])}); {hint}"
            )
    values: dict[tuple[str, ...], np.ndarray] = {}
    for key, (names, shape) in expected.items():
        want = torch_shape(shape, names[-1])
        if key not in state_dict:
            raise ConversionError(
                f"the {source} checkpoint lacks key {key!r} (expected shape {want}); {hint}"
            )
        value = to_numpy(state_dict[key])
        if tuple(value.shape) != want:
            raise ConversionError(
                f"key {key!r} of the {source} checkpoint has shape {tuple(value.shape)}, expected "
                f"{want}; {hint}"
            )
        values[names] = to_jax_layout(value, shape, names[-1])

    def take(path, leaf):
        del leaf
        return values[tuple(p.key for p in path)]

    return jax.tree_util.tree_map_with_path(take, abstract_params)
