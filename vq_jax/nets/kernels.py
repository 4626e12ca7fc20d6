"""The runtime kernel setting the networks read: which conv, GroupNorm and code search run.

Networks build ``conv(...)`` (``nn.Conv`` with ``conv_general_dilated`` below), ask
``group_norm_kernel()`` in their GroupNorm, and the quantizers' large-codebook search asks
``current().nearest_code``; all read the installed ``Kernels`` while tracing.
The default is XLA's own ops. ``vq_jax.cpu.enable`` installs the native CPU kernels (oneDNN
convs, fused GroupNorm + swish, the screened code search); nothing here imports it, so the
networks work without it.
The setting chooses how the same sums are computed, never parameters or shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

# (x, scale, bias, num_groups, epsilon, swish) -> y, for float32 NHWC x: GroupNorm (then swish)
GroupNormKernel = Callable[[jax.Array, jax.Array, jax.Array, int, float, bool], jax.Array]
# (x [N, D], codebook [K, D]) -> index [N] int32 of the nearest code (squared L2, lowest on ties)
SearchKernel = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One choice of kernels: `conv` has ``jax.lax.conv_general_dilated``'s signature;
    `group_norm` is None for the networks' own (XLA) GroupNorm formulation; `nearest_code` is
    None for XLA's search (``quantizers.xla_nearest_code``) over codebooks of more than
    ``quantizers.CPU_SEARCH_ABOVE`` codes."""

    name: str
    conv: Callable[..., jax.Array] = jax.lax.conv_general_dilated
    group_norm: GroupNormKernel | None = None
    nearest_code: SearchKernel | None = None


XLA = Kernels("xla")
_current: Kernels = XLA


def current() -> Kernels:
    """The kernels programs traced from now on use."""
    return _current


def install(kernels: Kernels) -> None:
    """Use `kernels` in every program traced from now on. A change drops JAX's caches, so no
    program traced under the previous setting is reused."""
    global _current
    if kernels != _current:
        _current = kernels
        jax.clear_caches()


@contextlib.contextmanager
def installed(kernels: Kernels) -> Iterator[Kernels]:
    """``install(kernels)`` for the duration of a ``with`` block, then the previous setting."""
    previous = current()
    install(kernels)
    try:
        yield kernels
    finally:
        install(previous)


def conv_general_dilated(*args, **kwargs) -> jax.Array:
    """``jax.lax.conv_general_dilated`` through the installed conv kernel (nn.Conv's hook)."""
    return _current.conv(*args, **kwargs)


def group_norm_kernel() -> GroupNormKernel | None:
    """The installed GroupNorm kernel, or None for the networks' XLA formulation."""
    return _current.group_norm


def conv(
    features: int,
    kernel_size: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    **kwargs: Any,
) -> nn.Conv:
    """flax's ``nn.Conv`` computing through the installed conv kernel; float32 compute unless
    `dtype` says otherwise. Parameters ``kernel`` [kh, kw, in, out] and ``bias`` [out]."""
    kwargs.setdefault("dtype", jnp.float32)
    return nn.Conv(
        features,
        kernel_size,
        strides,
        padding,
        conv_general_dilated=conv_general_dilated,
        **kwargs,
    )
