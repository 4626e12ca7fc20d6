"""The tokenizer train step: sharding invariance, the adaptive weight, G/D isolation."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqgan, vqvae
from vq_jax import cpu
from vq_jax import state as state_lib
from vq_jax import steps as steps_lib
from vq_jax.cpu import native
from vq_jax.tasks import tokenizer as tokenizer_task

BATCH = 8


def _setup(config):
    comps = state_lib.build(config)
    key = jax.random.key(config.seed)
    init_fn = functools.partial(state_lib.init_state, comps, ema=config.train.ema_decay > 0)
    return comps, key, init_fn


def _batch(config, seed=0):
    r, c = config.input.resolution, config.input.channels
    x = jax.random.uniform(jax.random.key(seed), (BATCH, r, r, c), minval=-1.0, maxval=1.0)
    return {"image": x, "label": jnp.zeros((BATCH,), jnp.int32)}


def _run(config, devices, num_steps=3):
    """num_steps steps on a mesh over `devices`; returns (final state, list of measurements)."""
    comps, key, init_fn = _setup(config)
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    repl = jax.NamedSharding(mesh, jax.P())
    abstract = jax.eval_shape(init_fn, key)
    state = jax.jit(init_fn, out_shardings=repl)(key)
    settings = tokenizer_task.loss_settings(config)
    step = tokenizer_task.jit_train_step(comps, settings, mesh, abstract)
    out = []
    for i in range(num_steps):
        batch = jax.device_put(_batch(config, i), jax.NamedSharding(mesh, jax.P("data")))
        state, m = step(state, batch, key, steps_lib.phase_at(settings, i))
        out.append(jax.device_get(m))
    return jax.device_get(state), out


@pytest.mark.parametrize("cfg", [vqvae, vqgan], ids=["vqvae", "vqgan"])
def test_sharded_step_matches_single_device(cfg):
    """3 steps on 4 fake devices == 3 steps on 1 device, same global batches (atol 1e-5).

    Adam's eps is raised to 1e-3 here: with eps=1e-8, Adam's first step maps gradients that are
    mathematically zero (e.g. attention key biases) to +-lr by the sign of rounding noise, which
    differs with the reduction order; that would hide a real sharding bug behind noise.
    """
    config = cfg.get_config("tiny")
    config.optimizer.generator.eps = 1e-3
    if "discriminator" in config.optimizer:
        config.optimizer.discriminator.eps = 1e-3
    single, m1 = _run(config, jax.devices()[:1])
    sharded, m4 = _run(config, jax.devices()[:4])
    assert int(single["step"]) == int(sharded["step"]) == 3
    chex.assert_trees_all_close(single, sharded, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(m1, m4, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
def test_native_kernels_step_matches_xla():
    """3 VQGAN steps with oneDNN convs and the GroupNorm kernel (cpu.enable("onednn")) ==
    3 steps with XLA's (same float sums in another order; Adam eps as above)."""
    config = vqgan.get_config("tiny")
    config.optimizer.generator.eps = config.optimizer.discriminator.eps = 1e-3
    config.loss.disc_start = config.loss.disc_train_start = 0  # the full G + D step
    runs = {}
    try:
        for mode in ("xla", "onednn"):
            assert cpu.enable(mode) == mode
            runs[mode] = _run(config, jax.devices()[:1])
    finally:
        cpu.enable("xla")
    chex.assert_trees_all_close(runs["onednn"], runs["xla"], atol=1e-5, rtol=1e-5)


def _disc_forward(comps, disc_params, x):
    return comps.disc.apply({"params": disc_params}, x)


def _step_at(comps, s, step=0):
    """The jitted tokenizer step with the phase of `step` bound (VQGAN: a static argument)."""
    fn = steps_lib.make_tokenizer_step(comps, s)
    return jax.jit(functools.partial(fn, phase=steps_lib.phase_at(s, step)))


@pytest.mark.parametrize("perceptual", [False, True], ids=["l1", "l1+lpips"])
def test_adaptive_weight_matches_two_separate_grads(perceptual, tmp_path):
    """lambda = ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4) * disc_weight, W = decoder conv_out kernel.

    With LPIPS in L_rec, the step takes dL_rec/d(recon) from the pass that also feeds the
    generator's gradient (`reconstruction_loss_and_grad`); the reference differentiates again.
    """
    from vq_jax.nets import lpips

    config = vqgan.get_config("tiny")
    config.loss.feature_matching_weight = 0.0
    config.loss.disc_weight = 0.7
    config.loss.disc_start = 0
    perceptual_fn = lambda x, r: 0.0
    if perceptual:
        config.loss.update(perceptual_weight=1.0, lpips_weights=str(tmp_path / "lpips.npz"))
        lp = _random_lpips_file(config.loss.lpips_weights, (16, 16, 1))
        perceptual_fn = lambda x, r: jnp.mean(lpips.LPIPS().apply({"params": lp}, x, r))
    comps, key, init_fn = _setup(config)
    state = init_fn(key)
    batch = _batch(config)
    s = tokenizer_task.loss_settings(config)
    _, m = _step_at(comps, s)(state, batch, key)

    params, x = state["params"], batch["image"]

    def recon_with_kernel(w):
        p = jax.tree.map(lambda a: a, params)
        p["decoder"]["conv_out"]["kernel"] = w
        (recon, _), _ = comps.model.apply(
            {"params": p, **state["model_state"]},
            x,
            train=True,
            mutable=["vq_stats"],
            rngs={"dropout": key, "dead_codes": key},
        )
        return recon

    w0 = params["decoder"]["conv_out"]["kernel"]
    g_rec = jax.grad(
        lambda w: (
            jnp.mean(jnp.abs(x - recon_with_kernel(w))) + perceptual_fn(x, recon_with_kernel(w))
        )
    )(w0)
    g_adv = jax.grad(
        lambda w: -jnp.mean(_disc_forward(comps, state["disc_params"], recon_with_kernel(w)))
    )(w0)
    expected = np.linalg.norm(np.asarray(g_rec)) / (np.linalg.norm(np.asarray(g_adv)) + 1e-4)
    expected = np.clip(expected, 0.0, 1e4) * 0.7
    np.testing.assert_allclose(float(m["adaptive_weight"]), expected, rtol=1e-4)
    assert float(m["adaptive_weight"]) > 0


def test_model_last_layer_gives_the_output():
    """VQModel.last_layer (what the step uses for the adaptive weight): its kernel is the
    decoder's last kernel, and its map, plus the bias, gives the reconstruction."""
    config = vqgan.get_config("tiny")
    comps, key, init_fn = _setup(config)
    state = init_fn(key)
    params, x = state["params"], _batch(config)["image"]
    (recon, _), new_vars = comps.model.apply(
        {"params": params, **state["model_state"]}, x, mutable=["intermediates"]
    )
    kernel, apply = comps.model.last_layer(params, new_vars["intermediates"])
    assert kernel is params["decoder"]["conv_out"]["kernel"]
    out = apply(kernel) + params["decoder"]["conv_out"]["bias"]
    np.testing.assert_allclose(out, recon, rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_and_grad_matches_separate_grads():
    """The one-backward loss has the value of `reconstruction_loss`, returns d/d(recon), and
    passes the right gradient on to whatever produced `recon` (checked with plain jax.grad)."""
    s = steps_lib.LossSettings(l1_weight=0.5, l2_weight=2.0, perceptual_weight=0.3)
    perceptual = lambda x, r: jnp.mean(jnp.sin(3.0 * x * r) ** 2 + r**4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
    make_recon = lambda p: jnp.tanh(p * w)  # a stand-in for the decoder
    direct = lambda p: steps_lib.reconstruction_loss(s, x, make_recon(p), perceptual)
    fused = lambda p: steps_lib.reconstruction_loss_and_grad(s, x, make_recon(p), perceptual)[0]
    p0 = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
    np.testing.assert_allclose(fused(p0), direct(p0), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fused)(p0), jax.grad(direct)(p0), rtol=1e-5, atol=1e-8)
    _, g, terms = steps_lib.reconstruction_loss_and_grad(s, x, make_recon(p0), perceptual)
    np.testing.assert_allclose(terms["perceptual"], perceptual(x, make_recon(p0)), rtol=1e-6)
    want = jax.grad(lambda r: steps_lib.reconstruction_loss(s, x, r, perceptual))(make_recon(p0))
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9)
    # l1 + l2 by hand, as an independent formula
    r = np.asarray(make_recon(p0), np.float64)
    xn = np.asarray(x, np.float64)
    hand = 0.5 * np.mean(np.abs(xn - r)) + 2.0 * np.mean((xn - r) ** 2)
    hand += 0.3 * np.mean(np.sin(3.0 * xn * r) ** 2 + r**4)
    np.testing.assert_allclose(float(fused(p0)), hand, rtol=1e-5)


def test_adaptive_weight_zero_before_disc_start():
    config = vqgan.get_config("tiny")
    config.loss.disc_start = 5
    config.loss.disc_train_start = 0
    comps, key, init_fn = _setup(config)
    _, m = _step_at(comps, tokenizer_task.loss_settings(config))(init_fn(key), _batch(config), key)
    assert float(m["adaptive_weight"]) == 0.0 and float(m["g_adv"]) == 0.0
    assert float(m["disc_active"]) == 1.0 and float(m["d_loss"]) > 0


def test_phase_at_follows_disc_start_and_disc_train_start():
    s = steps_lib.LossSettings(disc_start=3, disc_train_start=1)
    phases = [steps_lib.phase_at(s, i) for i in range(5)]
    assert phases == [(False, False), (False, True), (False, True), (True, True), (True, True)]
    assert phases[3].generator_adversarial and phases[1].discriminator


class _CountingDisc:
    """A discriminator that counts its applications while the step is traced."""

    def __init__(self, disc):
        self.disc, self.calls = disc, 0

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.disc.apply(*args, **kwargs)


def test_no_discriminator_work_before_disc_start():
    """Before disc_start (and disc_train_start) the step holds no discriminator at all: none is
    applied while tracing, D's state comes back bit for bit, and the generator's update is the
    one without adversarial terms (a VQGAN whose adversarial weights are zero, the full step).
    From disc_start on, the step's phase has both: adversarial terms and a D update."""
    config = vqgan.get_config("tiny")
    config.loss.update(disc_start=1, disc_train_start=1, feature_matching_weight=0.5)
    comps, key, init_fn = _setup(config)
    counting = _CountingDisc(comps.disc)
    comps = dataclasses.replace(comps, disc=counting)
    s = tokenizer_task.loss_settings(config)
    state, batch = jax.device_get(init_fn(key)), _batch(config)
    before = jax.jit(steps_lib.make_tokenizer_step(comps, s), static_argnums=3)
    s0, m0 = before(state, batch, key, steps_lib.phase_at(s, 0))
    assert counting.calls == 0
    for k in D_KEYS:
        assert _tree_equal(state[k], s0[k]), k
    assert float(m0["g_adv"]) == 0.0 and float(m0["disc_active"]) == 0.0
    assert float(m0["d_loss"]) == 0.0

    # reference: the full step with zero adversarial weights (lambda = 0, no feature matching)
    off = dataclasses.replace(s, disc_weight=0.0, feature_matching_weight=0.0)
    full = steps_lib.Phase(True, True)
    ref, m_ref = jax.jit(steps_lib.make_tokenizer_step(comps, off), static_argnums=3)(
        state, batch, key, full
    )
    assert counting.calls > 0
    for k in G_KEYS:
        chex.assert_trees_all_close(s0[k], ref[k], rtol=1e-5, atol=1e-6)
    for k in ("loss", "rec_loss", "quant_loss", "l2_grads"):
        np.testing.assert_allclose(m0[k], m_ref[k], rtol=1e-5)
    assert set(m0) == set(m_ref)  # every phase reports the same measurements

    counting.calls = 0
    s1, m1 = before(s0, batch, key, steps_lib.phase_at(s, 1))
    assert counting.calls > 0  # the second phase was traced, with the discriminator
    assert float(m1["g_adv"]) != 0.0 and float(m1["feature_matching"]) > 0
    assert float(m1["disc_active"]) == 1.0 and float(m1["d_loss"]) > 0
    assert not _tree_equal(s0["disc_params"], s1["disc_params"])


def test_vqgan_step_without_phase_says_what_it_needs():
    config = vqgan.get_config("tiny")
    comps, key, init_fn = _setup(config)
    step = steps_lib.make_tokenizer_step(comps, tokenizer_task.loss_settings(config))
    with pytest.raises(TypeError, match="phase_at"):
        step(init_fn(key), _batch(config), key)


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _updates_and_state():
    config = vqgan.get_config("tiny")
    config.loss.disc_start = 0
    config.loss.disc_train_start = 0
    comps, key, init_fn = _setup(config)
    updates = steps_lib.make_tokenizer_updates(comps, tokenizer_task.loss_settings(config))
    state = jax.device_get(init_fn(key))
    return updates, state, _batch(config)["image"], key


G_KEYS = ("params", "opt_state", "model_state")
D_KEYS = ("disc_params", "disc_opt_state", "loss_state")


def test_generator_update_leaves_discriminator_untouched():
    updates, state, x, key = _updates_and_state()
    new, _, _ = jax.jit(updates.generator)(state, x, {"dropout": key, "dead_codes": key})
    for k in D_KEYS:
        assert _tree_equal(state[k], new[k]), k
    assert not _tree_equal(state["params"], new["params"])
    assert not _tree_equal(state["opt_state"], new["opt_state"])


def test_discriminator_update_leaves_generator_untouched():
    updates, state, x, _ = _updates_and_state()
    fake = x[::-1] * 0.5
    new, aux = jax.jit(updates.discriminator)(state, x, fake)
    for k in G_KEYS:
        assert _tree_equal(state[k], new[k]), k
    assert not _tree_equal(state["disc_params"], new["disc_params"])
    assert not _tree_equal(state["disc_opt_state"], new["disc_opt_state"])
    assert float(aux["disc_active"]) == 1.0


def test_discriminator_loss_measurement_matches_hinge_formula():
    config = vqgan.get_config("tiny")
    config.loss.update(r1_weight=0.0, lecam_weight=0.0, disc_start=0)
    config.loss.disc_train_start = 0
    comps, key, init_fn = _setup(config)
    state = init_fn(key)
    batch = _batch(config)
    _, m = _step_at(comps, tokenizer_task.loss_settings(config))(state, batch, key)
    recon, _ = comps.model.apply(
        {"params": state["params"], **state["model_state"]}, batch["image"]
    )
    real = np.asarray(_disc_forward(comps, state["disc_params"], batch["image"]))
    fake = np.asarray(_disc_forward(comps, state["disc_params"], recon))
    expected = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(float(m["d_loss"]), expected, rtol=1e-4, atol=1e-5)


def _random_lpips_file(path, image_shape):
    from vq_jax.nets import lpips

    x = jnp.zeros((1, *image_shape))
    params = lpips.LPIPS().init(jax.random.key(3), x, x)["params"]
    params = jax.tree.map(lambda p: jnp.abs(p) if p.ndim == 4 and p.shape[-1] == 1 else p, params)
    np.savez(path, **lpips.flatten_params(params))
    return params


def test_perceptual_term_is_lpips_and_enters_the_loss(tmp_path):
    from vq_jax.nets import lpips

    config = vqgan.get_config("tiny")
    config.loss.update(
        perceptual_weight=1.0, lpips_weights=str(tmp_path / "lpips.npz"), disc_start=100
    )
    config.loss.disc_train_start = 100
    params = _random_lpips_file(config.loss.lpips_weights, (16, 16, 1))
    comps, key, init_fn = _setup(config)
    state = init_fn(key)
    batch = _batch(config)
    _, m = _step_at(comps, tokenizer_task.loss_settings(config))(state, batch, key)
    recon, _ = comps.model.apply(
        {"params": state["params"], **state["model_state"]}, batch["image"]
    )
    expected = lpips.LPIPS().apply({"params": params}, batch["image"], recon).mean()
    np.testing.assert_allclose(float(m["perceptual"]), float(expected), rtol=1e-4)
    np.testing.assert_allclose(float(m["rec_loss"]), float(m["l1"]) + float(expected), rtol=1e-4)


def test_empty_lpips_weights_mean_the_default_path(tmp_path, monkeypatch):
    """loss.lpips_weights="" reads lpips.default_weights_path() ($VQ_JAX_LPIPS_WEIGHTS here);
    the fashion_mnist VQGAN trains with LPIPS, fashion_mnist_fm with feature matching only."""
    from vq_jax.nets import lpips

    missing = str(tmp_path / "absent.npz")
    monkeypatch.setenv(lpips.DEFAULT_WEIGHTS_ENV, missing)
    config = vqgan.get_config("tiny")
    config.loss.update(perceptual_weight=1.0, lpips_weights="")
    with pytest.raises(FileNotFoundError, match=r"absent\.npz.*convert_lpips\.py"):
        state_lib.build(config)
    path = str(tmp_path / "lpips.npz")
    params = _random_lpips_file(path, (16, 16, 1))
    monkeypatch.setenv(lpips.DEFAULT_WEIGHTS_ENV, path)
    comps = state_lib.build(config)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
    y = jnp.flip(x, axis=1)
    expected = jnp.mean(lpips.LPIPS(concat_batch=False).apply({"params": params}, x, y))
    np.testing.assert_allclose(float(comps.perceptual(x, y)), float(expected), rtol=1e-5)
    fm, fm_ablation = vqgan.get_config("fashion_mnist"), vqgan.get_config("fashion_mnist_fm")
    assert (fm.loss.perceptual_weight, fm.loss.feature_matching_weight) == (1.0, 0.0)
    assert (fm_ablation.loss.perceptual_weight, fm_ablation.loss.feature_matching_weight) == (0, 1)
    fm.loss.update(perceptual_weight=0.0, feature_matching_weight=1.0)
    assert fm.to_dict() == fm_ablation.to_dict()  # otherwise the same recipe


def test_missing_lpips_weights_fail_at_start_with_the_fix(tmp_path):
    config = vqgan.get_config("tiny")
    config.loss.update(perceptual_weight=1.0, lpips_weights=str(tmp_path / "none.npz"))
    with pytest.raises(FileNotFoundError, match=r"convert_lpips\.py"):
        state_lib.build(config)
