"""Pretrained weight files of fixed networks (LPIPS's VGG16, FID's InceptionV3): one `.npz` of
float arrays under flat keys such as 'vgg/conv1_1/kernel', read, checked against the network's
own parameter shapes and nested, with errors that name the converter to run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _flat_keys(tree: dict) -> list[tuple[str, object]]:
    return [
        ("/".join(str(p.key) for p in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def flatten(params: dict) -> dict[str, np.ndarray]:
    """Nested params -> {'a/b/kernel': array, ...} (the .npz key layout)."""
    return {key: np.asarray(leaf) for key, leaf in _flat_keys(params)}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/kernel': array, ...} -> nested params of float32 jnp arrays."""
    params: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return params


def shapes_of(init: Callable[[], dict]) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every parameter that `init()` (a flax init, traced abstractly, so
    nothing is computed) returns under 'params'."""
    return {key: tuple(leaf.shape) for key, leaf in _flat_keys(jax.eval_shape(init)["params"])}


def check(
    flat: dict[str, np.ndarray],
    expected: dict[str, tuple[int, ...]],
    *,
    source: str,
    network: str,
    hint: str,
    shape_note: str = "",
) -> None:
    """Raise ValueError unless `flat` holds exactly the `expected` keys, shapes and float dtypes.

    `network` names what the file should hold ("an LPIPS-VGG16 weight file"), `hint` the fix,
    `shape_note` what a wrong shape usually means.
    """
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source} is not {network}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''} ({len(missing)} missing, {len(extra)} "
            f"unexpected); {hint}."
        )
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(flat[key].shape)}, expected {shape}"
                f"{shape_note}; {hint}."
            )
        if not np.issubdtype(flat[key].dtype, np.floating):
            raise ValueError(
                f"{source}: {key} has dtype {flat[key].dtype}, expected floating point; {hint}."
            )


def load(
    path: str | os.PathLike | None, *, what: str, hint: str, validate: Callable[[dict, str], None]
) -> dict:
    """Nested float32 params from the .npz at `path`, after `validate(flat, source)`.

    A missing path is a FileNotFoundError and an unreadable or wrong file a ValueError; both
    name `what` the file is and end with `hint`, the command that makes it.
    """
    path = os.path.expanduser(os.fspath(path)) if path else ""
    if not path:
        raise FileNotFoundError(f"no {what} file given (weights=''); {hint}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file weights={path!r} does not exist; {hint}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read weights={path!r} as a .npz file ({e}); {hint}.") from e
    validate(flat, f"weights={path!r}")
    return unflatten(flat)


def save(flat: dict[str, np.ndarray], out: str | os.PathLike) -> str:
    """Write `flat` to `out` (".npz" appended if missing) atomically: readers never see a
    half-written file. Returns the path written."""
    out = os.path.expanduser(os.fspath(out))
    if not out.endswith(".npz"):
        out += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, out)
    return out
