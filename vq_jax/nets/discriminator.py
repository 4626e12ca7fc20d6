"""PatchGAN discriminator (Isola et al., 2017) as used by VQGAN (Esser et al., 2021).

Stack of 4x4 convs with padding 1: a stride-2 conv without normalisation, ``n_layers - 1``
stride-2 convs with channel multiplier min(2^n, 8), one stride-1 conv with multiplier
min(2^n_layers, 8), and a stride-1 conv to one channel. Each output pixel is the real/fake logit of
one overlapping image patch (70x70 receptive field for n_layers=3).

Normalisation choice: the reference design uses BatchNorm. Batch statistics depend on how a batch
is split across devices (per-device statistics unless cross-replica synchronised), on the batch
size, and need a mutable running-average collection; the same checkpoint would then score images
differently under different meshes and between train and eval. We therefore use per-example
normalisation only: ``norm='group'`` (GroupNorm, default), ``'layer'`` (LayerNorm over channels)
or ``'none'``. These give identical results under any sharding and carry no state. Convs that
are followed by a norm have no bias (the norm's shift makes it redundant).

Conv kernels use N(0, 0.02) initialisation (the DCGAN convention the reference also uses).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax.nets import kernels
from vq_jax.nets.group_norm import GroupNorm

Dtype = jnp.dtype | type

NORMS = ("group", "layer", "none")
_KERNEL = 4
_PAD = 1


def patch_output_size(size: int, n_layers: int) -> int:
    """Side length of the logit map for an input side ``size`` (conv arithmetic, k=4, p=1)."""
    for _ in range(n_layers):
        size = (size + 2 * _PAD - _KERNEL) // 2 + 1
    for _ in range(2):
        size = size + 2 * _PAD - _KERNEL + 1
    return size


class NLayerDiscriminator(nn.Module):
    """Image [B, H, W, C] -> per-patch logits [B, h', w', 1] (float32)."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    def _norm(self, channels: int, name: str) -> nn.Module | None:
        if self.norm == "group":
            if channels % self.num_groups:
                raise ValueError(
                    f"discriminator layer has {channels} channels, not divisible by num_groups="
                    f"{self.num_groups}; pick num_groups dividing ndf (={self.ndf})."
                )
            return GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype, name=name)
        if self.norm == "layer":
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        return None

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
        return kernels.conv(
            features,
            (_KERNEL, _KERNEL),
            strides=(stride, stride),
            padding=((_PAD, _PAD), (_PAD, _PAD)),
            use_bias=use_bias,
            kernel_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Return logits, or (logits, features) with the activation after every LeakyReLU.

        ``train`` is accepted for interface symmetry; no layer behaves differently in training.
        """
        del train
        if self.norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {self.norm!r}; use one of {NORMS}.")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}; use e.g. n_layers=3.")
        if x.ndim != 4:
            raise ValueError(
                f"discriminator expects NHWC images [B, H, W, C], got shape {x.shape}."
            )
        out_h = patch_output_size(x.shape[1], self.n_layers)
        out_w = patch_output_size(x.shape[2], self.n_layers)
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"input {x.shape[1]}x{x.shape[2]} is too small for a {self.n_layers}-layer "
                "PatchGAN (empty logit map); use larger images or fewer n_layers."
            )

        use_bias = self.norm == "none"
        features: list[jax.Array] = []
        h = self._conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        features.append(h.astype(jnp.float32))
        for n in range(1, self.n_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * mult, stride, use_bias, f"conv_{n}")(h)
            norm = self._norm(self.ndf * mult, f"norm_{n}")
            if norm is not None:
                h = norm(h)
            h = nn.leaky_relu(h, 0.2)
            features.append(h.astype(jnp.float32))
        logits = self._conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
        if return_features:
            return logits, features
        return logits
