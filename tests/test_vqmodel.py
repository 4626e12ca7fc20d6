"""Tests for vq_jax.nets.vqmodel.VQModel."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from params_util import fast_init

from vq_jax.nets.quantizers import FSQ, EMAVectorQuantizer, VectorQuantizer
from vq_jax.nets.vqmodel import VQModel

SMALL = dict(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, num_groups=4
)


def make_quantizer(kind, dtype=jnp.float32):
    if kind == "vq":
        return VectorQuantizer(codebook_size=16, embed_dim=3, dtype=dtype)
    if kind == "ema":
        return EMAVectorQuantizer(codebook_size=16, embed_dim=3, dtype=dtype)
    return FSQ(levels=(5, 3, 3), dtype=dtype)


def images(seed, shape):
    return jnp.tanh(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


# (channels, size, ch_mult, attn_resolutions, dtype, quantizer kind)
SHAPE_CONFIGS = [
    pytest.param(1, 32, (1, 2, 2), (8,), jnp.float32, "vq", id="gray32-f4-attn-f32-vq"),
    pytest.param(3, 64, (1, 1, 2, 2), (), jnp.bfloat16, "fsq", id="rgb64-f8-bf16-fsq"),
    pytest.param(3, 64, (1, 2, 2), (16,), jnp.bfloat16, "ema", id="rgb64-f4-attn-bf16-ema"),
    pytest.param(1, 32, (1, 1, 2, 2), (), jnp.float32, "fsq", id="gray32-f8-f32-fsq"),
]


@pytest.mark.parametrize("channels,size,ch_mult,attn,dtype,kind", SHAPE_CONFIGS)
def test_shapes_and_param_tree(channels, size, ch_mult, attn, dtype, kind):
    q = make_quantizer(kind, dtype)
    model = VQModel(
        quantizer=q,
        ch=8,
        ch_mult=ch_mult,
        num_res_blocks=1,
        attn_resolutions=attn,
        z_channels=4,
        in_channels=channels,
        num_groups=4,
        dtype=dtype,
    )
    f = 2 ** (len(ch_mult) - 1)
    x = jnp.zeros((2, size, size, channels))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    params = variables["params"]
    assert {"encoder", "quant_conv", "post_quant_conv", "decoder"} <= set(params)
    chex.assert_shape(params["quant_conv"]["kernel"], (1, 1, 4, q.embed_dim))
    chex.assert_shape(params["post_quant_conv"]["kernel"], (1, 1, q.embed_dim, 4))
    # The adaptive-weight path of the VQGAN loss.
    chex.assert_shape(params["decoder"]["conv_out"]["kernel"], (3, 3, 8, channels))

    recon, result = jax.eval_shape(model.apply, variables, x)
    chex.assert_shape(recon, (2, size, size, channels))
    assert recon.dtype == jnp.float32
    chex.assert_shape(result.indices, (2, size // f, size // f))
    assert result.indices.dtype == jnp.int32
    z_q, _ = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, x)
    chex.assert_shape(z_q, (2, size // f, size // f, q.embed_dim))
    img = jax.eval_shape(
        lambda v, t: model.apply(v, t, method="decode_indices"), variables, result.indices
    )
    chex.assert_shape(img, (2, size, size, channels))


@pytest.mark.parametrize("kind", ["vq", "fsq", "ema"])
def test_decode_indices_reproduces_forward(kind):
    model = VQModel(quantizer=make_quantizer(kind), in_channels=1, **SMALL)
    x = images(0, (2, 16, 16, 1))
    variables = fast_init(model, x)

    @jax.jit
    def run(v, x):
        recon, result = model.apply(v, x, train=False)
        z_q, enc_result = model.apply(v, x, method="encode")
        from_idx = model.apply(v, enc_result.indices, method="decode_indices")
        from_zq = model.apply(v, z_q, method="decode")
        return recon, result, enc_result, from_idx, from_zq

    recon, result, enc_result, from_idx, from_zq = run(variables, x)
    chex.assert_shape(recon, (2, 16, 16, 1))
    np.testing.assert_array_equal(result.indices, enc_result.indices)
    # The codes must actually vary, otherwise the comparison is weak.
    assert len(np.unique(np.asarray(result.indices))) > 1
    np.testing.assert_allclose(from_idx, recon, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_zq, recon, rtol=1e-5, atol=1e-5)


def test_decode_indices_uses_the_codebook():
    """Changing one code vector changes exactly the images that use that code."""
    model = VQModel(quantizer=make_quantizer("vq"), in_channels=1, **SMALL)
    x = images(0, (2, 16, 16, 1))
    variables = fast_init(model, x)
    indices = jnp.zeros((2, 8, 8), jnp.int32).at[1, 3, 3].set(5)
    decode = jax.jit(lambda v, t: model.apply(v, t, method="decode_indices"))
    before = decode(variables, indices)
    params = variables["params"]
    codebook = params["quantizer"]["codebook"].at[5].add(1.0)
    changed = {**variables, "params": {**params, "quantizer": {"codebook": codebook}}}
    after = decode(changed, indices)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(after[1], before[1])


def test_sown_conv_out_input_reproduces_output():
    """intermediates/decoder/conv_out_input, convolved with conv_out, gives the reconstruction."""
    model = VQModel(quantizer=make_quantizer("fsq"), in_channels=3, **SMALL)
    x = images(0, (1, 8, 8, 3))
    variables = fast_init(model, x)
    (recon, _), state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, x
    )
    feats = np.asarray(state["intermediates"]["decoder"]["conv_out_input"][0], np.float64)
    p = variables["params"]["decoder"]["conv_out"]
    kernel = np.asarray(p["kernel"], np.float64)
    padded = np.pad(feats, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros(recon.shape) + np.asarray(p["bias"])
    for di in range(3):
        for dj in range(3):
            expected += padded[:, di : di + 8, dj : dj + 8] @ kernel[di, dj]
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)


def test_ema_train_updates_stats_through_model():
    model = VQModel(quantizer=make_quantizer("ema"), in_channels=1, **SMALL)
    x = images(0, (2, 16, 16, 1))
    variables = fast_init(model, x)
    (_, result), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["vq_stats"])
    )(variables, x)
    old = variables["vq_stats"]["quantizer"]["cluster_size"]
    new = updates["vq_stats"]["quantizer"]["cluster_size"]
    counts = np.bincount(np.asarray(result.indices).ravel(), minlength=16)
    np.testing.assert_allclose(new, 0.99 * np.asarray(old) + 0.01 * counts, rtol=1e-5)


class JitAgreementTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_jit_vs_eager(self):
        model = VQModel(quantizer=make_quantizer("vq"), in_channels=1, **SMALL)
        x = images(0, (1, 8, 8, 1))
        variables = fast_init(model, x)
        recon, result = self.variant(lambda v, x: model.apply(v, x))(variables, x)
        ref_recon, ref_result = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
        chex.assert_trees_all_close(recon, ref_recon, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.indices, ref_result.indices)
        chex.assert_trees_all_close(result.loss, ref_result.loss, rtol=1e-5)


def test_bf16_forward_runs_float32_out():
    model = VQModel(
        quantizer=make_quantizer("vq", jnp.bfloat16), in_channels=1, dtype=jnp.bfloat16, **SMALL
    )
    x = images(0, (1, 8, 8, 1))
    variables = fast_init(model, x)
    recon, result = jax.jit(model.apply)(variables, x)
    assert recon.dtype == jnp.float32 and result.loss.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(recon)))


def test_rejects_wrong_channels():
    model = VQModel(quantizer=make_quantizer("vq"), in_channels=3, **SMALL)
    x = jnp.zeros((1, 16, 16, 1))
    with pytest.raises(
        ValueError, match=r"1 channels but the model has in_channels=3.*in_channels=1"
    ):
        jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((16, 16, 3)))


def test_rejects_indivisible_resolution():
    model = VQModel(
        quantizer=make_quantizer("fsq"), in_channels=1, **{**SMALL, "ch_mult": (1, 2, 2)}
    )
    x = jnp.zeros((1, 30, 30, 1))
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the downsample factor 4"):
        jax.eval_shape(model.init, jax.random.key(0), x)


def test_decode_indices_rejects_flat_tokens():
    model = VQModel(quantizer=make_quantizer("fsq"), in_channels=1, **SMALL)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        jax.eval_shape(
            lambda v, t: model.apply(v, t, method="decode_indices"),
            variables,
            jnp.zeros((1, 64), jnp.int32),
        )
