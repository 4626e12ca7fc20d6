"""Tests for vq_jax.losses: values checked against independent numpy / jax.grad formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq_jax import losses

RNG = np.random.default_rng(0)
REAL = RNG.normal(size=(3, 4, 4, 1)).astype(np.float32) * 2.0
FAKE = RNG.normal(size=(3, 4, 4, 1)).astype(np.float32) * 2.0 - 0.5


def np_softplus(x):
    return np.logaddexp(0.0, x.astype(np.float64))


def np_relu(x):
    return np.maximum(x.astype(np.float64), 0.0)


def test_l1_l2():
    x = RNG.normal(size=(2, 5, 5, 3)).astype(np.float32)
    y = RNG.normal(size=(2, 5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.l1_loss(x, y), np.abs(x - y).mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.l2_loss(x, y), ((x - y) ** 2).mean(), rtol=1e-6)


class DiscriminatorLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_values(self):
        expected = {
            "hinge": 0.5 * (np_relu(1 - REAL).mean() + np_relu(1 + FAKE).mean()),
            "non_saturating": 0.5 * (np_softplus(-REAL).mean() + np_softplus(FAKE).mean()),
            "vanilla": 0.5 * (np_softplus(-REAL).mean() + np_softplus(FAKE).mean()),
        }
        for kind, want in expected.items():
            fn = self.variant(lambda r, f, kind=kind: losses.discriminator_loss(kind, r, f))
            np.testing.assert_allclose(fn(REAL, FAKE), want, rtol=1e-5, err_msg=kind)

    @chex.variants(with_jit=True, without_jit=True)
    def test_generator_values(self):
        expected = {
            "hinge": -FAKE.astype(np.float64).mean(),
            "non_saturating": np_softplus(-FAKE).mean(),
            "vanilla": -np_softplus(FAKE).mean(),
        }
        for kind, want in expected.items():
            fn = self.variant(lambda f, kind=kind: losses.generator_loss(kind, f))
            np.testing.assert_allclose(fn(FAKE), want, rtol=1e-5, err_msg=kind)


def test_generator_gradient_directions():
    # d/df of the non-saturating loss = -sigmoid(-f)/n, of vanilla = -sigmoid(f)/n (both push f up).
    f = jnp.asarray(FAKE)
    n = FAKE.size
    sig = lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    g_ns = jax.grad(lambda z: losses.generator_loss("non_saturating", z))(f)
    g_va = jax.grad(lambda z: losses.generator_loss("vanilla", z))(f)
    g_hi = jax.grad(lambda z: losses.generator_loss("hinge", z))(f)
    np.testing.assert_allclose(g_ns, -sig(-FAKE) / n, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_va, -sig(FAKE) / n, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_hi, np.full(FAKE.shape, -1.0 / n), rtol=1e-6)


def test_unknown_kind_raises_with_kinds_listed():
    with pytest.raises(ValueError, match=r"hinge.*non_saturating.*vanilla"):
        losses.discriminator_loss("wgan", REAL, FAKE)
    with pytest.raises(ValueError, match=r"hinge.*non_saturating.*vanilla"):
        losses.generator_loss("lsgan", FAKE)


# ---------------------------------------------------------------- adaptive weight


def _two_grads(w, x, target):
    rec = lambda w: jnp.mean(jnp.abs(x @ w - target))
    gan = lambda w: -jnp.mean(jnp.tanh(x @ w))
    return jax.grad(rec)(w), jax.grad(gan)(w)


def test_adaptive_weight_formula():
    w = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    x = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
    g_rec, g_gan = _two_grads(w, x, t)
    want = np.linalg.norm(np.asarray(g_rec)) / (np.linalg.norm(np.asarray(g_gan)) + 1e-4)
    assert 0 < want < 1e4
    np.testing.assert_allclose(losses.adaptive_weight(g_rec, g_gan), want, rtol=1e-5)
    np.testing.assert_allclose(
        losses.adaptive_weight(g_rec, g_gan, disc_weight=0.8), 0.8 * want, rtol=1e-5
    )
    # Pytrees: the norm is the global norm over all leaves.
    tree_rec = {"kernel": g_rec, "bias": jnp.ones((3,))}
    tree_gan = {"kernel": g_gan, "bias": 2 * jnp.ones((3,))}
    nr = np.sqrt(np.sum(np.asarray(g_rec) ** 2) + 3.0)
    ng = np.sqrt(np.sum(np.asarray(g_gan) ** 2) + 12.0)
    np.testing.assert_allclose(
        losses.adaptive_weight(tree_rec, tree_gan), nr / (ng + 1e-4), rtol=1e-5
    )


def test_adaptive_weight_clip_and_eps():
    g_rec = jnp.full((2, 2), 3.0)  # norm 6
    # Zero GAN gradient: 6 / 1e-4 = 6e4 -> clipped to max_weight.
    np.testing.assert_allclose(losses.adaptive_weight(g_rec, jnp.zeros((2, 2))), 1e4, rtol=1e-6)
    np.testing.assert_allclose(
        losses.adaptive_weight(g_rec, jnp.zeros((2, 2)), disc_weight=0.5), 5e3, rtol=1e-6
    )
    # ||gan|| = 1e-4: eps doubles the denominator, 6 / 2e-4 = 3e4 -> still clipped at 1e4 ...
    small = jnp.asarray([[1e-4, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.adaptive_weight(g_rec, small), 1e4, rtol=1e-6)
    # ... but with a small rec grad the +eps is visible: 1e-3 / (1e-4 + 1e-4) = 5, not 10.
    tiny_rec = jnp.asarray([[1e-3, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.adaptive_weight(tiny_rec, small), 5.0, rtol=1e-4)
    np.testing.assert_allclose(
        losses.adaptive_weight(tiny_rec, small, max_weight=2.0), 2.0, rtol=1e-6
    )


def test_adaptive_weight_has_no_gradient():
    w = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    x = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)

    def lam(w):
        g_rec, g_gan = _two_grads(w, x, t)
        return losses.adaptive_weight(g_rec, g_gan)

    assert float(lam(w)) > 0
    g = jax.grad(lam)(w)
    np.testing.assert_array_equal(np.asarray(g), np.zeros_like(w))


# ---------------------------------------------------------------- R1


def test_r1_matches_per_example_grad_norm():
    kernel = jnp.asarray(RNG.normal(size=(3, 3, 2, 1)), jnp.float32) * 0.5

    def disc(params, x):  # tiny nonlinear PatchGAN-like D: [B, H, W, 2] -> [B, H-2, W-2, 1]
        y = jax.lax.conv_general_dilated(
            x, params, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(y) + 0.1 * y**2

    imgs = jnp.asarray(RNG.normal(size=(3, 6, 6, 2)), jnp.float32)
    want = []
    for i in range(imgs.shape[0]):
        gi = jax.grad(lambda xi: jnp.sum(disc(kernel, xi[None])))(imgs[i])
        want.append(np.sum(np.asarray(gi, np.float64) ** 2))
    got = losses.r1_penalty(lambda x: disc(kernel, x), imgs)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    # Differentiable w.r.t. D parameters (needed by the D step) and jittable.
    g = jax.jit(jax.grad(lambda p: losses.r1_penalty(lambda x: disc(p, x), imgs)))(kernel)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0


def test_r1_linear_disc_closed_form():
    # D(x) = sum(x * a) per example -> grad = a, ||a||^2 for every example.
    a = jnp.asarray(RNG.normal(size=(4, 4, 1)), jnp.float32)
    imgs = jnp.asarray(RNG.normal(size=(2, 4, 4, 1)), jnp.float32)
    got = losses.r1_penalty(lambda x: jnp.sum(x * a, axis=(1, 2, 3)), imgs)
    np.testing.assert_allclose(got, np.sum(np.asarray(a) ** 2), rtol=1e-5)


# ---------------------------------------------------------------- LeCam / FM / EMA


def test_lecam_loss_and_ema():
    ema_r, ema_f = 0.3, -0.2
    got = losses.lecam_loss(jnp.asarray(REAL), jnp.asarray(FAKE), ema_r, ema_f)
    want = (np_relu(REAL - ema_f) ** 2).mean() + (np_relu(ema_r - FAKE) ** 2).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    new_r, new_f = losses.update_lecam_ema(ema_r, ema_f, jnp.asarray(REAL), jnp.asarray(FAKE), 0.9)
    np.testing.assert_allclose(new_r, 0.9 * ema_r + 0.1 * REAL.mean(), rtol=1e-5)
    np.testing.assert_allclose(new_f, 0.9 * ema_f + 0.1 * FAKE.mean(), rtol=1e-5)


def test_feature_matching():
    shapes = [(2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 1)]
    real = [RNG.normal(size=s).astype(np.float32) for s in shapes]
    fake = [RNG.normal(size=s).astype(np.float32) for s in shapes]
    want = np.mean([np.abs(r - f).mean() for r, f in zip(real, fake, strict=True)])
    got = losses.feature_matching_loss(
        [jnp.asarray(r) for r in real], [jnp.asarray(f) for f in fake]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Real features are constants: gradient only w.r.t. fakes.
    g_real, g_fake = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(real, fake)
    for gr in g_real:
        np.testing.assert_array_equal(np.asarray(gr), 0.0)
    n_layers = len(shapes)
    for gf, r, f in zip(g_fake, real, fake, strict=True):
        np.testing.assert_allclose(gf, np.sign(f - r) / (r.size * n_layers), rtol=1e-5)
    with pytest.raises(ValueError, match="same D layers"):
        losses.feature_matching_loss(real, fake[:2])


def test_ema_params():
    ema = {"a": np.ones((2, 3), np.float32), "b": {"c": np.zeros((4,), np.float32)}}
    params = {"a": np.full((2, 3), 3.0, np.float32), "b": {"c": np.arange(4, dtype=np.float32)}}
    got = losses.ema_params(ema, params, 0.75)
    chex.assert_trees_all_close(
        got,
        {"a": np.full((2, 3), 0.75 + 0.25 * 3.0), "b": {"c": 0.25 * np.arange(4.0)}},
        rtol=1e-6,
    )
    chex.assert_trees_all_equal_dtypes(got, ema)
