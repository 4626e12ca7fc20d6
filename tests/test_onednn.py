"""vq_jax.onednn and conv2d's "onednn" mode: oneDNN's forward pass and both gradients equal their
numpy definitions (tests/conv_reference.py) in float32 and bfloat16, inside jit, under a sharded
train step, and the library says what to install when it cannot be built."""

import chex
import conv_reference as ref_conv
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subproc import run_script, train_args

from vq_jax import native, trainer
from vq_jax.nets import conv

needs_onednn = pytest.mark.skipif(
    not native.available(), reason="oneDNN extra not installed (pip install '.[onednn]')"
)


def _inputs(case, size, dtype=jnp.float32):
    kernel_hw, strides, padding, cin, cout, batch = case
    ho, wo = ref_conv.out_hw(size, kernel_hw, strides, padding)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin), dtype)
    w = jax.random.normal(jax.random.key(1), (*kernel_hw, cin, cout), dtype)
    dy = jax.random.normal(jax.random.key(2), (batch, ho, wo, cout), dtype)
    return x, w, dy


@needs_onednn
@pytest.mark.parametrize("case", ref_conv.CASES)
@pytest.mark.parametrize("size", [8, 9])
def test_forward_and_gradients_match_definitions(case, size):
    kernel_hw, strides, padding = case[:3]
    x, w, dy = _inputs(case, size)

    @jax.jit
    def forward_and_vjp(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, strides, padding, "onednn"), x, w)
        return y, *vjp(dy)

    y, dx, dw = forward_and_vjp(x, w, dy)
    xn, wn, dyn = (np.asarray(a, np.float64) for a in (x, w, dy))
    chex.assert_shape(y, dy.shape)
    np.testing.assert_allclose(y, ref_conv.conv(xn, wn, strides, padding), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        dx, ref_conv.input_grad(dyn, wn, x.shape, strides, padding), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        dw, ref_conv.kernel_grad(xn, dyn, kernel_hw, strides, padding), rtol=1e-5, atol=1e-4
    )


@needs_onednn
@pytest.mark.parametrize("case", ref_conv.CASES[1::2])
def test_second_order_gradients_match_xla(case):
    """An R1-style penalty, d/d(w, x) ||d/dx sum(sin(conv(x, w)))||^2, differentiates oneDNN's
    gradients themselves; XLA's conv gives the reference."""
    strides, padding = case[1:3]
    x, w, _ = _inputs(case, 9)

    def penalty(mode):
        def f(x, w):
            gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv.conv2d(x, w, strides, padding, mode))))
            return jnp.sum(jnp.square(gx(x)))

        return jax.jit(jax.grad(f, (0, 1)))(x, w)

    chex.assert_trees_all_close(penalty("onednn"), penalty("xla"), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_bfloat16_accumulates_in_float32():
    """bf16 operands, bf16 results within bf16 rounding of the float64 sums of the same operands."""
    case = ref_conv.CASES[0]
    kernel_hw, strides, padding = case[:3]
    x, w, dy = _inputs(case, 16, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, strides, padding, "onednn"), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xn, wn, dyn = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w, dy))
    for got, want in (
        (y, ref_conv.conv(xn, wn, strides, padding)),
        (dx, ref_conv.input_grad(dyn, wn, x.shape, strides, padding)),
        (dw, ref_conv.kernel_grad(xn, dyn, kernel_hw, strides, padding)),
    ):
        got = np.asarray(got.astype(jnp.float32))
        # one bf16 rounding of the result (8 bits of mantissa), not a bf16 accumulation
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())


@needs_onednn
def test_sharded_program_gives_the_unsharded_result():
    """A custom call inside a program whose batch is sharded over the 4 test devices: XLA gathers
    its operands (it has no sharding rule), and the values stay right."""
    case = ref_conv.CASES[1]
    strides, padding = case[1:3]
    x, w, dy = _inputs(case, 8)
    x = jax.device_put(x, jax.NamedSharding(trainer.make_mesh(), jax.P(trainer.DATA_AXIS)))
    grads = jax.jit(
        jax.grad(
            lambda x, w: jnp.vdot(conv.conv2d(x, w, strides, padding, "onednn"), dy), (0, 1)
        )
    )(x, w)
    want = jax.grad(lambda x, w: jnp.vdot(conv.conv2d(x, w, strides, padding, "xla"), dy), (0, 1))
    chex.assert_trees_all_close(grads, want(x, w), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_auto_picks_onednn_only_for_a_single_cpu_device(monkeypatch):
    assert jax.device_count() > 1  # tests fake 4 devices: a custom call would gather the batch
    assert conv.resolve("auto") == "xla"
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert conv.resolve("auto") == "onednn"
    x, w, _ = _inputs(ref_conv.CASES[0], 8)
    jaxpr = str(jax.make_jaxpr(lambda w: conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1))))(w))
    assert "vq_jax_onednn_conv_forward" in jaxpr


@pytest.fixture
def no_onednn(monkeypatch):
    """onednn as on a machine without the extra (the load result is cached: reset it around)."""
    monkeypatch.setattr(native, "onednn_root", lambda: None)
    native._load.cache_clear()
    yield
    monkeypatch.undo()
    native._load.cache_clear()


def test_missing_onednn_names_the_fix_and_auto_falls_back(no_onednn):
    assert conv.resolve("auto") == "xla"
    x, w, _ = _inputs(ref_conv.CASES[0], 8)
    with pytest.raises(native.NativeUnavailable, match=r"pip install 'vq-jax\[onednn\]'"):
        conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), "onednn")


@needs_onednn
def test_failed_build_reports_the_compiler_output(monkeypatch, tmp_path):
    """A compiler that fails: the error quotes its command and output; nothing half-built is
    left in the cache."""
    monkeypatch.setenv("VQ_JAX_CACHE_DIR", str(tmp_path))
    script = tmp_path / "broken-cxx"
    script.write_text("#!/bin/sh\necho 'fatal: no oneDNN today' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    failed = r"(?s)building the native kernels failed.*no oneDNN"
    with pytest.raises(native.NativeUnavailable, match=failed):
        native.build()
    assert list(tmp_path.glob("*.so")) == []


@needs_onednn
def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("VQ_JAX_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime


@needs_onednn
def test_build_script_and_a_single_device_training_run(tmp_path):
    """scripts/build_native.py prints the cached library; train.py on one CPU device (where
    "auto" means the native kernels) trains, evaluates and checkpoints the tiny VQGAN."""
    proc = run_script("scripts/build_native.py")
    assert proc.stdout.strip() == str(native.build())
    proc = run_script(*train_args("vqgan", str(tmp_path / "w")), devices=1)
    assert "eval step 4" in proc.stdout, proc.stdout[-2000:]
