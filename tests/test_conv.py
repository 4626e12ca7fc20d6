"""vq_jax.nets.conv: the patch-GEMM kernel gradient and the GEMM strided input gradient equal
their definitions (numpy, tests/conv_reference.py); the module equals flax's Conv."""

import chex
import conv_reference as ref_conv
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vq_jax import native
from vq_jax.nets import conv

CASES = ref_conv.CASES


@pytest.mark.parametrize("kernel_hw,strides,padding,cin,cout,batch", CASES)
def test_kernel_grad_matches_definition(kernel_hw, strides, padding, cin, cout, batch):
    x = np.asarray(jax.random.normal(jax.random.key(0), (batch, 8, 8, cin)))
    ho, wo = ref_conv.out_hw(8, kernel_hw, strides, padding)
    dy = np.asarray(jax.random.normal(jax.random.key(1), (batch, ho, wo, cout)))
    got = jax.jit(
        lambda x, dy: conv.patches_kernel_grad(x, dy, (*kernel_hw, cin, cout), strides, padding)
    )(x, dy)
    chex.assert_shape(got, (*kernel_hw, cin, cout))
    np.testing.assert_allclose(
        got, ref_conv.kernel_grad(x, dy, kernel_hw, strides, padding), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("kernel_hw,strides,padding,cin,cout,batch", CASES)
def test_module_matches_flax_conv(kernel_hw, strides, padding, cin, cout, batch):
    """Same parameters, outputs and gradients as flax.linen.Conv, for both kernel-grad modes."""
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, cin))
    ref = nn.Conv(cout, kernel_hw, strides, padding)
    params = ref.init(jax.random.key(1), x)

    def grads(module):
        def loss(p, x):
            return jnp.sum(jnp.sin(module.apply(p, x)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    want = grads(ref)
    modes = ("patches", "xla", "auto") + (("onednn",) if native.available() else ())
    for mode in modes:
        mine = conv.Conv(cout, kernel_hw, strides, padding, weight_grad=mode)
        chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), params)
        chex.assert_trees_all_close(mine.apply(params, x), ref.apply(params, x), atol=1e-5)
        chex.assert_trees_all_close(grads(mine), want, rtol=1e-4, atol=1e-4)


def test_chunks_cover_the_batch():
    """Chunk sizes divide the batch and respect the byte budget (so no image is dropped)."""
    for batch in (1, 7, 64, 96):
        for per_image in (1, 2**20, 3 * 2**20, 64 * 2**20):
            c = conv._chunk_size(batch, per_image)
            assert batch % c == 0
            assert c == 1 or c * per_image <= conv._CHUNK_BYTES


def test_bfloat16_kernel_grad_accumulates_in_float32():
    x = jax.random.normal(jax.random.key(0), (16, 16, 16, 32))
    dy = jax.random.normal(jax.random.key(1), (16, 16, 16, 32))
    pad = ((1, 1), (1, 1))
    got = conv.patches_kernel_grad(
        x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16), (3, 3, 32, 32), (1, 1), pad
    )
    assert got.dtype == jnp.float32
    want = ref_conv.kernel_grad(
        np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)),
        np.asarray(dy.astype(jnp.bfloat16).astype(jnp.float32)),
        (3, 3),
        (1, 1),
        pad,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_auto_uses_xla_gradients_and_bad_mode_is_rejected():
    x = jnp.ones((2, 4, 4, 3))
    k = jnp.ones((3, 3, 3, 5))
    pad = ((1, 1), (1, 1))

    def jaxpr(mode, stride):
        def f(k):
            return conv.conv2d(x, k, (stride, stride), pad, mode).sum()

        return str(jax.make_jaxpr(jax.grad(f))(k))

    assert "scan" not in jaxpr("auto", 1)
    assert "scan" not in jaxpr("auto", 2)
    assert "scan" not in jaxpr("xla", 2)
    assert "scan" in jaxpr("patches", 1)
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        conv.conv2d(x, k, (1, 1), pad, weight_grad="fast")


def test_no_bias_and_custom_init_match_flax_conv():
    """The discriminator's form: no bias, N(0, 0.02) kernels, 4x4 stride 2."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    kw = dict(use_bias=False, kernel_init=nn.initializers.normal(0.02))
    ref = nn.Conv(6, (4, 4), (2, 2), ((1, 1), (1, 1)), **kw)
    mine = conv.Conv(6, (4, 4), (2, 2), ((1, 1), (1, 1)), weight_grad="patches", **kw)
    params = ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), params)
    assert "bias" not in params["params"]

    def grads(module):
        return jax.grad(lambda p: jnp.sum(jnp.tanh(module.apply(p, x))))(params)

    chex.assert_trees_all_close(grads(mine), grads(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_hw,strides,padding,cin,cout,batch", CASES[1:2] + CASES[3:])
@pytest.mark.parametrize("size", [8, 9])
def test_strided_input_grad_matches_definition(kernel_hw, strides, padding, cin, cout, batch, size):
    """dx_pad[b, s*i + ky, s*j + kx, ci] += sum_co dy[b, i, j, co] * W[ky, kx, ci, co]."""
    kh, kw = kernel_hw
    ho, wo = ref_conv.out_hw(size, kernel_hw, strides, padding)
    dy = np.asarray(jax.random.normal(jax.random.key(0), (batch, ho, wo, cout)), np.float64)
    w = np.asarray(jax.random.normal(jax.random.key(1), (kh, kw, cin, cout)), np.float64)
    want = ref_conv.input_grad(dy, w, (batch, size, size, cin), strides, padding)
    got = conv.col2im_input_grad(
        jnp.asarray(dy, jnp.float32),
        jnp.asarray(w, jnp.float32),
        (batch, size, size, cin),
        strides,
        padding,
    )
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
