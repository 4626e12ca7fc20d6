"""Fréchet Inception Distance: pytorch-fid's protocol on the Flax FID InceptionV3, torch-free.

Protocol (as pytorch-fid 0.3, ``mseitzer/pytorch-fid``, computes it):

1. uint8 images [N, H, W, C]; grayscale (C=1) is repeated to RGB, an alpha channel (C=4) is
   dropped;
2. x / 255 in float32, then bilinear resize to 299x299 with ``align_corners=False`` and no
   antialiasing (``torch.nn.functional.interpolate(mode='bilinear')``; skipped when already
   299x299), then 2x - 1;
3. pool3 features (2048-d) of the TF 2015-12-05 FID InceptionV3 (vq_jax.nets.inception);
4. mean and covariance (unbiased, N - 1) of the features in float64, and
   FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b).

The numbers are comparable with pytorch-fid's (not exactly with TF's original FID code, which
resizes differently). FID is biased by the sample size: always state N next to it, and compare
only numbers with equal N. Statistics of a dataset split can be cached (``cached_statistics``)
and reused.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vq_jax.nets import inception

DEFAULT_WEIGHTS_ENV = "VQ_JAX_INCEPTION_WEIGHTS"


def default_weights_path() -> str:
    """$VQ_JAX_INCEPTION_WEIGHTS, else ~/.cache/vq_jax/inception_fid.npz (where CI writes it)."""
    return os.environ.get(DEFAULT_WEIGHTS_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "vq_jax", "inception_fid.npz"
    )


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validate uint8 [N, H, W, C] (C in 1, 3, 4); returns the array."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"{name} must be uint8 [N, H, W, C], got shape {images.shape}; add a batch axis "
            "with x[None] or a channel axis with x[..., None]"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 pixels in [0, 255], got dtype {images.dtype}; convert floats "
            "in [-1, 1] with vq_jax.metrics.to_uint8"
        )
    if images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name} has {images.shape[-1]} channels, expected 1 (grayscale), 3 (RGB) or 4 "
            "(RGBA); pass NHWC images"
        )
    if images.shape[0] < 1:
        raise ValueError(f"{name} holds no images")
    return images


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear resize (align_corners=False, no antialias).

    Source coordinates are computed in float32 as torch does for float32 images
    (src = max(in/out * (i + 0.5) - 0.5, 0)), so the weights round the same way.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    src = src.astype(np.float64)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def preprocess(images: jax.Array, size: int = inception.INPUT_SIZE) -> jax.Array:
    """uint8 [N, H, W, C] -> float32 [N, size, size, 3] in [-1, 1] (steps 1-2 of the protocol)."""
    x = images.astype(jnp.float32) / 255.0
    c = x.shape[-1]
    x = jnp.repeat(x, 3, axis=-1) if c == 1 else x[..., :3]
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (size, size):
        rows, cols = bilinear_matrix(h, size), bilinear_matrix(w, size)
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=hp)
        x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)
    return 2.0 * x - 1.0


@functools.lru_cache(maxsize=2)
def feature_fn(weights: str) -> Callable[[np.ndarray], jax.Array]:
    """uint8 [B, H, W, C] -> pool3 features [B, 2048], jitted; loaded once per weights path."""
    params = inception.load_inception_params(weights)
    model = inception.InceptionV3()
    apply = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x)))
    return functools.partial(apply, params)


def inception_features(
    images: np.ndarray, *, weights: str | None = None, batch_size: int = 50
) -> np.ndarray:
    """pool3 features, float64 [N, 2048], of uint8 [N, H, W, C] images.

    The last batch is padded to ``batch_size`` (one compiled program per image shape).
    """
    images = check_images(images)
    fn = feature_fn(weights or default_weights_path())
    n = images.shape[0]
    bs = min(batch_size, n)
    out = np.empty((n, inception.FEATURE_DIM), np.float64)
    for start in range(0, n, bs):
        chunk = images[start : start + bs]
        if len(chunk) < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - len(chunk), *chunk.shape[1:]), np.uint8)])
        feats = np.asarray(fn(chunk), np.float64)
        out[start : start + bs] = feats[: min(bs, n - start)]
    return out


class StatsAccumulator:
    """Streams features into float64 sums (count, sum x, sum x x^T): mean and covariance exact
    over any number of batches, and mergeable across processes."""

    def __init__(self, dim: int = inception.FEATURE_DIM) -> None:
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self.rows: list[np.ndarray] | None = []  # kept while count <= dim (the cheap route)

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        if self.rows is not None:
            self.rows.append(f)
            if self.count > len(self.total):
                self.rows = None

    def merge(self, other: StatsAccumulator) -> None:
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        if self.rows is not None and other.rows is not None and self.count <= len(self.total):
            self.rows = self.rows + other.rows
        else:
            self.rows = None

    def frechet_distance(self, other: StatsAccumulator) -> float:
        """The Fréchet distance to `other`'s statistics; by the features themselves (O(N^2 D))
        while both hold at most D rows, else by the covariances."""
        if self.rows is not None and other.rows is not None:
            return frechet_distance_of_features(
                np.concatenate(self.rows), np.concatenate(other.rows)
            )
        return frechet_distance(*self.statistics(), *other.statistics())

    def allgather(self) -> StatsAccumulator:
        """The sums over every process (each passes its own share); a no-op on one process.

        float64 sums travel as two float32 parts (hi + lo), so they arrive to ~1e-14 relative.
        """
        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        def gather_sum(x: np.ndarray) -> np.ndarray:
            hi = x.astype(np.float32)
            lo = (x - hi.astype(np.float64)).astype(np.float32)
            parts = multihost_utils.process_allgather(np.stack([hi, lo]))  # [P, 2, ...]
            return np.asarray(parts, np.float64).sum(axis=(0, 1))

        out = StatsAccumulator(len(self.total))
        out.count = round(float(gather_sum(np.asarray([float(self.count)]))[0]))
        out.total = gather_sum(self.total)
        out.outer = gather_sum(self.outer)
        out.rows = None
        return out

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased (N - 1) covariance, as np.cov(rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features [N, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics needs features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64.

    tr (S_a S_b)^(1/2) is computed as tr (A S_b A)^(1/2) with A = S_a^(1/2) (symmetric: the
    eigenvalues of S_a S_b and A S_b A agree), by symmetric eigendecompositions, which stay real
    and stable for the rank-deficient covariances of N < 2048 samples, and is exactly symmetric
    in (a, b) up to rounding.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(
            f"frechet_distance got statistics of different sizes: mu {mu_a.shape} vs "
            f"{mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}"
        )
    root_a = _psd_sqrt(sigma_a)
    eig = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def frechet_distance_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance of the two feature sets' Gaussians (unbiased covariances), exactly,
    without forming the D x D covariances: for small N it costs O(N^2 D), not O(D^3).

    With centred rows X_a, X_b: S_a S_b has the nonzero eigenvalues of
    (X_a X_b^T)(X_a X_b^T)^T / ((n_a - 1)(n_b - 1)), so tr (S_a S_b)^(1/2) is the sum of the
    singular values of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)) (its nuclear norm), and
    tr S = |X|_F^2 / (n - 1). Symmetric in (a, b) to rounding (the singular values of M and M^T
    agree).
    """
    fa, fb = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1] or min(len(fa), len(fb)) < 2:
        raise ValueError(
            f"frechet_distance_of_features needs features [N >= 2, D] of equal D, got "
            f"{fa.shape} and {fb.shape}"
        )
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    xa, xb = fa - mu_a, fb - mu_b
    na, nb = len(fa) - 1, len(fb) - 1
    tr_covmean = np.sum(np.linalg.svd(xa @ xb.T, compute_uv=False)) / np.sqrt(na * nb)
    diff = mu_a - mu_b
    value = diff @ diff + np.sum(xa * xa) / na + np.sum(xb * xb) / nb - 2.0 * tr_covmean
    return float(max(value, 0.0))


def save_statistics(
    path: str, mu: np.ndarray, sigma: np.ndarray, num: int, images_sha256: str = ""
) -> None:
    """Write mu, sigma, num (and the SHA-256 of the uint8 images they describe, when known) to
    ``path`` (.npz) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, mu=mu, sigma=sigma, num=np.int64(num), images_sha256=np.str_(images_sha256))
    os.replace(tmp, path)


def statistics_images_sha256(path: str) -> str:
    """The images' SHA-256 stored with the statistics at ``path`` ("" if none was stored)."""
    with np.load(path, allow_pickle=False) as d:
        return str(d["images_sha256"]) if "images_sha256" in d else ""


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(path, allow_pickle=False) as d:
        return d["mu"], d["sigma"], int(d["num"])


def cached_statistics(
    path: str | None, compute: Callable[[], tuple[np.ndarray, np.ndarray, int]]
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, num) from ``path`` if it exists, else ``compute()`` saved there once.

    The caller names the file by what the statistics depend on (dataset, split, resolution,
    number of images), e.g. ``fid_stats_fashion_mnist_test_32px_10000.npz``.
    """
    if path and os.path.isfile(path):
        return load_statistics(path)
    mu, sigma, num = compute()
    if path:
        save_statistics(path, mu, sigma, num)
    return mu, sigma, num


def statistics_of(
    batches: Iterable[np.ndarray], *, weights: str | None = None, batch_size: int = 50
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, num) of uint8 image batches streamed through Inception."""
    acc = StatsAccumulator()
    for images in batches:
        acc.add(inception_features(images, weights=weights, batch_size=batch_size))
    mu, sigma = acc.statistics()
    return mu, sigma, acc.count


def fid(
    images_a: np.ndarray,
    images_b: np.ndarray,
    *,
    weights: str | None = None,
    batch_size: int = 50,
) -> float:
    """FID between two sets of uint8 [N, H, W, C] images (any size, 1/3/4 channels).

    ``weights``: the .npz from ``scripts/convert_inception.py`` (default
    ``default_weights_path()``). The sets may differ in N and in image size. See the module
    docstring for the protocol; state N next to the number.
    """
    a = check_images(images_a, "images_a")
    b = check_images(images_b, "images_b")
    if min(len(a), len(b)) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {len(a)} and {len(b)}; pass more images"
        )
    fa = inception_features(a, weights=weights, batch_size=batch_size)
    fb = inception_features(b, weights=weights, batch_size=batch_size)
    if len(fa) * len(fb) <= inception.FEATURE_DIM**2:  # the N x N route is the cheaper one
        return frechet_distance_of_features(fa, fb)
    return frechet_distance(*statistics(fa), *statistics(fb))
