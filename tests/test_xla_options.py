"""The CPU compiler options: convolutions leave YNNPACK for XLA's Eigen convs, in the trainer's
programs too, and a user's own XLA_FLAGS setting wins."""

import re

import jax
import jax.numpy as jnp
import pytest

from vq_jax.cpu import xla_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")


def _conv_grad(x, k):
    def loss(x, k):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y**2)

    return jax.grad(loss, (0, 1))(x, k)


def _ynn_convs(hlo: str) -> int:
    """Instructions computing a conv inside a YNNPACK fusion."""
    return sum(
        '"__ynn_fusion"' in line and "conv_general_dilated" in line for line in hlo.splitlines()
    )


def _args():
    # large enough for this jaxlib's default to put the convs in YNNPACK
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
    return x, jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1


def test_options_move_convs_out_of_ynnpack_and_keep_values():
    x, k = _args()
    default = jax.jit(_conv_grad).lower(x, k).compile()
    opts = xla_options.compiler_options()
    assert opts == xla_options.CPU_OPTIONS
    ours = jax.jit(_conv_grad, compiler_options=opts).lower(x, k).compile()
    assert _ynn_convs(ours.as_text()) == 0
    if _ynn_convs(default.as_text()) == 0:
        pytest.skip("this jaxlib does not put convolutions in YNNPACK by default")
    for a, b in zip(default(x, k), ours(x, k), strict=True):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_user_xla_flags_win_and_other_platforms_get_nothing(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert xla_options.compiler_options() == {}
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_options.compiler_options("gpu") == {}
    assert xla_options.compiler_options("tpu") == {}


def test_trainer_step_compiles_with_the_options():
    from benchmarks import common
    from configs import vqvae

    setup = common.setup_step(vqvae.get_config("tiny"))
    hlo = setup.step.lower(setup.state, setup.batch, setup.key).compile().as_text()
    assert re.search(r"= \S+ convolution\(", hlo), "expected XLA (Eigen) convolutions"
    assert _ynn_convs(hlo) == 0
