"""vq_jax.nets.group_norm against numpy's formula and flax.linen.GroupNorm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vq_jax import cpu
from vq_jax.cpu import native
from vq_jax.nets import kernels
from vq_jax.nets.group_norm import GroupNorm


def _params(c, seed=3):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "scale": jnp.asarray(1 + 0.1 * rng.normal(size=c), jnp.float32),
            "bias": jnp.asarray(0.1 * rng.normal(size=c), jnp.float32),
        }
    }


@pytest.mark.parametrize("groups,c", [(32, 64), (4, 8), (1, 6), (6, 6)])
def test_matches_numpy_formula(groups, c):
    x = np.random.default_rng(0).normal(size=(3, 5, 4, c)) * 2 + 0.7
    p = _params(c)
    got = GroupNorm(groups, epsilon=1e-6).apply(p, jnp.asarray(x, jnp.float32))
    xg = x.reshape(3, 5, 4, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    want = want * np.asarray(p["params"]["scale"]) + np.asarray(p["params"]["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_same_params_outputs_and_grads_as_flax():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32)) * 3 - 1
    ref, mine = nn.GroupNorm(8, epsilon=1e-6), GroupNorm(8, epsilon=1e-6)
    chex.assert_trees_all_equal(mine.init(jax.random.key(1), x), ref.init(jax.random.key(1), x))
    p = _params(32)
    chex.assert_trees_all_close(mine.apply(p, x), ref.apply(p, x), atol=1e-5)

    def grads(m):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(p, x)

    chex.assert_trees_all_close(grads(mine), grads(ref), rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_uses_float32_statistics():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16)) * 10 + 100  # large mean: bf16 E[x^2]
    p = _params(16)
    y = GroupNorm(4, dtype=jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    want = nn.GroupNorm(4, epsilon=1e-6).apply(p, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by num_groups=4"):
        GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))
    with pytest.raises(ValueError, match="NHWC"):
        GroupNorm(4).init(jax.random.key(0), jnp.zeros((2, 8)))


needs_native = pytest.mark.skipif(
    not native.available(), reason="native kernels not built (pip install '.[onednn]')"
)


@needs_native
@pytest.mark.parametrize("groups,c", [(32, 64), (4, 8), (1, 6), (6, 6)])
@pytest.mark.parametrize("swish", [False, True])
def test_native_matches_numpy_formula(groups, c, swish):
    """The CPU kernel's GroupNorm (+ swish) against float64 numpy, over a range that includes
    saturated sigmoids (|y| up to ~60)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, c)) * 2 + 0.7
    p = _params(c)
    p["params"]["scale"] = p["params"]["scale"] * 15
    with kernels.installed(cpu.onednn_kernels()):
        got = jax.jit(GroupNorm(groups, 1e-6, swish=swish).apply)(p, jnp.asarray(x, jnp.float32))
    xg = x.reshape(3, 5, 4, groups, c // groups)
    y = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        xg.var(axis=(1, 2, 4), keepdims=True) + 1e-6
    )
    y = y.reshape(x.shape) * np.asarray(p["params"]["scale"], np.float64)
    y += np.asarray(p["params"]["bias"], np.float64)
    want = y / (1 + np.exp(-y)) if swish else y
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("swish", [False, True])
def test_native_gradients_match_the_xla_formulation(swish):
    """Input and parameter gradients of the kernel's backward pass against jax.grad of the jnp
    GroupNorm (itself checked against flax above); an odd spatial size and batch."""
    x = jax.random.normal(jax.random.key(0), (5, 7, 3, 32)) * 3 - 1
    p = _params(32)
    dy = jax.random.normal(jax.random.key(1), x.shape)

    def grads(setting):
        m = GroupNorm(8, 1e-6, swish=swish)
        with kernels.installed(setting):
            f = jax.grad(lambda p, x: jnp.vdot(m.apply(p, x), dy), argnums=(0, 1))
            return jax.jit(f)(p, x)

    chex.assert_trees_all_close(
        grads(cpu.onednn_kernels()), grads(kernels.XLA), rtol=1e-5, atol=1e-5
    )


@needs_native
@pytest.mark.parametrize("swish", [False, True])
def test_native_second_order_gradients_match_the_xla_formulation(swish):
    """Differentiated twice (the discriminator's R1 penalty: the gradient of a squared input
    gradient), the native kernel gives XLA's result; it has no custom call in the second pass."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 4, 16)) * 2 - 0.5
    p = _params(16)
    m = GroupNorm(4, 1e-5, swish=swish)

    def r1(p, x):
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(p, x))))(x)
        return jnp.sum(jnp.square(gx))

    def grads(setting):
        with kernels.installed(setting):
            return jax.jit(jax.grad(r1, argnums=(0, 1)))(p, x)

    with kernels.installed(cpu.onednn_kernels()):
        assert "vq_jax_group_norm_forward" in str(jax.make_jaxpr(r1)(p, x))
    chex.assert_trees_all_close(
        grads(cpu.onednn_kernels()), grads(kernels.XLA), rtol=1e-4, atol=1e-4
    )


@needs_native
def test_native_only_for_float32():
    """bf16 compute falls back to the jnp formulation (the kernel is float32)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)).astype(jnp.bfloat16)
    m = GroupNorm(4, dtype=jnp.bfloat16, swish=True)
    p = _params(8)
    with kernels.installed(cpu.onednn_kernels()):
        assert "vq_jax_group_norm" not in str(jax.make_jaxpr(m.apply)(p, x))
        f32 = GroupNorm(4, swish=True)
        assert "vq_jax_group_norm" in str(jax.make_jaxpr(f32.apply)(p, x.astype(jnp.float32)))
    with pytest.raises(ValueError, match="not a CPU kernel mode"):
        cpu.enable("fast")
