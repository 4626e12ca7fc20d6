"""The FID InceptionV3 (TF graph of 2015-12-05) up to pool3, in Flax: [N,299,299,3] -> [N,2048].

This is the network every published FID uses (TF's `inception-2015-12-05`, pytorch-fid's
`pt_inception-2015-12-05`), including its quirks, which differ from torchvision's InceptionV3:

* every conv is conv (no bias) -> BatchNorm (no gamma, eps 1e-3) -> ReLU. The converter folds the
  inference-mode BatchNorm into the conv in float64 (kernel * 1/sqrt(var + eps), bias
  beta - mean/sqrt(var + eps)), so here a conv is a plain biased conv + ReLU;
* the 3x3 average pools inside the blocks do not count padding (``count_include_pad=False``);
* the last block (``mixed_10``) pools its side branch with a 3x3 *max* pool, the earlier
  ``mixed_9`` with an average pool;
* pool3 is an 8x8 average pool of the 8x8x2048 map, i.e. the spatial mean.

Input: NHWC float images already resized to 299x299 and scaled to [-1, 1] (see ``vq_jax.fid``
for the resize protocol). Parameter names follow the TorchScript model's module paths
(``net.layers.mixed_4.tower_1.conv_2`` -> ``mixed_4/tower_1_conv_2``), so the converter is a
rename. Weights come from ``scripts/convert_inception.py`` and load with
:func:`load_inception_params`; nothing is downloaded.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vq_jax.nets import kernels, weight_files

INPUT_SIZE = 299
FEATURE_DIM = 2048

CONVERT_HINT = (
    "create it with `pip install -e '.[fid]' && python scripts/convert_inception.py --out=PATH.npz`"
)

Padding = int | tuple[int, int]


def conv_relu(
    x: jax.Array,
    features: int,
    kernel: tuple[int, int],
    name: str,
    stride: int = 1,
    padding: Padding = 0,
) -> jax.Array:
    """A conv with the BatchNorm folded into its bias, then ReLU (the TF graph's conv unit).

    Call inside a compact method: the ``Conv`` becomes the caller's submodule ``name``
    (``nets.kernels.conv``: flax's Conv, through oneDNN where ``vq_jax.cpu.enable`` installed it).
    """
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    conv = kernels.conv(features, kernel, (stride, stride), ((ph, ph), (pw, pw)), name=name)
    return nn.relu(conv(x))


def _avg_pool3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, padding not counted (TF's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x: jax.Array, stride: int, pad: int) -> jax.Array:
    p = ((pad, pad), (pad, pad))
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=p)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (35x35 grid)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = conv_relu(x, 64, (1, 1), "conv")
        b1 = conv_relu(x, 48, (1, 1), "tower_conv")
        b1 = conv_relu(b1, 64, (5, 5), "tower_conv_1", padding=2)
        b2 = conv_relu(x, 64, (1, 1), "tower_1_conv")
        b2 = conv_relu(b2, 96, (3, 3), "tower_1_conv_1", padding=1)
        b2 = conv_relu(b2, 96, (3, 3), "tower_1_conv_2", padding=1)
        b3 = conv_relu(_avg_pool3(x), self.pool_features, (1, 1), "tower_2_conv")
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    """mixed_3: 35x35 -> 17x17 by a strided 3x3 conv, a 1x1-3x3-3x3/2 tower and a max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = conv_relu(x, 384, (3, 3), "conv", stride=2)
        b1 = conv_relu(x, 64, (1, 1), "tower_conv")
        b1 = conv_relu(b1, 96, (3, 3), "tower_conv_1", padding=1)
        b1 = conv_relu(b1, 96, (3, 3), "tower_conv_2", stride=2)
        return jnp.concatenate([b0, b1, _max_pool3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7: factorised 7x7 convs on the 17x17 grid."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        b0 = conv_relu(x, 192, (1, 1), "conv")
        b1 = conv_relu(x, c, (1, 1), "tower_conv")
        b1 = conv_relu(b1, c, (1, 7), "tower_conv_1", padding=(0, 3))
        b1 = conv_relu(b1, 192, (7, 1), "tower_conv_2", padding=(3, 0))
        b2 = conv_relu(x, c, (1, 1), "tower_1_conv")
        b2 = conv_relu(b2, c, (7, 1), "tower_1_conv_1", padding=(3, 0))
        b2 = conv_relu(b2, c, (1, 7), "tower_1_conv_2", padding=(0, 3))
        b2 = conv_relu(b2, c, (7, 1), "tower_1_conv_3", padding=(3, 0))
        b2 = conv_relu(b2, 192, (1, 7), "tower_1_conv_4", padding=(0, 3))
        b3 = conv_relu(_avg_pool3(x), 192, (1, 1), "tower_2_conv")
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
    """mixed_8: 17x17 -> 8x8 by two strided towers and a max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = conv_relu(x, 192, (1, 1), "tower_conv")
        b0 = conv_relu(b0, 320, (3, 3), "tower_conv_1", stride=2)
        b1 = conv_relu(x, 192, (1, 1), "tower_1_conv")
        b1 = conv_relu(b1, 192, (1, 7), "tower_1_conv_1", padding=(0, 3))
        b1 = conv_relu(b1, 192, (7, 1), "tower_1_conv_2", padding=(3, 0))
        b1 = conv_relu(b1, 192, (3, 3), "tower_1_conv_3", stride=2)
        return jnp.concatenate([b0, b1, _max_pool3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """mixed_9 (average-pool branch) and mixed_10 (max-pool branch, the TF graph's quirk)."""

    max_pool_branch: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = conv_relu(x, 320, (1, 1), "conv")
        a = conv_relu(x, 384, (1, 1), "tower_conv")
        a1 = conv_relu(a, 384, (1, 3), "tower_mixed_conv", padding=(0, 1))
        a2 = conv_relu(a, 384, (3, 1), "tower_mixed_conv_1", padding=(1, 0))
        b = conv_relu(x, 448, (1, 1), "tower_1_conv")
        b = conv_relu(b, 384, (3, 3), "tower_1_conv_1", padding=1)
        b1 = conv_relu(b, 384, (1, 3), "tower_1_mixed_conv", padding=(0, 1))
        b2 = conv_relu(b, 384, (3, 1), "tower_1_mixed_conv_1", padding=(1, 0))
        pooled = _max_pool3(x, 1, 1) if self.max_pool_branch else _avg_pool3(x)
        b3 = conv_relu(pooled, 192, (1, 1), "tower_2_conv")
        return jnp.concatenate([b0, a1, a2, b1, b2, b3], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3 trunk; returns pool3 features [N, 2048] (float32)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"InceptionV3 expects NHWC RGB images [N, 299, 299, 3] in [-1, 1], got shape "
                f"{x.shape}; use vq_jax.fid.preprocess to resize and scale uint8 images"
            )
        x = x.astype(jnp.float32)
        x = conv_relu(x, 32, (3, 3), "conv", stride=2)
        x = conv_relu(x, 32, (3, 3), "conv_1")
        x = conv_relu(x, 64, (3, 3), "conv_2", padding=1)
        x = _max_pool3(x, 2, 0)
        x = conv_relu(x, 80, (1, 1), "conv_3")
        x = conv_relu(x, 192, (3, 3), "conv_4")
        x = _max_pool3(x, 2, 0)
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, c in zip(range(4, 8), (128, 160, 160, 192), strict=True):
            x = InceptionC(c, name=f"mixed_{i}")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(max_pool_branch=False, name="mixed_9")(x)
        x = InceptionE(max_pool_branch=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # pool3: 8x8 average pool of the 8x8 map


def inception_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat key ('mixed_4/tower_1_conv_2/conv/kernel', ...) -> shape of every parameter."""
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return weight_files.shapes_of(lambda: InceptionV3().init(jax.random.key(0), x))


def validate_flat_params(flat: dict[str, np.ndarray], source: str) -> None:
    """Raise ValueError unless `flat` has exactly the InceptionV3 keys and shapes."""
    weight_files.check(
        flat,
        inception_param_shapes(),
        source=source,
        network="an FID InceptionV3 weight file",
        hint=CONVERT_HINT,
    )


def load_inception_params(path: str | os.PathLike) -> dict:
    """Nested float32 params from a .npz written by scripts/convert_inception.py."""
    return weight_files.load(
        path, what="Inception weight", hint=CONVERT_HINT, validate=validate_flat_params
    )
