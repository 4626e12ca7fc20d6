"""vq_jax.nets.kernels.conv: flax's Conv through the installed conv kernel equals flax's Conv
(same parameters, outputs, gradients) under every CPU kernel mode; bad modes are rejected."""

import chex
import conv_reference as ref_conv
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from vq_jax import cpu
from vq_jax.cpu import native
from vq_jax.nets import kernels

CASES = ref_conv.CASES


def _settings() -> dict[str, kernels.Kernels]:
    """The kernels each mode installs here (oneDNN only where the library loads)."""
    out = {"xla": kernels.XLA}
    if native.load() is None:
        out["onednn"] = cpu.onednn_kernels()
    return out


@pytest.mark.parametrize("kernel_hw,strides,padding,cin,cout,batch", CASES)
def test_module_matches_flax_conv(kernel_hw, strides, padding, cin, cout, batch):
    """Same parameters, outputs and gradients as flax.linen.Conv, for every kernel setting."""
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, cin))
    ref = nn.Conv(cout, kernel_hw, strides, padding)
    params = ref.init(jax.random.key(1), x)

    def grads(module):
        def loss(p, x):
            return jnp.sum(jnp.sin(module.apply(p, x)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    want = grads(ref)
    for setting in _settings().values():
        with kernels.installed(setting):
            mine = kernels.conv(cout, kernel_hw, strides, padding)
            chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), params)
            chex.assert_trees_all_close(mine.apply(params, x), ref.apply(params, x), atol=1e-5)
            chex.assert_trees_all_close(grads(mine), want, rtol=1e-4, atol=1e-4)


def test_xla_setting_uses_xla_convs_and_bad_mode_is_rejected():
    x = jnp.ones((2, 4, 4, 3))
    pad = ((1, 1), (1, 1))
    mine = kernels.conv(5, (3, 3), (2, 2), pad)
    params = mine.init(jax.random.key(0), x)
    with kernels.installed(kernels.XLA):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: mine.apply(p, x).sum()))(params))
    assert "conv_general_dilated" in jaxpr and "vq_jax_onednn" not in jaxpr
    with pytest.raises(ValueError, match=r"mode='fast' is not a CPU kernel mode; valid: auto"):
        cpu.enable("fast")


def test_no_bias_and_custom_init_match_flax_conv():
    """The discriminator's form: no bias, N(0, 0.02) kernels, 4x4 stride 2."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    kw = dict(use_bias=False, kernel_init=nn.initializers.normal(0.02))
    ref = nn.Conv(6, (4, 4), (2, 2), ((1, 1), (1, 1)), **kw)
    params = ref.init(jax.random.key(1), x)
    assert "bias" not in params["params"]

    def grads(module):
        return jax.grad(lambda p: jnp.sum(jnp.tanh(module.apply(p, x))))(params)

    for setting in _settings().values():
        with kernels.installed(setting):
            mine = kernels.conv(6, (4, 4), (2, 2), ((1, 1), (1, 1)), **kw)
            chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), params)
            chex.assert_trees_all_close(grads(mine), grads(ref), rtol=1e-4, atol=1e-5)
