"""Tests for vq_jax.nets.autoencoder: shapes, dtypes, param layout and numpy re-computations."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from params_util import fast_init, randn

from vq_jax.nets.autoencoder import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    ResnetBlock,
    Upsample,
    downsample_factor,
)

# ---------------------------------------------------------------- independent numpy reference ops


def np_conv(x, kernel, bias, stride, pad):
    """NHWC cross-correlation; pad = ((top, bottom), (left, right))."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
    for di in range(kh):
        for dj in range(kw):
            patch = xp[
                :,
                di : di + stride * (ho - 1) + 1 : stride,
                dj : dj + stride * (wo - 1) + 1 : stride,
            ]
            out += patch @ kernel[di, dj]
    if bias is not None:
        out += np.asarray(bias, np.float64)
    return out


def np_group_norm(x, scale, bias, groups, eps=1e-6):
    b, h, w, c = x.shape
    xg = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    xn = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return xn * np.asarray(scale) + np.asarray(bias)


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def conv_p(p, stride=1, pad=((1, 1), (1, 1))):
    return lambda x: np_conv(x, p["kernel"], p.get("bias"), stride, pad)


def np_resnet_block(p, x, groups):
    h = np_swish(np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], groups))
    h = conv_p(p["conv1"])(h)
    h = np_swish(np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"], groups))
    h = conv_p(p["conv2"])(h)
    skip = conv_p(p["nin_shortcut"], pad=((0, 0), (0, 0)))(x) if "nin_shortcut" in p else x
    return skip + h


def np_attn_block(p, x, groups):
    b, hh, ww, c = x.shape
    hn = np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"], groups).reshape(b, hh * ww, c)

    def lin(name, v):
        return v @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"])

    q, k, v = lin("q", hn), lin("k", hn), lin("v", hn)
    att = np_softmax(np.einsum("bic,bjc->bij", q, k) / np.sqrt(c))
    out = lin("proj_out", np.einsum("bij,bjc->bic", att, v))
    return np.asarray(x, np.float64) + out.reshape(b, hh, ww, c)


def all_float32(tree):
    return all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("cin,cout", [(8, 16), (8, 8)])
def test_resnet_block_matches_numpy(cin, cout):
    x = randn(0, (2, 6, 6, cin))
    block = ResnetBlock(cout, dropout=0.0, num_groups=4)
    variables = fast_init(block, x)  # norm scales/biases are non-trivial, so they matter
    params = variables["params"]
    assert ("nin_shortcut" in params) == (cin != cout)
    y = jax.jit(block.apply)(variables, x)
    chex.assert_shape(y, (2, 6, 6, cout))
    np.testing.assert_allclose(y, np_resnet_block(params, x, 4), rtol=1e-4, atol=1e-4)


def test_real_init_is_float32_and_matches_tree():
    """The module's own initialisers run and agree with the eval_shape tree used elsewhere."""
    x = randn(0, (1, 4, 4, 8))
    block = ResnetBlock(16, num_groups=4, dtype=jnp.bfloat16)
    variables = jax.jit(block.init)(jax.random.key(1), x)
    assert all_float32(variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, fast_init(block, x))
    assert jax.jit(block.apply)(variables, x).dtype == jnp.bfloat16


def test_resnet_block_dropout_only_in_train():
    x = randn(0, (1, 4, 4, 8))
    block = ResnetBlock(8, dropout=0.5, num_groups=4)
    variables = fast_init(block, x)
    y_eval = block.apply(variables, x, train=False)
    np.testing.assert_allclose(
        y_eval, np_resnet_block(variables["params"], x, 4), rtol=1e-4, atol=1e-4
    )
    y_a = block.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    y_b = block.apply(variables, x, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(y_a, y_b)
    assert not np.allclose(y_a, y_eval)


def test_attn_block_matches_numpy():
    x = randn(0, (2, 4, 5, 8))
    block = AttnBlock(num_groups=4)
    variables = fast_init(block, x)
    y = jax.jit(block.apply)(variables, x)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(y, np_attn_block(variables["params"], x, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [8, 6, 2])
def test_downsample_halves_exactly(size):
    x = randn(0, (2, size, size, 4))
    ds = Downsample(6)
    variables = fast_init(ds, x)
    y = jax.jit(ds.apply)(variables, x)
    chex.assert_shape(y, (2, size // 2, size // 2, 6))
    p = variables["params"]["conv"]
    expected = np_conv(x, p["kernel"], p["bias"], 2, ((0, 1), (0, 1)))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_downsample_rejects_odd():
    x = jnp.zeros((1, 5, 6, 4))
    with pytest.raises(ValueError, match="even height and width"):
        jax.eval_shape(Downsample(4).init, jax.random.key(0), x)


def test_upsample_is_nearest_then_conv():
    x = randn(0, (2, 3, 4, 4))
    up = Upsample(5)
    variables = fast_init(up, x)
    y = jax.jit(up.apply)(variables, x)
    chex.assert_shape(y, (2, 6, 8, 5))
    p = variables["params"]["conv"]
    nearest = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
    expected = np_conv(nearest, p["kernel"], p["bias"], 1, ((1, 1), (1, 1)))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- encoder / decoder

# (channels, size, ch_mult, attn_resolutions, dtype)
CONFIGS = [
    pytest.param(1, 32, (1, 2, 2), (8,), jnp.float32, id="gray32-f4-attn-f32"),
    pytest.param(1, 32, (1, 1, 2, 2), (), jnp.bfloat16, id="gray32-f8-noattn-bf16"),
    pytest.param(3, 64, (1, 2, 2), (16,), jnp.bfloat16, id="rgb64-f4-attn-bf16"),
    pytest.param(3, 64, (1, 1, 2, 2), (), jnp.float32, id="rgb64-f8-noattn-f32"),
]


@pytest.mark.parametrize("channels,size,ch_mult,attn,dtype", CONFIGS)
def test_encoder_decoder_shapes_dtypes(channels, size, ch_mult, attn, dtype):
    ch, z_ch, groups, nrb = 8, 4, 4, 1
    f = 2 ** (len(ch_mult) - 1)
    x = randn(0, (2, size, size, channels))
    enc = Encoder(ch, ch_mult, nrb, attn, z_ch, 0.0, groups, dtype)
    dec = Decoder(ch, channels, ch_mult, nrb, attn, 0.0, groups, dtype)

    enc_vars = fast_init(enc, x)
    z = jax.jit(enc.apply)(enc_vars, x)
    chex.assert_shape(z, (2, size // f, size // f, z_ch))
    assert z.dtype == jnp.float32
    dec_vars = fast_init(dec, z)
    y = jax.jit(dec.apply)(dec_vars, z)
    chex.assert_shape(y, (2, size, size, channels))
    assert y.dtype == jnp.float32
    assert all_float32(enc_vars) and all_float32(dec_vars)
    assert np.all(np.isfinite(np.asarray(y)))

    # Attention blocks exist exactly at the levels whose feature-map size is listed.
    enc_p, dec_p = enc_vars["params"], dec_vars["params"]
    for i in range(len(ch_mult)):
        res = size // 2**i
        for j in range(nrb):
            assert (f"down_{i}_attn_{j}" in enc_p) == (res in attn)
        for j in range(nrb + 1):
            assert (f"up_{i}_attn_{j}" in dec_p) == (res in attn)
    assert "mid_attn_1" in enc_p and "mid_attn_1" in dec_p


def test_bf16_compute_close_to_f32():
    x = randn(0, (1, 16, 16, 3))
    kwargs = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4)
    enc32 = Encoder(**kwargs, num_groups=4)
    enc16 = Encoder(**kwargs, num_groups=4, dtype=jnp.bfloat16)
    variables = fast_init(enc32, x)
    z32 = jax.jit(enc32.apply)(variables, x)
    z16 = jax.jit(enc16.apply)(variables, x)
    assert z16.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(z16 - z32)) / np.linalg.norm(np.asarray(z32))
    assert 0 < rel < 0.05


def test_decoder_mirrors_encoder():
    ch, ch_mult, nrb = 8, (1, 2, 4), 2
    x = jnp.zeros((1, 16, 16, 3))
    enc = Encoder(ch, ch_mult, nrb, (), 4, 0.0, 4)
    dec = Decoder(ch, 3, ch_mult, nrb, (), 0.0, 4)
    enc_p = jax.eval_shape(enc.init, jax.random.key(0), x)["params"]
    dec_p = jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4)))["params"]

    def blocks(params, prefix, level):
        pat = re.compile(rf"{prefix}_{level}_block_(\d+)$")
        return sorted(int(m.group(1)) for k in params if (m := pat.match(k)))

    levels = len(ch_mult)
    for i, mult in enumerate(ch_mult):
        assert blocks(enc_p, "down", i) == list(range(nrb))
        assert blocks(dec_p, "up", i) == list(range(nrb + 1))
        for j in range(nrb + 1):
            chex.assert_shape(
                dec_p[f"up_{i}_block_{j}"]["conv2"]["kernel"], (3, 3, ch * mult, ch * mult)
            )
        assert (f"down_{i}_downsample" in enc_p) == (i != levels - 1)
        assert (f"up_{i}_upsample" in dec_p) == (i != 0)
    chex.assert_shape(enc_p["conv_out"]["kernel"], (3, 3, ch * ch_mult[-1], 4))
    chex.assert_shape(dec_p["conv_in"]["kernel"], (3, 3, 4, ch * ch_mult[-1]))
    chex.assert_shape(dec_p["conv_out"]["kernel"], (3, 3, ch, 3))


def test_downsample_factor():
    assert downsample_factor((1,)) == 1
    assert downsample_factor((1, 2, 2)) == 4
    assert downsample_factor((1, 1, 2, 2, 4)) == 16
    with pytest.raises(ValueError, match="ch_mult is empty"):
        downsample_factor(())


def test_encoder_rejects_indivisible_resolution():
    enc = Encoder(8, (1, 2, 2, 4), 1, (), 4, 0.0, 4)
    with pytest.raises(ValueError, match=r"36x36.*downsample factor 8.*multiple of 8"):
        jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 36, 36, 3)))


def test_encoder_rejects_bad_num_groups():
    enc = Encoder(12, (1, 2), 1, (), 4, 0.0, 8)
    with pytest.raises(ValueError, match=r"12 channels, not divisible by num_groups=8"):
        jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    dec = Decoder(12, 3, (1, 2), 1, (), 0.0, 8)
    with pytest.raises(ValueError, match="num_groups=8"):
        jax.eval_shape(dec.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4)))


def _attn_names(module, size):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 8)))
    return sorted(k for k in shapes["params"] if "attn" in k and not k.startswith("mid"))


def test_attn_levels_place_attention_by_level_at_any_size():
    """attn_levels (converted taming / LlamaGen models) puts attention after every res block of
    those levels whatever the input size; attn_resolutions follows the feature-map height."""
    kw = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, num_groups=4, z_channels=8)
    by_level = Encoder(**kw, attn_resolutions=(99,), attn_levels=(1,))
    want = ["down_1_attn_0", "down_1_attn_1"]
    assert _attn_names(by_level, 16) == _attn_names(by_level, 32) == want
    by_res = Encoder(**kw, attn_resolutions=(8,))
    assert _attn_names(by_res, 16) == want
    assert _attn_names(by_res, 32) == ["down_2_attn_0", "down_2_attn_1"]
    del kw["z_channels"]
    dec = Decoder(**kw, out_channels=8, attn_resolutions=(), attn_levels=(0, 2))
    names = _attn_names(dec, 4)
    assert names == [f"up_{i}_attn_{j}" for i in (0, 2) for j in range(3)]
    with pytest.raises(ValueError, match=r"attn_levels=\(3,\) holds \[3\]"):
        _attn_names(Encoder(**kw, attn_levels=(3,)), 16)
    with pytest.raises(ValueError, match=r"attn_levels=\(3,\) holds \[3\]"):
        _attn_names(Decoder(**kw, attn_levels=(3,)), 4)
