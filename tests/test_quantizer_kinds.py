"""The kinds added behind the quantizer interface (LFQ, residual VQ, SimVQ, IBQ) and the blocked
nearest-code search: math checked against independent float64 numpy formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vq_jax.nets import quantizers
from vq_jax.nets.ibq import IBQ
from vq_jax.nets.lfq import LFQ
from vq_jax.nets.quantizers import Quantizer, QuantizerResult
from vq_jax.nets.residual import ResidualVQ
from vq_jax.nets.simvq import SimVQ


def _z(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _np_nearest(x, codes):
    x, codes = np.asarray(x, np.float64), np.asarray(codes, np.float64)
    d = ((x[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
    return d.argmin(-1)


def _np_entropy(p, axis=-1):
    return -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), axis=axis)


# --- the interface ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q, index_shape",
    [
        (LFQ(bits=4), ()),
        (ResidualVQ(16, 4, depth=3), (3,)),
        (SimVQ(16, 4), ()),
        (IBQ(16, 4), ()),
        (quantizers.FSQ((2, 2, 2, 2)), ()),
    ],
    ids=["lfq", "rvq", "simvq", "ibq", "fsq"],
)
def test_every_kind_implements_the_interface(q, index_shape):
    assert isinstance(q, Quantizer)
    assert q.index_shape == index_shape and q.codebook_size == 16 and q.embed_dim == 4
    z = _z((2, 3, 3, 4))
    variables = q.init({"params": jax.random.key(0)}, z)
    z_q, res = q.apply(variables, z)
    assert isinstance(res, QuantizerResult)
    chex.assert_shape(z_q, z.shape)
    chex.assert_shape(res.indices, (2, 3, 3, *index_shape))
    assert res.indices.dtype == jnp.int32
    assert 0 <= int(res.indices.min()) and int(res.indices.max()) < 16
    for name, value in res.aux.items():
        chex.assert_shape(value, ())
        assert value.dtype == jnp.float32, name
    assert {"perplexity", "usage"} <= set(res.aux)
    # lookup of the indices gives the quantized vectors (forward value of z_q)
    vectors = q.apply(variables, res.indices, method="lookup")
    np.testing.assert_allclose(vectors, z_q, rtol=1e-5, atol=1e-5)


def test_result_names_read_the_aux_dict():
    res = QuantizerResult(indices=jnp.zeros(3, jnp.int32), loss=jnp.float32(1), aux={"a": 2.0})
    assert res.a == 2.0
    with pytest.raises(AttributeError, match=r"'b'.*\['a'\]"):
        _ = res.b


# --- LFQ ----------------------------------------------------------------------------------------


def test_lfq_quantization_indices_and_losses_match_numpy():
    bits, temp, gamma, beta, weight = 4, 0.5, 0.7, 0.3, 0.2
    q = LFQ(
        bits=bits, beta=beta, entropy_weight=weight, diversity_gamma=gamma, entropy_temperature=temp
    )
    z = _z((3, 5, bits), seed=1)
    (z_q, res) = q.apply({}, z)
    zn = np.asarray(z, np.float64).reshape(-1, bits)
    qn = np.where(zn > 0, 1.0, -1.0)
    np.testing.assert_array_equal(np.asarray(z_q).reshape(-1, bits), qn)
    idx = ((zn > 0) * (2 ** np.arange(bits))).sum(-1)
    np.testing.assert_array_equal(np.asarray(res.indices).reshape(-1), idx)
    # every code of {-1, 1}^bits, code k has bit i = (k >> i) & 1
    codes = np.array([[1.0 if (k >> i) & 1 else -1.0 for i in range(bits)] for k in range(16)])
    d = ((zn[:, None, :] - codes[None]) ** 2).sum(-1)
    logits = -d / temp
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    sample_h = _np_entropy(p).mean()
    codebook_h = _np_entropy(p.mean(0))
    entropy = sample_h - gamma * codebook_h
    commit = np.mean((zn - qn) ** 2)
    np.testing.assert_allclose(res.entropy_loss, entropy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.commitment_loss, commit, rtol=1e-5)
    np.testing.assert_allclose(res.loss, beta * commit + weight * entropy, rtol=1e-4, atol=1e-5)


def test_lfq_straight_through_gradient_and_lookup_roundtrip():
    q = LFQ(bits=3, entropy_weight=0.0, beta=0.0)
    z = _z((6, 3), seed=2)
    g = jax.grad(lambda z: jnp.sum(q.apply({}, z)[0] * jnp.arange(3.0)))(z)
    np.testing.assert_allclose(g, np.broadcast_to(np.arange(3.0), (6, 3)))
    all_idx = jnp.arange(8)
    codes = q.apply({}, all_idx, method="lookup")
    _, res = q.apply({}, codes)
    np.testing.assert_array_equal(res.indices, all_idx)


def test_lfq_entropy_is_over_the_global_batch_under_shard_map():
    """Per-device halves under shard_map with axis_name give the global codebook entropy."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:2])
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    q_global = LFQ(bits=3, entropy_weight=1.0, entropy_temperature=0.5)
    q_local = LFQ(bits=3, entropy_weight=1.0, entropy_temperature=0.5, axis_name="d")
    # two halves with opposite signs: each half alone uses few codes, the whole batch many
    z = jnp.concatenate([jnp.abs(_z((8, 3), seed=3)), -jnp.abs(_z((8, 3), seed=4))])
    expected = q_global.apply({}, z)[1].entropy_loss

    def per_device(z):
        return q_local.apply({}, z)[1].entropy_loss[None]

    out = jax.shard_map(per_device, mesh=Mesh(devices, ("d",)), in_specs=P("d"), out_specs=P("d"))(
        z
    )
    # the per-sample term is a per-device mean; the codebook term is global on every device
    np.testing.assert_allclose(np.mean(out), expected, rtol=1e-5, atol=1e-6)
    local_only = np.mean([q_global.apply({}, h)[1].entropy_loss for h in (z[:8], z[8:])])
    assert abs(local_only - expected) > 1e-3  # so the test can tell the two apart


# --- residual VQ --------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_rvq_stages_match_numpy(shared):
    depth, beta = 3, 0.4
    q = ResidualVQ(8, 4, depth=depth, shared_codebook=shared, beta=beta)
    z = _z((2, 5, 4), seed=5)
    variables = q.init({"params": jax.random.key(1)}, z)
    z_q, res = q.apply(variables, z)
    p = variables["params"]
    books = [
        np.asarray(p["codebook"] if shared else p["codebooks"][s], np.float64) for s in range(3)
    ]
    if not shared:
        assert not np.allclose(books[0], books[1])
    r = np.asarray(z, np.float64).reshape(-1, 4)
    total = np.zeros_like(r)
    idx, sq = [], 0.0
    for s in range(depth):
        i = _np_nearest(r, books[s])
        e = books[s][i]
        sq += np.sum((r - e) ** 2)
        total += e
        r = r - e
        idx.append(i)
    np.testing.assert_array_equal(np.asarray(res.indices).reshape(-1, depth), np.stack(idx, -1))
    np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), total, rtol=1e-5, atol=1e-6)
    mse = sq / (10 * 4 * depth)
    np.testing.assert_allclose(res.codebook_loss, mse, rtol=1e-5)
    np.testing.assert_allclose(res.loss, (1 + beta) * mse, rtol=1e-5)


def test_rvq_more_stages_reconstruct_better_and_lookup_sums_stages():
    z = _z((64, 4), seed=6)
    errors = []
    for depth in (1, 2, 4):
        q = ResidualVQ(16, 4, depth=depth, codebook_init="normal")
        variables = q.init({"params": jax.random.key(0)}, z)
        z_q, res = q.apply(variables, z)
        errors.append(float(jnp.mean(jnp.square(z_q - z))))
        np.testing.assert_allclose(q.apply(variables, res.indices, method="lookup"), z_q, atol=1e-5)
    assert errors[0] > errors[1] > errors[2]


def test_rvq_quantizer_dropout_uses_a_prefix_of_the_stages():
    q = ResidualVQ(8, 4, depth=4, dropout=1.0)
    z = _z((32, 3, 4), seed=7)
    variables = q.init({"params": jax.random.key(0)}, z)
    z_q, res = q.apply(variables, z, train=True, rngs={"dropout": jax.random.key(3)})
    books = np.asarray(variables["params"]["codebooks"], np.float64)
    idx = np.asarray(res.indices)
    partial = np.cumsum([books[s][idx[..., s]] for s in range(4)], axis=0)  # [4, 32, 3, 4]
    used = []
    for b in range(32):
        match = [n for n in range(4) if np.allclose(partial[n, b], z_q[b], atol=1e-5)]
        assert match, b  # every example is the sum of its first n stages for some n
        used.append(match[0] + 1)
    assert len(set(used)) > 1  # different examples drew different numbers of stages
    z_eval, _ = q.apply(variables, z)  # no dropout outside training
    np.testing.assert_allclose(z_eval, partial[3], atol=1e-5)


# --- SimVQ --------------------------------------------------------------------------------------


def test_simvq_codes_are_frozen_times_learned_map_and_grads_reach_only_the_map():
    q = SimVQ(16, 4, beta=0.25)
    z = _z((10, 4), seed=8)
    variables = q.init({"params": jax.random.key(0)}, z)
    assert set(variables["params"]) == {"proj"}  # C is not a parameter
    frozen = np.asarray(variables["vq_stats"]["frozen_codebook"], np.float64)
    w = np.asarray(_z((4, 4), seed=9), np.float64)
    variables = {"params": {"proj": jnp.asarray(w, jnp.float32)}, "vq_stats": variables["vq_stats"]}
    _, res = q.apply(variables, z)
    codes = frozen @ w
    zn = np.asarray(z, np.float64)
    idx = _np_nearest(zn, codes)
    np.testing.assert_array_equal(res.indices, idx)
    # d codebook_loss / d W = C^T dL/dE, dL/dE_k = sum_{n: i_n = k} 2 (E_k - z_n) / (N D)
    d_e = np.zeros_like(codes)
    np.add.at(d_e, idx, 2.0 * (codes[idx] - zn) / zn.size)
    grad = jax.grad(
        lambda p: q.apply({"params": p, "vq_stats": variables["vq_stats"]}, z)[1].codebook_loss
    )(variables["params"])["proj"]
    np.testing.assert_allclose(grad, frozen.T @ d_e, rtol=1e-4, atol=1e-6)


# --- IBQ ----------------------------------------------------------------------------------------


def _ibq_applied(q: IBQ, n: int, seed: int, key: int):
    """(z, variables, codebook and z in float64, z_q, result) of q on n random vectors."""
    z = _z((n, q.embed_dim), seed=seed)
    variables = q.init({"params": jax.random.key(key)}, z)
    codes = np.asarray(variables["params"]["codebook"], np.float64)
    return z, variables, codes, np.asarray(z, np.float64), *q.apply(variables, z)


def test_ibq_forward_and_codebook_gradient_match_numpy():
    k, d, temp = 6, 3, 0.7
    q = IBQ(k, d, temperature=temp)
    z, variables, codes, zn, z_q, res = _ibq_applied(q, 5, seed=10, key=0)
    logits = zn @ codes.T / temp
    idx = logits.argmax(-1)
    np.testing.assert_array_equal(res.indices, idx)
    np.testing.assert_allclose(z_q, codes[idx], rtol=1e-5, atol=1e-6)
    # L = sum_n g_n . z_q,n: the one-hot part gives onehot^T g; the softmax part
    # sum_n s_nk (a_nk - sum_j s_nj a_nj) z_n / temp with a_nk = g_n . e_k.
    g = np.asarray(_z((5, d), seed=11), np.float64)
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    onehot = np.eye(k)[idx]
    a = g @ codes.T
    ds = s * (a - (s * a).sum(-1, keepdims=True))
    expected = onehot.T @ g + ds.T @ zn / temp
    grad = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, z)[0] * jnp.asarray(g, jnp.float32)))(
        variables["params"]
    )["codebook"]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(np.asarray(grad)).sum(-1) > 0)  # every code gets gradient


def test_ibq_entropy_penalty_matches_numpy_and_reaches_every_code():
    k, d, w, t_e = 7, 3, 0.3, 0.5
    q = IBQ(k, d, entropy_weight=w, entropy_temperature=t_e)
    z, variables, codes, zn, _, res = _ibq_applied(q, 6, seed=12, key=1)
    inner = zn @ codes.T / t_e
    p = np.exp(inner - inner.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    avg = p.mean(0)
    entropy = np.mean(-(p * np.log(p)).sum(-1)) + (avg * np.log(avg)).sum()
    zq = codes[res.indices]
    quant = np.mean((zn - zq) ** 2) * (1 + q.beta)
    np.testing.assert_allclose(res.aux["entropy_loss"], entropy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.loss, quant + w * entropy, rtol=1e-4, atol=1e-6)

    # the penalty's gradient: an independent float32 formula of the same entropy, by autodiff
    def independent(c):
        logp = jax.nn.log_softmax(z @ c.T / t_e, axis=-1)
        mean_p = jnp.mean(jnp.exp(logp), axis=0)
        return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1)) + jnp.sum(mean_p * jnp.log(mean_p))

    def penalty(params):
        return q.apply({"params": params}, z)[1].aux["entropy_loss"]

    grad = jax.grad(penalty)(variables["params"])["codebook"]
    expected = jax.grad(independent)(variables["params"]["codebook"])
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(np.asarray(grad)).sum(-1) > 0)
    plain = IBQ(k, d).apply(variables, z)[1]  # the default: no penalty
    np.testing.assert_allclose(plain.loss, quant, rtol=1e-5)
    assert float(plain.aux["entropy_loss"]) == 0.0


# --- blocked nearest-code search ----------------------------------------------------------------


@pytest.mark.parametrize(
    "k, block, rows", [(100, 7, 300), (64, 64, 7), (50, 128, 64), (4097, 1024, 128)]
)
def test_blocked_search_matches_exhaustive(k, block, rows):
    x = _z((300, 5), seed=k)
    codes = _z((k, 5), seed=k + 1)
    exhaustive = quantizers.exhaustive_nearest_code(x, codes)
    blocked = jax.jit(quantizers.blocked_nearest_code, static_argnums=(2, 3))(x, codes, block, rows)
    np.testing.assert_array_equal(blocked, exhaustive)
    np.testing.assert_array_equal(blocked, _np_nearest(x, codes))


def test_blocked_search_breaks_ties_like_argmin():
    """Exact ties (duplicate codes, integer data) across and within blocks: the lowest index."""
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, size=(10, 3)).astype(np.float32)
    codes = np.concatenate([base, base, base[::-1], base])  # every code 3-4 times
    x = jnp.asarray(rng.integers(-3, 4, size=(200, 3)), jnp.float32)
    exhaustive = np.asarray(quantizers.exhaustive_nearest_code(x, jnp.asarray(codes)))
    for block, rows in ((1, 200), (3, 7), (10, 64), (16, 1), (40, 33)):
        blocked = quantizers.blocked_nearest_code(x, jnp.asarray(codes), block, rows)
        np.testing.assert_array_equal(blocked, exhaustive, err_msg=f"block={block}")
    d = ((np.asarray(x)[:, None] - codes[None]) ** 2).sum(-1)
    first_min = np.array([np.flatnonzero(row == row.min())[0] for row in d])
    np.testing.assert_array_equal(exhaustive, first_min)


def test_blocked_search_is_chosen_above_the_thresholds():
    """Blocked (a loop) above BLOCKED_SEARCH_ABOVE codes everywhere; between CPU_SEARCH_ABOVE
    and that, blocked on CPU and one matmul + argmin on accelerators; exhaustive below."""

    def loops(k: int, platform: str) -> bool:
        x, codes = _z((4, 2)), _z((k, 2), seed=1)
        exported = jax.export.export(jax.jit(quantizers.nearest_code), platforms=[platform])
        return "while" in exported(x, codes).mlir_module()

    big, middle = quantizers.BLOCKED_SEARCH_ABOVE + 1, quantizers.CPU_SEARCH_ABOVE + 1
    assert loops(big, "cpu") and loops(big, "cuda") and loops(big, "tpu")
    assert loops(middle, "cpu") and not loops(middle, "cuda") and not loops(middle, "tpu")
    assert not loops(quantizers.CPU_SEARCH_ABOVE, "cpu")
    x, codes = _z((40, 3)), _z((middle, 3), seed=2)
    np.testing.assert_array_equal(
        jax.jit(quantizers.nearest_code)(x, codes), quantizers.exhaustive_nearest_code(x, codes)
    )


def test_blocked_search_never_allocates_n_by_k():
    """XLA's memory analysis of the compiled quantizer train step: the scratch of a blocked
    search stays far below the [N, K] float32 matrix the exhaustive one writes."""
    n, k, d = 1024, 16384, 8
    vq = quantizers.VectorQuantizer(k, d)
    z = _z((n, d))
    params = vq.init(jax.random.key(0), z)

    def train(params, z):
        def loss(params, z):
            z_q, res = vq.apply(params, z)
            return jnp.mean(jnp.square(z_q)) + res.loss

        return jax.grad(loss, argnums=(0, 1))(params, z)

    def temp_bytes(fn, *args):
        mem = jax.jit(fn).lower(*args).compile().memory_analysis()
        if mem is None:
            pytest.skip("no memory analysis on this backend")
        return mem.temp_size_in_bytes

    nk = n * k * 4
    assert temp_bytes(train, params, z) < nk / 4
    # the exhaustive search on the same shapes does hold the [N, K] matrix
    exhaustive = lambda z, c: quantizers.exhaustive_nearest_code(z, c)
    assert temp_bytes(exhaustive, z, params["params"]["codebook"]) >= nk
    blocked = lambda z, c: quantizers.blocked_nearest_code(z, c)
    assert temp_bytes(blocked, z, params["params"]["codebook"]) < nk / 4


def test_kinds_on_a_sharded_batch_match_single_device():
    """Under jit with the batch split over devices, the entropy / histogram terms are global."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    z = _z((len(devices) * 4, 3, 3), seed=12)
    for q in (LFQ(bits=3, entropy_temperature=0.5), ResidualVQ(8, 3, depth=2), IBQ(8, 3)):
        variables = q.init({"params": jax.random.key(0)}, z)
        fn = jax.jit(lambda v, z, q=q: q.apply(v, z)[1])
        ref = fn(variables, z)
        out = fn(variables, jax.device_put(z, sharding))
        chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)


def test_blocked_code_sums_match_numpy_without_an_n_by_k_one_hot():
    k, n, d = quantizers.BLOCKED_SEARCH_ABOVE * 4 + 5, 512, 3
    x = _z((n, d), seed=13)
    idx = jnp.asarray(np.random.default_rng(0).integers(0, k, n), jnp.int32)
    expected = np.zeros((k, d))
    np.add.at(expected, np.asarray(idx), np.asarray(x, np.float64))
    sums = jax.jit(quantizers.code_sums, static_argnums=2)
    np.testing.assert_allclose(sums(x, idx, k), expected, rtol=1e-6, atol=1e-6)
    mem = sums.lower(x, idx, k).compile().memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes < n * k * 4 / 4
