"""Tests for vq_jax.metrics against independent numpy / scikit-image references."""

import glob
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vq_jax import metrics

RNG = np.random.default_rng(0)


def _pair(shape, noise=0.3):
    x = np.clip(RNG.uniform(-1, 1, size=shape), -1, 1).astype(np.float32)
    # Smooth-ish structure plus noise so SSIM is well away from 0 and 1.
    y = np.clip(0.8 * x + noise * RNG.normal(size=shape) + 0.05, -1, 1).astype(np.float32)
    return x, y


# ---------------------------------------------------------------- PSNR


class PsnrTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_psnr_formula(self):
        x, y = _pair((3, 8, 8, 3))
        got = self.variant(metrics.psnr)(x, y)
        chex.assert_shape(got, (3,))
        mse = ((x.astype(np.float64) - y) ** 2).reshape(3, -1).mean(-1)
        np.testing.assert_allclose(got, 10 * np.log10(4.0 / mse), rtol=1e-5)
        got1 = self.variant(lambda a, b: metrics.psnr(a, b, data_range=1.0))(x, y)
        np.testing.assert_allclose(got1, 10 * np.log10(1.0 / mse), rtol=1e-5)


def test_psnr_identical_is_finite_clamped():
    x, _ = _pair((2, 8, 8, 1))
    got = np.asarray(metrics.psnr(x, x))
    np.testing.assert_allclose(got, 10 * np.log10(4.0 / 1e-10), rtol=1e-5)
    assert np.all(np.isfinite(got))


def test_psnr_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal shape"):
        metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 1)))


# ---------------------------------------------------------------- SSIM


def _ssim_reference(x, y, data_range=2.0):
    """Direct (non-separable) 11x11 window SSIM in float64, valid region, mean over channels."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for xi, yi in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
        h, w, c = xi.shape
        vals = []
        for ch in range(c):
            a, b = xi[..., ch], yi[..., ch]
            sm = np.empty((h - 10, w - 10))
            for i in range(h - 10):
                for j in range(w - 10):
                    pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
                    ma, mb = (win * pa).sum(), (win * pb).sum()
                    va = (win * (pa - ma) ** 2).sum()
                    vb = (win * (pb - mb) ** 2).sum()
                    cov = (win * (pa - ma) * (pb - mb)).sum()
                    sm[i, j] = ((2 * ma * mb + c1) * (2 * cov + c2)) / (
                        (ma**2 + mb**2 + c1) * (va + vb + c2)
                    )
            vals.append(sm.mean())
        out.append(np.mean(vals))
    return np.asarray(out)


class SsimTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ssim_vs_direct_reference(self):
        x, y = _pair((2, 16, 14, 3))
        got = self.variant(metrics.ssim)(x, y)
        chex.assert_shape(got, (2,))
        assert got.dtype == jnp.float32
        want = _ssim_reference(x, y)
        assert np.all((want > 0.05) & (want < 0.95)), want
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("shape", "noise"), [((2, 28, 28, 1), 0.3), ((2, 32, 32, 3), 0.8)])
def test_ssim_vs_skimage(shape, noise):
    skm = pytest.importorskip("skimage.metrics")
    x, y = _pair(shape, noise)
    got = np.asarray(metrics.ssim(x, y))
    want = [
        skm.structural_similarity(
            xi,
            yi,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
            channel_axis=-1,
        )
        for xi, yi in zip(x.astype(np.float64), y.astype(np.float64), strict=True)
    ]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ssim_identical_is_one_and_128px_works():
    x, _ = _pair((1, 128, 128, 3))
    np.testing.assert_allclose(metrics.ssim(x, x), [1.0], atol=1e-5)
    # Anti-correlated structure with positive luminance term -> negative SSIM.
    assert float(metrics.ssim(x, np.float32(0.5) - x)[0]) < 0


def test_ssim_too_small_raises():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))


# ---------------------------------------------------------------- codebook


def test_code_histogram_and_stats():
    k = 10
    idx = RNG.integers(0, 7, size=(3, 4, 5))
    mask = RNG.uniform(size=idx.shape) > 0.4
    counts = jax.jit(metrics.code_histogram, static_argnums=1)(jnp.asarray(idx), k)
    chex.assert_shape(counts, (k,))
    assert counts.dtype == jnp.float32
    np.testing.assert_array_equal(counts, np.bincount(idx.ravel(), minlength=k))
    masked = metrics.code_histogram(jnp.asarray(idx), k, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(masked, np.bincount(idx[mask], minlength=k))

    ref = np.bincount(idx[mask], minlength=k).astype(np.float64)
    p = ref / ref.sum()
    nz = p[p > 0]
    stats = metrics.codebook_stats(masked)
    np.testing.assert_allclose(stats["perplexity"], np.exp(-(nz * np.log(nz)).sum()), rtol=1e-5)
    np.testing.assert_allclose(stats["usage"], (ref > 0).mean(), rtol=1e-6)


def test_codebook_stats_uniform_and_empty():
    s = metrics.codebook_stats(jnp.asarray([5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(s["perplexity"], 4.0, rtol=1e-5)
    np.testing.assert_allclose(s["usage"], 0.5)
    e = metrics.codebook_stats(jnp.zeros((4,)))
    np.testing.assert_allclose(e["perplexity"], 1.0)
    np.testing.assert_allclose(e["usage"], 0.0)


def test_code_histogram_drops_out_of_range():
    counts = metrics.code_histogram(jnp.asarray([0, 1, 1, 5, -1]), 3)
    np.testing.assert_array_equal(counts, [1.0, 2.0, 0.0])


# ---------------------------------------------------------------- images / writer


def test_to_uint8():
    x = np.asarray([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], np.float32)
    got = metrics.to_uint8(x)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [0, 0, 128, 191, 255, 255])


@pytest.mark.parametrize(("n", "ncols", "rows", "cols"), [(6, 4, 2, 4), (8, 4, 2, 4), (3, 8, 1, 3)])
def test_image_grid_shape_and_placement(n, ncols, rows, cols):
    h, w, c = 5, 7, 3
    imgs = RNG.integers(1, 256, size=(n, h, w, c)).astype(np.uint8)
    grid = metrics.image_grid(imgs, ncols)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * h + (rows + 1) * 2, cols * w + (cols + 1) * 2, c)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = 2 + r * (h + 2), 2 + q * (w + 2)
        np.testing.assert_array_equal(grid[top : top + h, left : left + w], imgs[i])
    assert np.all(grid[:2] == 0) and np.all(grid[:, :2] == 0)


@pytest.mark.parametrize("c", [1, 3])
def test_save_png_roundtrip(tmp_path, c):
    img = RNG.integers(0, 256, size=(9, 11, c)).astype(np.uint8)
    path = tmp_path / "sub" / "x.png"
    metrics.save_png(path, img)
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, img[..., 0] if c == 1 else img)
    with pytest.raises(ValueError, match="uint8"):
        metrics.save_png(path, img.astype(np.float32))


def test_metric_writer(tmp_path):
    w = metrics.MetricWriter(tmp_path / "run", enabled=True)
    w.write_scalars(1, {"loss": jnp.float32(0.5), "psnr": np.float64(20.25), "n": 3})
    # Flushed immediately: readable before close.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.5, "psnr": 20.25, "n": 3}
    w.write_scalars(2, {"loss": jnp.asarray(0.25)})
    events = glob.glob(os.path.join(tmp_path, "run", "tb", "events.out.tfevents.*"))
    size_before = os.path.getsize(events[0])
    imgs = RNG.integers(0, 256, size=(3, 6, 6, 1)).astype(np.uint8)
    w.write_images(2, "recon/val", imgs)
    w.close()
    assert os.path.getsize(events[0]) > size_before + 150  # 3 PNG-encoded image summaries
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "loss": 0.5, "psnr": 20.25, "n": 3},
        {"step": 2, "loss": 0.25},
    ]
    assert isinstance(rows[1]["loss"], float)
    events = glob.glob(os.path.join(tmp_path, "run", "tb", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0


def test_metric_writer_disabled_writes_nothing(tmp_path):
    w = metrics.MetricWriter(tmp_path / "run", enabled=False)
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, "x", np.zeros((1, 4, 4, 3), np.uint8))
    w.close()
    assert not (tmp_path / "run").exists()


def test_read_metrics_drops_records_of_a_replaced_attempt(tmp_path):
    """A run killed at step 30 after its step-20 checkpoint, resumed: the curves keep one record
    per step, those of the attempt that survived."""
    first = [{"step": s, "train/loss": 1.0} for s in (10, 20)] + [{"step": 20, "eval/psnr": 20.0}]
    first += [{"step": 30, "train/loss": 1.0}]
    resumed = [{"step": s, "train/loss": 2.0} for s in (25, 30, 40)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for row in first + resumed:
            f.write(json.dumps(row) + "\n")
    rows = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [10, 20, 20, 25, 30, 40]
    assert [r.get("train/loss") for r in rows] == [1.0, 1.0, None, 2.0, 2.0, 2.0]
