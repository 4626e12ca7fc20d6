"""Evaluation metrics (PSNR, SSIM, codebook statistics) and metric / image writers.

``psnr``, ``ssim``, ``code_histogram`` and ``codebook_stats`` are jittable ``jnp`` functions (the
code histogram and its statistics are the quantizers' own, from vq_jax.nets.quantizers).
``MetricWriter`` and the image helpers are host-side (numpy / PIL / tensorboardX) and are meant to
run on process 0 only.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# One histogram for training and evaluation: the quantizers' (re-exported here).
from vq_jax.nets.quantizers import code_histogram as code_histogram
from vq_jax.nets.quantizers import histogram_stats

# PSNR clamps the per-image MSE here, so identical images give a finite value
# (10 * log10(data_range**2 / 1e-10), ~106 dB for data_range=2) instead of inf.
PSNR_MIN_MSE = 1e-10

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array, name: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"{name} expects two NHWC batches of equal shape, got {x.shape} and {y.shape}; "
            "add a batch axis with x[None] for single images"
        )


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Per-image PSNR in dB for NHWC batches: 10 log10(data_range^2 / MSE), shape [B].

    ``data_range`` is max - min of the pixel scale (2.0 for images in [-1, 1]). The per-image MSE
    is clamped at ``PSNR_MIN_MSE`` (1e-10), so identical images give a large finite value
    (~106 dB for data_range=2) rather than inf, keeping batch means finite.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    _check_pair(x, y, "psnr")
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    mse = jnp.maximum(mse, PSNR_MIN_MSE)
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _valid_filter(maps: jax.Array, kernel_1d: np.ndarray) -> jax.Array:
    """Separable 'valid' Gaussian filtering of every channel of [N, H, W, C] independently."""
    n, h, w, c = maps.shape
    # Fold channels into the batch so one single-channel conv handles all of them.
    flat = jnp.transpose(maps, (0, 3, 1, 2)).reshape(n * c, h, w, 1)
    k = jnp.asarray(kernel_1d)
    dn = ("NHWC", "HWIO", "NHWC")
    flat = jax.lax.conv_general_dilated(
        flat, k.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn
    )
    flat = jax.lax.conv_general_dilated(
        flat, k.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dn
    )
    _, ho, wo, _ = flat.shape
    return jnp.transpose(flat.reshape(n, c, ho, wo), (0, 2, 3, 1))


def ssim_defined(shape: tuple[int, ...]) -> bool:
    """Whether SSIM's 11x11 window fits images of NHWC ``shape``; below it (e.g. 8x8
    low-resolution images) callers leave SSIM out of their results instead of reporting NaN."""
    return min(shape[1:3]) >= SSIM_WINDOW


def ssim_text(result: dict[str, Any]) -> str:
    """``result["ssim"]`` for a log line or table, or "n/a" where the images were too small."""
    return f"{result['ssim']:.4f}" if "ssim" in result else f"n/a (< {SSIM_WINDOW} px)"


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Per-image SSIM (Wang et al. 2004) for NHWC batches, shape [B], computed in float32.

    11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, population (biased) local statistics,
    mean of the SSIM map over the valid region (no padding) and over channels. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=-1)``. Needs H, W >= 11.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    _check_pair(x, y, "ssim")
    if not ssim_defined(x.shape):
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
            f"{x.shape[1]}x{x.shape[2]}; upsample the images or use psnr instead"
        )
    b = x.shape[0]
    kernel = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA)
    stats = _valid_filter(jnp.concatenate([x, y, x * x, y * y, x * y], axis=0), kernel)
    mu_x, mu_y, e_xx, e_yy, e_xy = (stats[i * b : (i + 1) * b] for i in range(5))
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def codebook_stats(counts: jax.Array) -> dict[str, jax.Array]:
    """Perplexity (exp of the entropy of counts / sum) and usage (fraction of codes with count > 0)
    of a histogram from ``code_histogram``. An all-zero histogram gives perplexity 1 and usage 0.
    """
    perplexity, usage = histogram_stats(counts)
    return {"perplexity": perplexity, "usage": usage}


def usage_summary(stage_counts: Any) -> dict[str, Any]:
    """The evaluation's codebook fields from per-stage histograms [depth, K] (depth 1 for one
    token per position): usage, perplexity and codes used of the histogram pooled over the
    stages, and for depth > 1 the usage and codes used of each stage (residual VQ's stages with
    separate codebooks are separate vocabularies, which the pooled figures merge)."""
    counts = np.asarray(stage_counts, np.float64)
    pooled = codebook_stats(jnp.asarray(counts.sum(axis=0), jnp.float32))
    out: dict[str, Any] = {
        "codebook_usage": float(pooled["usage"]),
        "codebook_perplexity": float(pooled["perplexity"]),
        "codes_used": int(np.sum(counts.sum(axis=0) > 0)),
    }
    if counts.shape[0] > 1:  # scalars, so that they log like the rest
        for s, c in enumerate(counts):
            out[f"codebook_usage_stage{s}"] = float(np.mean(c > 0))
            out[f"codes_used_stage{s}"] = int(np.sum(c > 0))
    return out


def stage_usages(result: dict[str, Any]) -> list[float]:
    """The per-stage usages of a `usage_summary` result, in stage order ([] for depth 1)."""
    usages, s = [], 0
    while f"codebook_usage_stage{s}" in result:
        usages.append(result[f"codebook_usage_stage{s}"])
        s += 1
    return usages


def stage_usage_text(result: dict[str, Any]) -> str:
    """The per-stage usages as "0.065 / 0.313 / ..." for logs and tables ("" for depth 1)."""
    return " / ".join(f"{u:.3f}" for u in stage_usages(result))


def to_uint8(images: Any) -> np.ndarray:
    """Map float images in [-1, 1] to uint8 [0, 255] (rounded, clipped)."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [H', W', C] grid with ``pad`` px borders.

    Rows = ceil(N / ncols); padding surrounds every tile, so
    H' = rows * H + (rows + 1) * pad and W' = ncols * W + (ncols + 1) * pad.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"image_grid expects [N, H, W, C] images, got shape {images.shape}; "
            "add a channel axis with x[..., None] for grayscale"
        )
    if ncols < 1:
        raise ValueError(f"image_grid needs ncols >= 1, got {ncols}")
    n, h, w, c = images.shape
    ncols = min(ncols, max(n, 1))
    nrows = max(math.ceil(n / ncols), 1)
    grid = np.full(
        (nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, images.dtype
    )
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


GRID_MIN_TILE = 128  # pixels: each image of a readable grid is upscaled to at least this size
GRID_MAX_IMAGES = 64  # images per grid file


def upscale(images: np.ndarray, min_size: int = GRID_MIN_TILE) -> np.ndarray:
    """uint8 [N, H, W, C] enlarged by the smallest integer factor that makes min(H, W) >=
    `min_size` (nearest neighbour: every pixel stays a crisp block); unchanged when large."""
    images = np.asarray(images)
    factor = max(1, -(-min_size // max(min(images.shape[1:3]), 1)))
    if factor == 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def readable_grid(images: np.ndarray, ncols: int, *, min_tile: int = GRID_MIN_TILE) -> np.ndarray:
    """`image_grid` of images upscaled to >= `min_tile` pixels, for people to look at."""
    return image_grid(upscale(images, min_tile), ncols)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 [H, W] or [H, W, 1|3|4] image as PNG (creates parent directories)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {image.dtype}; convert with to_uint8")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f"save_png expects [H, W] or [H, W, 1|3|4] images, got {image.shape}")
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


def _to_python(value: Any) -> float | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(np.asarray(value))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """WORKDIR/metrics.jsonl's records (MetricWriter's output), less any replaced attempt's.

    A run killed after its last checkpoint logged steps that its resumed attempt trains and logs
    again; a record whose step goes back marks such a restart, and the earlier records from that
    step on are dropped (otherwise curves draw back-lines and train time counts twice).
    """
    rows: list[dict] = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if rows and row["step"] < rows[-1]["step"]:
                rows = [r for r in rows if r["step"] < row["step"]]
            rows.append(row)
    return rows


class ProgressLine:
    """Prints "<what> i/n <unit> (t s)" at most every `every` seconds (the first after `every`),
    so long evaluations and token caching are not silent."""

    def __init__(self, what: str, total: int | None, unit: str, *, every: float = 10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.enabled = jax.process_index() == 0
        self.t0 = self.t_last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if self.enabled and now - self.t_last >= self.every:
            self.t_last = now
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.what} {done}{of} {self.unit} ({now - self.t0:.0f} s)", flush=True)


class MetricWriter:
    """Appends scalars to WORKDIR/metrics.jsonl and TensorBoard events under WORKDIR/tb.

    Construct with ``enabled=(jax.process_index() == 0)``; a disabled writer touches nothing.
    Each ``write_scalars`` call appends one JSON line ``{"step": step, **scalars}`` (values as
    Python floats; ints stay ints; non-finite values are written as NaN / Infinity, which Python's
    ``json`` reads back) and flushes it. ``write_images`` logs to TensorBoard only (the tasks save
    their own PNGs, e.g. WORKDIR/eval/step_N.png, with ``save_png``).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(self.workdir, exist_ok=True)
            self._jsonl = open(  # closed in close()
                os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8"
            )
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log a dict of scalars (python / numpy / jax scalars) at ``step``."""
        if not self.enabled:
            return
        step = int(step)
        values = {str(k): _to_python(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, global_step=step)
        self._tb.flush()

    def write_images(self, step: int, name: str, images: np.ndarray) -> None:
        """Log uint8 images [N, H, W, C] (C in 1, 3) to TensorBoard under ``name``."""
        if not self.enabled:
            return
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"write_images expects uint8 [N, H, W, C] images, got {images.dtype} "
                f"{images.shape}; convert with to_uint8"
            )
        step = int(step)
        self._tb.add_images(name, images, global_step=step, dataformats="NHWC")
        self._tb.flush()

    def close(self) -> None:
        """Flush and close files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# FID lives in vq_jax/fid.py (its own concept: Inception, resize protocol, statistics); this is
# the public entry point `vq_jax.metrics.fid(images_a, images_b, *, weights=PATH)`.
from vq_jax.fid import fid as fid  # noqa: E402
