"""GroupNorm for NHWC tensors with per-channel statistics first (3x faster forward on XLA:CPU).

``flax.linen.GroupNorm`` reduces x reshaped to [B, H, W, G, C/G] over (H, W, C/G): the innermost
reduced axis has C/G elements (often 2), which XLA:CPU runs single-threaded at ~1 GB/s. Here the
sums of x and x^2 are first taken over (H, W) per channel (a vectorised reduction over major
axes), then over the C/G channels of each group on the tiny [B, C] result, and the normalisation
is one fused multiply-add per element with per-(example, channel) coefficients. Same statistics
as flax's (float32 mean and E[x^2] - E[x]^2 variance, clamped at 0), same parameters
(``scale``, ``bias`` [C]); outputs agree to float rounding.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax import native

Dtype = jnp.dtype | type
IMPLS = ("xla", "native")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _native_group_norm(x, scale, bias, num_groups, epsilon, swish):
    return native.group_norm_forward(x, scale, bias, num_groups, epsilon, swish)[0]


def _native_fwd(x, scale, bias, num_groups, epsilon, swish):
    out, mean, rstd = native.group_norm_forward(x, scale, bias, num_groups, epsilon, swish)
    return out, (x, scale, bias, mean, rstd)


def _native_bwd(num_groups, epsilon, swish, res, dout):
    x, scale, bias, mean, rstd = res
    return native.group_norm_backward(x, scale, bias, mean, rstd, dout, num_groups, swish)


_native_group_norm.defvjp(_native_fwd, _native_bwd)


class GroupNorm(nn.Module):
    """y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias over [B, H, W, C] inputs, then
    swish(y) = y * sigmoid(y) when ``swish``.

    ``impl="native"`` computes float32 inputs on CPU with ``vq_jax.native``'s kernel (forward and
    one backward pass; not differentiable twice), and everything else as below.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    swish: bool = False
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"GroupNorm expects NHWC inputs [B, H, W, C], got shape {x.shape}.")
        c, g = x.shape[-1], self.num_groups
        if g <= 0 or c % g:
            raise ValueError(
                f"GroupNorm: {c} channels are not divisible by num_groups={g}; choose num_groups "
                "dividing the channel count."
            )
        if self.impl not in IMPLS:
            raise ValueError(f"GroupNorm impl must be one of {IMPLS}, got {self.impl!r}")
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        if self.impl == "native" and x.dtype == jnp.float32 and self.dtype == jnp.float32:
            native.require()
            args = (x, scale.astype(jnp.float32), bias.astype(jnp.float32))
            return jax.lax.platform_dependent(
                *args,
                cpu=lambda *a: _native_group_norm(*a, g, self.epsilon, self.swish),
                default=lambda *a: self._xla(*a),
            )
        return self._xla(x, scale, bias)

    def _xla(self, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32)
        count = h * w * (c // g)
        mean = jnp.sum(xf, axis=(1, 2)).reshape(b, g, -1).sum(-1) / count  # [B, G]
        mean_sq = jnp.sum(jnp.square(xf), axis=(1, 2)).reshape(b, g, -1).sum(-1) / count
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        mul = jnp.repeat(inv, c // g, axis=1) * scale.astype(jnp.float32)  # [B, C]
        add = bias.astype(jnp.float32) - jnp.repeat(mean, c // g, axis=1) * mul
        y = (xf * mul[:, None, None, :] + add[:, None, None, :]).astype(self.dtype)
        return nn.swish(y) if self.swish else y
