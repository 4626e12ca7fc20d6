"""Tests for vq_jax.nets.quantizers: math checked against independent numpy / jax.grad formulas."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq_jax.nets.quantizers import (
    FSQ,
    EMAVectorQuantizer,
    QuantizerResult,
    VectorQuantizer,
    replace_dead_codes,
    sample_vectors,
)

TRAIN_KW = {"train": True, "mutable": ["vq_stats", "intermediates"]}


def _z(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _np_nearest(x, codes):
    """Brute-force nearest code by explicit loops (float64)."""
    x, codes = np.asarray(x, np.float64), np.asarray(codes, np.float64)
    out = np.empty(len(x), np.int64)
    for n in range(len(x)):
        dists = [np.sum((x[n] - codes[k]) ** 2) for k in range(len(codes))]
        out[n] = int(np.argmin(dists))
    return out


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_hist_stats(indices, k):
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=k).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return np.exp(-np.sum(nz * np.log(nz))), np.mean(counts > 0)


# --------------------------------------------------------------------------------------------------
# Shapes and dtypes.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda dt: VectorQuantizer(8, 4, dtype=dt),
        lambda dt: VectorQuantizer(8, 4, lookup_dim=2, l2_normalize=True, dtype=dt),
        lambda dt: EMAVectorQuantizer(8, 4, dtype=dt),
        lambda dt: FSQ((3, 4, 2, 5), dtype=dt),
    ],
    ids=["vq", "vq_factorised", "ema", "fsq"],
)
def test_output_shapes_and_dtypes(make, dtype):
    q = make(dtype)
    z = _z((2, 3, 3, 4)).astype(dtype)
    variables = q.init({"params": jax.random.key(0)}, z)
    (z_q, res), _ = q.apply(variables, z, **TRAIN_KW)
    chex.assert_shape(z_q, (2, 3, 3, 4))
    chex.assert_shape(res.indices, (2, 3, 3))
    assert z_q.dtype == dtype
    assert res.indices.dtype == jnp.int32
    assert isinstance(res, QuantizerResult)
    for name in ("loss", "codebook_loss", "commitment_loss", "entropy_loss", "perplexity", "usage"):
        chex.assert_shape(getattr(res, name), ())
        assert getattr(res, name).dtype == jnp.float32, name
    assert q.embed_dim == 4
    assert q.codebook_size == (120 if isinstance(q, FSQ) else 8)
    vectors = q.apply(variables, res.indices, method="lookup")
    chex.assert_shape(vectors, (2, 3, 3, 4))
    assert vectors.dtype == dtype


# --------------------------------------------------------------------------------------------------
# VectorQuantizer.


@pytest.mark.parametrize("variant", ["plain", "cosine", "factorised"])
def test_vq_indices_and_outputs_match_bruteforce(variant):
    kw = {"plain": {}, "cosine": {"l2_normalize": True}, "factorised": {"lookup_dim": 3}}[variant]
    q = VectorQuantizer(8, 4, codebook_init="normal", **kw)
    z = _z((2, 3, 3, 4), seed=1)
    variables = q.init({"params": jax.random.key(3)}, z)
    z_q, res = q.apply(variables, z)

    p = jax.tree.map(np.asarray, variables["params"])
    x = np.asarray(z, np.float64).reshape(-1, 4)
    codes = p["codebook"].astype(np.float64)
    if variant == "factorised":
        x = x @ p["proj_in"]["kernel"] + p["proj_in"]["bias"]
    if variant == "cosine":
        x, codes = _np_normalize(x), _np_normalize(codes)
    idx = _np_nearest(x, codes)
    np.testing.assert_array_equal(np.asarray(res.indices).reshape(-1), idx)
    # Losses live in lookup space (normalised / projected vectors).
    np.testing.assert_allclose(res.codebook_loss, np.mean((x - codes[idx]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(res.commitment_loss, np.mean((x - codes[idx]) ** 2), rtol=1e-5)

    out = codes[idx]
    if variant == "factorised":
        out = out @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(q.apply(variables, res.indices, method="lookup")).reshape(-1, 4),
        out,
        rtol=1e-5,
        atol=1e-5,
    )


def _sin_objective(v):
    w = jnp.linspace(0.5, 1.5, v.size).reshape(v.shape)
    return jnp.sum(jnp.sin(v) * w)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_straight_through_gradient(kind):
    q = VectorQuantizer(8, 4, codebook_init="normal") if kind == "vq" else EMAVectorQuantizer(8, 4)
    z = _z((2, 3, 4), seed=2)
    variables = q.init({"params": jax.random.key(0)}, z)
    grad_through = jax.grad(lambda z_: _sin_objective(q.apply(variables, z_)[0]))(z)
    z_q = q.apply(variables, z)[0]
    grad_at_zq = jax.grad(_sin_objective)(z_q)
    assert not np.allclose(np.asarray(z_q), np.asarray(z))  # quantisation actually moved z
    chex.assert_trees_all_close(grad_through, grad_at_zq, rtol=1e-6, atol=1e-6)


class TestVQLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_terms_and_gradients(self):
        beta = 0.7
        q = VectorQuantizer(6, 3, beta=beta, codebook_init="normal")
        z = _z((5, 3), seed=4)
        variables = q.init({"params": jax.random.key(1)}, z)
        codebook = variables["params"]["codebook"]

        def loss_fn(cb, z_):
            _, res = q.apply({"params": {"codebook": cb}}, z_)
            return res.loss, res

        fn = self.variant(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
        (loss, res), (g_cb, g_z) = fn(codebook, z)

        x = np.asarray(z, np.float64)
        e_all = np.asarray(codebook, np.float64)
        idx = _np_nearest(x, e_all)
        e = e_all[idx]
        nd = x.size
        cb_loss = np.mean((x - e) ** 2)
        np.testing.assert_array_equal(np.asarray(res.indices), idx)
        np.testing.assert_allclose(res.codebook_loss, cb_loss, rtol=1e-5)
        np.testing.assert_allclose(res.commitment_loss, cb_loss, rtol=1e-5)
        np.testing.assert_allclose(loss, (1 + beta) * cb_loss, rtol=1e-5)
        np.testing.assert_allclose(res.entropy_loss, 0.0)

        # d/de: only the codebook term, no beta.  d/dz: only the commitment term, times beta.
        expected_g_cb = np.zeros_like(e_all)
        for n, k in enumerate(idx):
            expected_g_cb[k] += 2.0 * (e_all[k] - x[n]) / nd
        expected_g_z = beta * 2.0 * (x - e) / nd
        np.testing.assert_allclose(g_cb, expected_g_cb, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g_z, expected_g_z, rtol=1e-5, atol=1e-7)

        perplexity, usage = _np_hist_stats(idx, 6)
        np.testing.assert_allclose(res.perplexity, perplexity, rtol=1e-5)
        np.testing.assert_allclose(res.usage, usage, rtol=1e-6)


def test_entropy_loss_matches_numpy():
    weight, temp, beta = 0.5, 0.7, 0.25
    q = VectorQuantizer(
        5, 3, beta=beta, entropy_weight=weight, entropy_temperature=temp, codebook_init="normal"
    )
    z = _z((4, 2, 3), seed=5)
    variables = q.init({"params": jax.random.key(2)}, z)
    _, res = q.apply(variables, z)

    x = np.asarray(z, np.float64).reshape(-1, 3)
    codes = np.asarray(variables["params"]["codebook"], np.float64)
    dist = np.sum((x[:, None, :] - codes[None, :, :]) ** 2, axis=-1)
    logits = -dist / temp
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sample_ent = np.mean(-np.sum(probs * np.log(probs), axis=1))
    avg = probs.mean(axis=0)
    expected = sample_ent + np.sum(avg * np.log(avg))
    np.testing.assert_allclose(res.entropy_loss, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        res.loss,
        res.codebook_loss + beta * res.commitment_loss + weight * expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_vq_usage_ema_only_when_training():
    q = VectorQuantizer(6, 3, codebook_init="normal", usage_decay=0.9)
    z = _z((10, 3), seed=6)
    variables = q.init({"params": jax.random.key(3)}, z)
    np.testing.assert_array_equal(variables["vq_stats"]["cluster_size"], np.zeros(6))
    (_, _), upd = q.apply(variables, z, train=True, mutable=["vq_stats"])
    counts = np.bincount(_np_nearest(z, variables["params"]["codebook"]), minlength=6)
    np.testing.assert_allclose(upd["vq_stats"]["cluster_size"], 0.1 * counts, rtol=1e-6)
    (_, _), upd_eval = q.apply(variables, z, train=False, mutable=["vq_stats"])
    np.testing.assert_array_equal(upd_eval["vq_stats"]["cluster_size"], np.zeros(6))
    # Params-only apply (no stats collection) still works.
    q.apply({"params": variables["params"]}, z)


# --------------------------------------------------------------------------------------------------
# EMAVectorQuantizer.


def _np_ema_step(state, x, decay, eps, beta):
    """Sonnet VectorQuantizerEMA update, written out in numpy (float64)."""
    codebook, cs, es = state
    k = codebook.shape[0]
    idx = _np_nearest(x, codebook)
    out = codebook[idx]
    commit = np.mean((x - out) ** 2)
    onehot = np.eye(k)[idx]
    cs = decay * cs + (1 - decay) * onehot.sum(0)
    es = decay * es + (1 - decay) * onehot.T @ x
    n = cs.sum()
    smoothed = (cs + eps) / (n + k * eps) * n
    return (es / smoothed[:, None], cs, es), idx, out, beta * commit


class TestEMA(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_three_steps_match_numpy(self):
        decay, eps, beta = 0.9, 1e-5, 0.3
        q = EMAVectorQuantizer(6, 3, beta=beta, decay=decay, epsilon=eps)
        zs = [_z((4, 2, 3), seed=10 + i) for i in range(3)]
        variables = q.init({"params": jax.random.key(0)}, zs[0])
        stats = variables["vq_stats"]
        cb0 = np.asarray(stats["codebook"], np.float64)
        np.testing.assert_array_equal(stats["embed_sum"], stats["codebook"])
        np.testing.assert_array_equal(stats["cluster_size"], np.ones(6))
        ref = (cb0, np.ones(6), cb0.copy())

        step = self.variant(lambda v, z: q.apply(v, z, train=True, mutable=["vq_stats"]))
        for z in zs:
            (z_q, res), upd = step(variables, z)
            ref, idx, out, loss = _np_ema_step(
                ref, np.asarray(z, np.float64).reshape(-1, 3), decay, eps, beta
            )
            np.testing.assert_array_equal(np.asarray(res.indices).reshape(-1), idx)
            np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 3), out, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(res.loss, loss, rtol=1e-5)
            np.testing.assert_allclose(res.commitment_loss * beta, loss, rtol=1e-5)
            np.testing.assert_array_equal(res.codebook_loss, 0.0)
            new = upd["vq_stats"]
            np.testing.assert_allclose(new["codebook"], ref[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(new["cluster_size"], ref[1], rtol=1e-6)
            np.testing.assert_allclose(new["embed_sum"], ref[2], rtol=1e-5, atol=1e-6)
            variables = {"vq_stats": new}
        assert not np.allclose(ref[0], cb0)

    def test_no_update_without_train(self):
        q = EMAVectorQuantizer(6, 3)
        z = _z((8, 3), seed=3)
        variables = q.init({"params": jax.random.key(0)}, z)
        (_, _), upd = q.apply(variables, z, train=False, mutable=["vq_stats"])
        chex.assert_trees_all_equal(upd["vq_stats"], variables["vq_stats"])


def test_replace_dead_codes_pure():
    rng = np.random.default_rng(7)
    codebook = rng.normal(size=(6, 3)).astype(np.float32)
    cluster_size = np.array([3.0, 0.2, 1.0, 0.99, 5.0, 0.0], np.float32)
    candidates = rng.normal(size=(6, 3)).astype(np.float32)
    new, dead = replace_dead_codes(
        jnp.asarray(codebook), jnp.asarray(cluster_size), jnp.asarray(candidates), 1.0
    )
    expected_dead = np.array([False, True, False, True, False, True])
    np.testing.assert_array_equal(dead, expected_dead)
    np.testing.assert_array_equal(np.asarray(new)[~expected_dead], codebook[~expected_dead])
    np.testing.assert_array_equal(np.asarray(new)[expected_dead], candidates[expected_dead])
    with pytest.raises(ValueError, match="candidates"):
        replace_dead_codes(jnp.asarray(codebook), jnp.asarray(cluster_size), candidates[:3], 1.0)


def test_sample_vectors_draws_batch_rows():
    cands = jnp.arange(10 * 2, dtype=jnp.float32).reshape(10, 2)
    rows = np.asarray(sample_vectors(jax.random.key(0), cands, 10))
    np.testing.assert_array_equal(rows[:, 1], rows[:, 0] + 1)  # whole rows
    # Without replacement when there are enough candidates: 10 of 10 is a permutation.
    assert sorted((rows[:, 0] / 2).tolist()) == list(range(10))
    many = np.asarray(sample_vectors(jax.random.key(1), cands[:3], 8))
    assert {tuple(r) for r in many.tolist()} <= {tuple(r) for r in np.asarray(cands[:3]).tolist()}
    other = np.asarray(sample_vectors(jax.random.key(5), cands, 10))
    assert not np.array_equal(rows, other)


DEAD_DECAY, DEAD_THRESHOLD = 0.9, 1.0


def _dead_code_scenario():
    """8 codes in 2-D: codes 0-3 sit on data clusters, 4-7 far away with hand-set usage."""
    centers = np.array([[2, 2], [-2, 2], [2, -2], [-2, -2]], np.float32)
    far = np.array([[50, 0], [0, 50], [-50, 0], [0, -50]], np.float32)
    rng = np.random.default_rng(8)
    z = (np.repeat(centers, 4, axis=0) + 0.1 * rng.normal(size=(16, 2))).astype(np.float32)
    z = z[rng.permutation(16)].reshape(8, 2, 2)
    codebook = np.concatenate([centers, far])
    cluster_size = np.array([5, 5, 5, 5, 2.0, 0.5, 3.0, 0.1], np.float32)
    stats = {
        "codebook": jnp.asarray(codebook),
        "cluster_size": jnp.asarray(cluster_size),
        "embed_sum": jnp.asarray(codebook * cluster_size[:, None]),
    }
    # Updated EMA sizes: unused codes decay to 0.9 * [2, 0.5, 3, 0.1] -> codes 5 and 7 are dead.
    expected_dead = np.array([False] * 5 + [True, False, True])
    return jnp.asarray(z), {"vq_stats": stats}, expected_dead


def test_dead_code_restart_module():
    z, variables, expected_dead = _dead_code_scenario()
    kw = {"decay": DEAD_DECAY}
    q_restart = EMAVectorQuantizer(8, 2, dead_code_threshold=DEAD_THRESHOLD, **kw)
    q_plain = EMAVectorQuantizer(8, 2, **kw)
    rngs = {"dead_codes": jax.random.key(4)}
    (_, res), upd = q_restart.apply(variables, z, rngs=rngs, **TRAIN_KW)
    (_, res_plain), upd_plain = q_plain.apply(variables, z, **TRAIN_KW)
    new, plain = upd["vq_stats"], upd_plain["vq_stats"]

    np.testing.assert_array_equal(res.indices, res_plain.indices)
    # The threshold=0 run shows which codes fall below the threshold after the EMA update.
    np.testing.assert_array_equal(np.asarray(plain["cluster_size"]) < DEAD_THRESHOLD, expected_dead)
    live = ~expected_dead
    for name in ("codebook", "cluster_size", "embed_sum"):
        np.testing.assert_array_equal(np.asarray(new[name])[live], np.asarray(plain[name])[live])

    batch_rows = {tuple(r) for r in np.asarray(z).reshape(-1, 2).tolist()}
    restarted = np.asarray(new["codebook"])[expected_dead]
    assert all(tuple(r) in batch_rows for r in restarted.tolist())
    assert len({tuple(r) for r in restarted.tolist()}) == len(restarted)
    np.testing.assert_array_equal(np.asarray(new["cluster_size"])[expected_dead], DEAD_THRESHOLD)
    np.testing.assert_allclose(
        np.asarray(new["embed_sum"])[expected_dead], restarted * DEAD_THRESHOLD, rtol=1e-6
    )
    assert int(upd["intermediates"]["num_restarted"][0]) == expected_dead.sum()

    (_, _), again = q_restart.apply(variables, z, rngs=rngs, **TRAIN_KW)
    chex.assert_trees_all_equal(again["vq_stats"], new)
    with pytest.raises(ValueError, match="dead_codes"):
        q_restart.apply(variables, z, **TRAIN_KW)


# --------------------------------------------------------------------------------------------------
# FSQ.

FSQ_LEVELS = (3, 4, 5, 2)


def _np_fsq(z, levels):
    lv = np.asarray(levels, np.float64)
    half_l = (lv - 1) * (1 - 1e-3) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    shift = np.zeros_like(lv)
    shift[lv > 2] = np.arctanh(offset[lv > 2] / half_l[lv > 2])  # L = 2: no shift (symmetric)
    t = np.tanh(z + shift)
    bounded = t * half_l - offset
    hw = np.floor(lv / 2)
    deriv = half_l * (1 - t**2) / hw  # d(bounded / hw)/dz
    return np.round(bounded) / hw, deriv


def _np_grid(level):
    hw = level // 2
    lo = -hw
    hi = hw if level % 2 else hw - 1
    return np.arange(lo, hi + 1) / hw


def test_fsq_index_code_roundtrip():
    q = FSQ(FSQ_LEVELS)
    k = int(np.prod(FSQ_LEVELS))
    assert q.codebook_size == k and q.embed_dim == len(FSQ_LEVELS)
    variables = q.init({"params": jax.random.key(0)}, jnp.zeros((1, len(FSQ_LEVELS))))
    indices = jnp.arange(k, dtype=jnp.int32)
    codes = q.apply(variables, indices, method="indices_to_codes")
    np.testing.assert_array_equal(q.apply(variables, codes, method="codes_to_indices"), indices)
    np.testing.assert_array_equal(q.apply(variables, indices, method="lookup"), codes)
    expected = set(itertools.product(*(_np_grid(lv).tolist() for lv in FSQ_LEVELS)))
    got = {tuple(c) for c in np.asarray(codes).tolist()}
    assert got == expected and len(got) == k


def test_fsq_quantization_matches_numpy_and_grid():
    q = FSQ(FSQ_LEVELS)
    z = _z((3, 5, len(FSQ_LEVELS)), seed=9, scale=2.0)
    variables = q.init({"params": jax.random.key(0)}, z)
    z_q, res = q.apply(variables, z)
    expected, _ = _np_fsq(np.asarray(z, np.float64), FSQ_LEVELS)
    np.testing.assert_allclose(z_q, expected, atol=1e-6)
    for c, lv in enumerate(FSQ_LEVELS):
        assert np.all(np.isin(np.asarray(z_q[..., c]), _np_grid(lv))), lv
    # Mixed-radix index: first channel is the least significant digit.
    hw = np.floor(np.asarray(FSQ_LEVELS) / 2)
    digits = np.round(expected * hw + hw).astype(np.int64)
    radix = np.concatenate([[1], np.cumprod(FSQ_LEVELS)[:-1]])
    np.testing.assert_array_equal(res.indices, np.sum(digits * radix, axis=-1))
    np.testing.assert_array_equal(q.apply(variables, res.indices, method="lookup"), z_q)
    for name in ("loss", "codebook_loss", "commitment_loss", "entropy_loss"):
        np.testing.assert_array_equal(getattr(res, name), 0.0)
    perplexity, usage = _np_hist_stats(res.indices, int(np.prod(FSQ_LEVELS)))
    np.testing.assert_allclose(res.perplexity, perplexity, rtol=1e-5)
    np.testing.assert_allclose(res.usage, usage, rtol=1e-6)


def test_fsq_straight_through_gradient():
    q = FSQ(FSQ_LEVELS)
    z = _z((4, len(FSQ_LEVELS)), seed=11)
    grad = jax.grad(lambda z_: jnp.sum(jnp.sin(q.apply({}, z_)[0])))(z)
    z_q, deriv = _np_fsq(np.asarray(z, np.float64), FSQ_LEVELS)
    np.testing.assert_allclose(grad, np.cos(z_q) * deriv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("levels", [(), (1, 3), (4, 0), (2.5, 3)])
def test_fsq_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


# --------------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_rejects_bad_codebook_size(cls):
    with pytest.raises(ValueError, match="codebook_size"):
        cls(1, 4)


@pytest.mark.parametrize(
    "q", [VectorQuantizer(8, 4), EMAVectorQuantizer(8, 4), FSQ((3, 3, 3, 3))], ids=str
)
def test_rejects_wrong_channel_count(q):
    with pytest.raises(ValueError, match=r"z.shape=\(2, 5\)"):
        q.init({"params": jax.random.key(0)}, jnp.zeros((2, 5)))


def test_rejects_bad_init_and_float_indices():
    with pytest.raises(ValueError, match="codebook_init"):
        VectorQuantizer(8, 4, codebook_init="kmeans")
    q = VectorQuantizer(8, 4)
    variables = q.init({"params": jax.random.key(0)}, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="integer"):
        q.apply(variables, jnp.zeros((2,), jnp.float32), method="lookup")


# --------------------------------------------------------------------------------------------------
# Multi-device: global statistics under jit sharding and shard_map.


def _mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _single_device_reference():
    z, variables, _ = _dead_code_scenario()
    q = EMAVectorQuantizer(8, 2, decay=DEAD_DECAY, dead_code_threshold=DEAD_THRESHOLD)
    key = jax.random.key(6)
    (_, res), upd = q.apply(variables, z, rngs={"dead_codes": key}, **TRAIN_KW)
    return z, variables, key, res, upd["vq_stats"]


def test_jit_with_sharded_batch_matches_single_device():
    z, variables, key, res_ref, ref = _single_device_reference()
    mesh = _mesh()
    q = EMAVectorQuantizer(8, 2, decay=DEAD_DECAY, dead_code_threshold=DEAD_THRESHOLD)
    z_sharded = jax.device_put(z, jax.NamedSharding(mesh, jax.P("data")))
    assert len(z_sharded.sharding.device_set) == 4

    @jax.jit
    def step(v, z_, k):
        return q.apply(v, z_, rngs={"dead_codes": k}, train=True, mutable=["vq_stats"])

    (_, res), upd = step(variables, z_sharded, key)
    chex.assert_trees_all_close(upd["vq_stats"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.indices, res_ref.indices)
    np.testing.assert_allclose(res.perplexity, res_ref.perplexity, rtol=1e-6)


def test_shard_map_with_axis_name_matches_single_device():
    z, variables, key, res_ref, ref = _single_device_reference()
    mesh = _mesh()
    q = EMAVectorQuantizer(
        8, 2, decay=DEAD_DECAY, dead_code_threshold=DEAD_THRESHOLD, axis_name="data"
    )

    def per_device(v, z_local, k):
        (_, res), upd = q.apply(v, z_local, rngs={"dead_codes": k}, **TRAIN_KW)
        stacked = jax.tree.map(lambda a: a[None], upd["vq_stats"])
        return stacked, res.perplexity[None], res.usage[None]

    fn = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(jax.P(), jax.P("data"), jax.P()),
            out_specs=(jax.P("data"), jax.P("data"), jax.P("data")),
        )
    )
    stats, perplexity, usage = fn(variables, z, key)
    for name, per_dev in stats.items():
        chex.assert_shape(per_dev, (4, *ref[name].shape))
        for d in range(1, 4):  # identical state on every device
            np.testing.assert_array_equal(per_dev[d], per_dev[0], err_msg=name)
        np.testing.assert_allclose(per_dev[0], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(perplexity, np.full(4, res_ref.perplexity), rtol=1e-6)
    np.testing.assert_allclose(usage, np.full(4, res_ref.usage), rtol=1e-6)


@pytest.mark.parametrize(
    "cls,kw",
    [(VectorQuantizer, {}), (VectorQuantizer, {"entropy_weight": 0.1}), (EMAVectorQuantizer, {})],
)
def test_search_never_materialises_nkd(cls, kw):
    """The compiled train-mode forward + backward needs O(N*K) scratch, not an [N, K, D] tensor.

    At N=1024, K=8192, D=256 an [N, K, D] float32 difference tensor is 8 GiB; the one-matmul
    search needs [N, K] (32 MiB) plus small arrays. Compiled only, never run. With the entropy
    term, gradients flow through the distances: a broadcast (x - e)^2 form fails here there.
    """
    n, k, d = 1024, 8192, 256
    q = cls(codebook_size=k, embed_dim=d, **kw)  # entropy: gradients flow through distances
    z = jax.ShapeDtypeStruct((n, d), jnp.float32)
    variables = jax.eval_shape(lambda: q.init(jax.random.key(0), jnp.zeros((n, d))))

    def loss(variables, z):
        z_q, res = q.apply(variables, z, train=True, mutable=["vq_stats"])[0]
        return jnp.sum(z_q) + res.loss

    compiled = jax.jit(jax.grad(loss, argnums=1)).lower(variables, z).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    assert mem.temp_size_in_bytes < 8 * n * k * 4, mem.temp_size_in_bytes
