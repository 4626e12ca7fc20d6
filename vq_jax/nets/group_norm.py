"""GroupNorm for NHWC tensors with per-channel statistics first (3x faster forward on XLA:CPU).

``flax.linen.GroupNorm`` reduces x reshaped to [B, H, W, G, C/G] over (H, W, C/G): the innermost
reduced axis has C/G elements (often 2), which XLA:CPU runs single-threaded at ~1 GB/s. Here the
sums of x and x^2 are first taken over (H, W) per channel (a vectorised reduction over major
axes), then over the C/G channels of each group on the tiny [B, C] result, and the normalisation
is one fused multiply-add per element with per-(example, channel) coefficients. Same statistics
as flax's (float32 mean and E[x^2] - E[x]^2 variance, clamped at 0), same parameters
(``scale``, ``bias`` [C]); outputs agree to float rounding.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax.nets import kernels

Dtype = jnp.dtype | type


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float,
    swish: bool,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """GroupNorm (then swish) of NHWC `x` in XLA's ops: statistics in float32, output `dtype`."""
    b, h, w, c = x.shape
    g = num_groups
    xf = x.astype(jnp.float32)
    count = h * w * (c // g)
    mean = jnp.sum(xf, axis=(1, 2)).reshape(b, g, -1).sum(-1) / count  # [B, G]
    mean_sq = jnp.sum(jnp.square(xf), axis=(1, 2)).reshape(b, g, -1).sum(-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + epsilon)
    mul = jnp.repeat(inv, c // g, axis=1) * scale.astype(jnp.float32)  # [B, C]
    add = bias.astype(jnp.float32) - jnp.repeat(mean, c // g, axis=1) * mul
    y = (xf * mul[:, None, None, :] + add[:, None, None, :]).astype(dtype)
    return nn.swish(y) if swish else y


class GroupNorm(nn.Module):
    """y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias over [B, H, W, C] inputs, then
    swish(y) = y * sigmoid(y) when ``swish``.

    Float32 inputs computed in float32 use the installed GroupNorm kernel when there is one
    (``vq_jax.nets.kernels``; ``vq_jax.cpu.enable`` installs the native CPU kernel), else
    ``group_norm`` above.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    swish: bool = False

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
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        kernel = kernels.group_norm_kernel()
        if kernel is not None and x.dtype == jnp.float32 and self.dtype == jnp.float32:
            return kernel(x, scale, bias, g, self.epsilon, self.swish)
        return group_norm(x, scale, bias, g, self.epsilon, self.swish, self.dtype)
