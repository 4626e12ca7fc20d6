"""The native GroupNorm (+ swish) kernel as a differentiable GroupNorm kernel for the networks.

Forward and first backward pass run ``csrc/group_norm_swish.cc`` (two sweeps each, parallel over
the batch) on CPU, XLA's formulation (``vq_jax.nets.group_norm.group_norm``) elsewhere. Higher
derivatives (the discriminator's R1 penalty) differentiate XLA's formulation of the backward
pass, so the kernel can be differentiated any number of times.
"""

import functools

import jax
import jax.numpy as jnp

from vq_jax.cpu import native
from vq_jax.nets.group_norm import group_norm as xla_group_norm


def _xla_forward(num_groups, epsilon, swish, x, scale, bias):
    """(out, mean, rstd) as the native forward returns them, in XLA's ops."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, num_groups, c // num_groups)
    mean = jnp.mean(xg, axis=(1, 3))
    var = jnp.maximum(jnp.mean(jnp.square(xg), axis=(1, 3)) - jnp.square(mean), 0.0)
    out = xla_group_norm(x, scale, bias, num_groups, epsilon, swish)
    return out, mean, jax.lax.rsqrt(var + epsilon)


def _xla_grads(num_groups, epsilon, swish, x, scale, bias, dout):
    """(dx, dscale, dbias) of sum(group_norm(x, scale, bias) * dout), in XLA's ops."""
    f = functools.partial(xla_group_norm, num_groups=num_groups, epsilon=epsilon, swish=swish)
    return jax.vjp(f, x, scale, bias)[1](dout)


# Each native pass is a custom_vjp whose VJP is XLA's formulation of that pass's derivative: the
# custom calls are never differentiated themselves (they have no JVP rule).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _forward(x, scale, bias, num_groups, epsilon, swish):
    return native.group_norm_forward(x, scale, bias, num_groups, epsilon, swish)


def _forward_fwd(x, scale, bias, num_groups, epsilon, swish):
    return _forward(x, scale, bias, num_groups, epsilon, swish), (x, scale, bias)


def _forward_bwd(num_groups, epsilon, swish, res, cts):
    _, vjp = jax.vjp(functools.partial(_xla_forward, num_groups, epsilon, swish), *res)
    return vjp(cts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _backward(x, scale, bias, mean, rstd, dout, num_groups, epsilon, swish):
    del epsilon  # in rstd already
    return native.group_norm_backward(x, scale, bias, mean, rstd, dout, num_groups, swish)


def _backward_fwd(x, scale, bias, mean, rstd, dout, num_groups, epsilon, swish):
    out = _backward(x, scale, bias, mean, rstd, dout, num_groups, epsilon, swish)
    return out, (x, scale, bias, mean, rstd, dout)


def _backward_bwd(num_groups, epsilon, swish, res, cts):
    x, scale, bias, mean, rstd, dout = res
    grads = functools.partial(_xla_grads, num_groups, epsilon, swish)
    dx, dscale, dbias, ddout = jax.vjp(grads, x, scale, bias, dout)[1](cts)
    # mean and rstd are functions of x: XLA's formulation above already differentiates them
    return dx, dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(rstd), ddout


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, swish):
    return _forward(x, scale, bias, num_groups, epsilon, swish)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish):
    out, mean, rstd = _forward(x, scale, bias, num_groups, epsilon, swish)
    return out, (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, res, dout):
    return _backward(*res, dout, num_groups, epsilon, swish)


_forward.defvjp(_forward_fwd, _forward_bwd)
_backward.defvjp(_backward_fwd, _backward_bwd)
_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, swish: bool
) -> jax.Array:
    """GroupNorm (then swish) of float32 NHWC `x`: the native kernel on CPU, XLA's elsewhere
    (``vq_jax.nets.kernels.GroupNormKernel``)."""
    args = (x, scale.astype(jnp.float32), bias.astype(jnp.float32))
    return jax.lax.platform_dependent(
        *args,
        cpu=lambda *a: _group_norm(*a, num_groups, epsilon, swish),
        default=lambda *a: xla_group_norm(*a, num_groups, epsilon, swish),
    )
