"""LPIPS of converted weights on standard distortions of Fashion-MNIST test images, next to MSE
and next to a random He-normal VGG16 trunk with the same heads (docs/lpips_weights.md).

  python -m benchmarks.lpips_distortions --weights=~/.cache/vq_jax/lpips_vgg16.npz --num=8

Images: the first NUM test images, zero-padded to 32x32, uint8; distortions applied in uint8
(rounded, clipped). Prints a markdown table: mean over the NUM images.
"""

import io
import os

import jax
import numpy as np
import scipy.ndimage
from absl import app, flags
from PIL import Image

from vq_jax import data
from vq_jax.nets.lpips import (
    LPIPS,
    default_weights_path,
    load_lpips_params,
    lpips_param_shapes,
    unflatten_params,
)

_WEIGHTS = flags.DEFINE_string("weights", None, "LPIPS .npz (default: the cache path).")
_NUM = flags.DEFINE_integer("num", 8, "Test images.")


def distortions(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> distorted copy of uint8 [N, H, W, 1] images."""
    rng = np.random.default_rng(seed)
    u8 = lambda v: np.clip(np.rint(np.asarray(v, np.float64)), 0, 255).astype(np.uint8)

    def jpeg(q: int) -> np.ndarray:
        out = []
        for im in x:
            buf = io.BytesIO()
            Image.fromarray(im[..., 0]).save(buf, format="JPEG", quality=q)
            out.append(np.asarray(Image.open(buf))[..., None])
        return np.stack(out)

    cases = {"identical": x}
    for s in (0.5, 1.0, 2.0):
        cases[f"gaussian blur sigma {s}"] = u8(
            [scipy.ndimage.gaussian_filter(i.astype(np.float64), (s, s, 0)) for i in x]
        )
    for s in (8, 16, 32, 64):
        cases[f"gaussian noise std {s}"] = u8(x + rng.normal(0, s, x.shape))
    for q in (90, 50, 20, 5):
        cases[f"JPEG quality {q}"] = jpeg(q)
    for s in (1, 2, 4):
        cases[f"shift {s} px (wrap)"] = np.roll(x, s, axis=2)
    return cases


def random_trunk(params: dict, seed: int = 1) -> dict:
    """He-normal VGG16 convs, zero biases, and the given params' heads."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in lpips_param_shapes().items():
        if key.startswith("lin"):
            flat[key] = np.asarray(params[key.split("/")[0]]["kernel"])
        elif key.endswith("bias"):
            flat[key] = np.zeros(shape, np.float32)
        else:
            fan_in = shape[0] * shape[1] * shape[2]
            flat[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return unflatten_params(flat)


def main(argv):
    del argv
    path = os.path.expanduser(_WEIGHTS.value or default_weights_path())
    params = load_lpips_params(path)
    rand = random_trunk(params)
    images, _ = data.load_fashion_mnist("test")
    n = _NUM.value
    x = np.pad(np.asarray(images[:n]).reshape(n, 28, 28, 1), ((0, 0), (2, 2), (2, 2), (0, 0)))
    f = lambda v: np.asarray(v, np.float32) / 127.5 - 1.0
    apply = jax.jit(LPIPS().apply)
    print(f"LPIPS of {path}, mean over {n} Fashion-MNIST test images (32x32)\n")
    print("| distortion | MSE ([-1, 1]) | LPIPS (converted) | LPIPS (random trunk) |")
    print("|---|---|---|---|")
    for name, v in distortions(x).items():
        a, b = f(x), f(v)
        real = float(np.mean(apply({"params": params}, a, b)))
        rnd = float(np.mean(apply({"params": rand}, a, b)))
        print(f"| {name} | {np.mean((a - b) ** 2):.4f} | {real:.4f} | {rnd:.4f} |")


if __name__ == "__main__":
    app.run(main)
