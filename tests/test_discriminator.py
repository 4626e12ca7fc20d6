"""Tests for vq_jax.nets.discriminator.NLayerDiscriminator."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from params_util import fast_init, randn

from vq_jax.nets.discriminator import NLayerDiscriminator


def conv_out_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def expected_logit_size(size, n_layers):
    """k=4, p=1: n_layers stride-2 convs, then two stride-1 convs."""
    for _ in range(n_layers):
        size = conv_out_size(size, 4, 2, 1)
    for _ in range(2):
        size = conv_out_size(size, 4, 1, 1)
    return size


def np_conv(x, kernel, bias, stride, pad):
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
    for di in range(kh):
        for dj in range(kw):
            rows = slice(di, di + stride * (ho - 1) + 1, stride)
            cols = slice(dj, dj + stride * (wo - 1) + 1, stride)
            out += xp[:, rows, cols] @ kernel[di, dj]
    return out if bias is None else out + np.asarray(bias)


def np_group_norm(x, scale, bias, groups, eps=1e-5):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_leaky_relu(x):
    return np.where(x >= 0, x, 0.2 * x)


def np_discriminator(params, x, n_layers, norm, groups):
    feats = []
    h = np_leaky_relu(np_conv(x, params["conv_0"]["kernel"], params["conv_0"]["bias"], 2, 1))
    feats.append(h)
    for n in range(1, n_layers + 1):
        p = params[f"conv_{n}"]
        h = np_conv(h, p["kernel"], p.get("bias"), 2 if n < n_layers else 1, 1)
        if norm == "group":
            h = np_group_norm(h, params[f"norm_{n}"]["scale"], params[f"norm_{n}"]["bias"], groups)
        elif norm == "layer":
            h = np_layer_norm(h, params[f"norm_{n}"]["scale"], params[f"norm_{n}"]["bias"])
        h = np_leaky_relu(h)
        feats.append(h)
    p = params["conv_out"]
    return np_conv(h, p["kernel"], p["bias"], 1, 1), feats


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_features_dtypes(size, dtype):
    n_layers, ndf = 3, 8
    disc = NLayerDiscriminator(ndf=ndf, n_layers=n_layers, num_groups=4, dtype=dtype)
    x = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(disc.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits, feats = jax.eval_shape(
        lambda v, x: disc.apply(v, x, return_features=True), variables, x
    )
    side = expected_logit_size(size, n_layers)
    chex.assert_shape(logits, (2, side, side, 1))
    assert logits.dtype == jnp.float32
    assert len(feats) == n_layers + 1
    spatial = size
    for n, f in enumerate(feats):
        spatial = conv_out_size(spatial, 4, 2 if n < n_layers else 1, 1)
        chex.assert_shape(f, (2, spatial, spatial, ndf * min(2**n, 8)))
    # Without return_features only the logits come back.
    only = jax.eval_shape(disc.apply, variables, x)
    chex.assert_shape(only, (2, side, side, 1))


def test_expected_sizes_for_taming_default():
    # 256x256 with n_layers=3 gives the familiar 30x30 PatchGAN map (70x70 receptive field).
    assert expected_logit_size(256, 3) == 30
    disc = NLayerDiscriminator(ndf=8, n_layers=3, num_groups=4)
    x = jnp.zeros((1, 256, 256, 3))
    v = jax.eval_shape(disc.init, jax.random.key(0), x)
    chex.assert_shape(jax.eval_shape(disc.apply, v, x), (1, 30, 30, 1))


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_matches_numpy(norm):
    n_layers, groups = 2, 4
    disc = NLayerDiscriminator(ndf=8, n_layers=n_layers, norm=norm, num_groups=groups)
    x = randn(0, (2, 16, 16, 3))
    variables = fast_init(disc, x)
    params = variables["params"]
    # Convs followed by a norm carry no bias; the first and last conv always do.
    assert ("bias" in params["conv_1"]) == (norm == "none")
    assert ("norm_1" in params) == (norm != "none")
    logits, feats = jax.jit(lambda v, x: disc.apply(v, x, return_features=True))(variables, x)
    ref_logits, ref_feats = np_discriminator(params, np.asarray(x), n_layers, norm, groups)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for f, rf in zip(feats, ref_feats, strict=True):
        assert f.dtype == jnp.float32
        np.testing.assert_allclose(f, rf, rtol=1e-4, atol=1e-4)


def test_per_example_and_sharding_invariant():
    """GroupNorm makes each example's logits independent of batch composition and sharding."""
    disc = NLayerDiscriminator(ndf=8, n_layers=2, num_groups=4)
    x = randn(0, (4, 16, 16, 3))
    variables = fast_init(disc, x)
    apply = jax.jit(disc.apply)
    full = apply(variables, x)
    single = apply(variables, x[1:2])
    np.testing.assert_allclose(full[1:2], single, rtol=1e-5, atol=1e-5)

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    sharded = apply(variables, xs)
    np.testing.assert_allclose(sharded, full, rtol=1e-5, atol=1e-5)


def test_real_init():
    disc = NLayerDiscriminator(ndf=8, n_layers=2, num_groups=4, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 16, 16, 3))
    variables = jax.jit(disc.init)(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, fast_init(disc, x))
    # DCGAN-style N(0, 0.02) kernels.
    kernel = np.asarray(variables["params"]["conv_2"]["kernel"])
    assert 0.015 < kernel.std() < 0.025


def test_bad_inputs():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="unknown discriminator norm 'batch'"):
        jax.eval_shape(
            NLayerDiscriminator(ndf=8, norm="batch", num_groups=4).init, jax.random.key(0), x
        )
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        jax.eval_shape(NLayerDiscriminator(ndf=8, num_groups=3).init, jax.random.key(0), x)
    tiny = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"too small.*fewer n_layers"):
        jax.eval_shape(NLayerDiscriminator(ndf=8, num_groups=4).init, jax.random.key(0), tiny)
