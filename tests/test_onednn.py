"""vq_jax.cpu.conv (the "onednn" CPU kernels): oneDNN's forward pass and both gradients equal their
numpy definitions (tests/conv_reference.py) in float32 and bfloat16, inside jit, under a sharded
train step, and the library says what to install when it cannot be built."""

import json
import subprocess
import sys

import chex
import conv_reference as ref_conv
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subproc import ROOT, run_script, script_env, train_args

from vq_jax import cpu, loop
from vq_jax.cpu import conv, native
from vq_jax.nets import kernels

needs_onednn = pytest.mark.skipif(
    not native.available(), reason="oneDNN extra not installed (pip install '.[onednn]')"
)


def conv2d(x, w, strides, padding, mode):
    """The conv as the CPU kernel `mode` computes it: "onednn" (vq_jax.cpu.conv) or "xla"."""
    if mode == "onednn":
        return conv.conv2d(x, w, strides, padding)
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=conv.DIMENSION_NUMBERS
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
        y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides, padding, "onednn"), x, w)
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


def _r1_penalty_grads(mode, x, w, strides, padding):
    """d/d(x, w) ||d/dx sum(sin(conv(x, w)))||^2: an R1-style penalty, whose gradient runs the
    conv's forward pass, its input gradient, and the VJPs of both."""

    def f(x, w):
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv2d(x, w, strides, padding, mode))))
        return jnp.sum(jnp.square(gx(x)))

    return jax.jit(jax.grad(f, (0, 1)))(x, w)


@needs_onednn
@pytest.mark.parametrize("case", ref_conv.CASES[1::2])
def test_second_order_gradients_are_within_float32_rounding(case):
    """oneDNN's gradients differentiated again, against a float64 reference (XLA in x64).

    The tolerance is the float32 rounding bound of the computation, so it holds for any
    summation order (oneDNN's blocking differs between AVX2, AVX-512 and AMX; XLA's differs
    again): each of the 4 chained conv passes sums at most K products, and a sum of K float32
    terms in any order is within gamma_K = K*u / (1 - K*u) (u = 2^-24) of the exact sum, relative
    to its magnitude (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The pass
    errors add up, so |got - exact| <= 4 * gamma_K * max|exact|. XLA's float32 result is held to
    the same bound, showing it is the float32 envelope and not a oneDNN allowance; a wrong
    pass (wrong tap, stride or padding) misses it by orders of magnitude.
    """
    kernel_hw, strides, padding, cin, cout, batch = case
    x, w, _ = _inputs(case, 9)
    ho, wo = ref_conv.out_hw(9, kernel_hw, strides, padding)
    k = max(kernel_hw[0] * kernel_hw[1] * max(cin, cout), batch * ho * wo)
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    with jax.enable_x64(True):
        exact = _r1_penalty_grads("xla", *(a.astype(jnp.float64) for a in (x, w)), strides, padding)
        exact = [np.asarray(e) for e in exact]
    for mode in ("onednn", "xla"):
        got = _r1_penalty_grads(mode, x, w, strides, padding)
        for name, g, e in zip(("d/dx", "d/dw"), got, exact, strict=True):
            bound = 4 * gamma * np.abs(e).max()
            err = np.abs(np.asarray(g, np.float64) - e).max()
            assert err <= bound, f"{mode} {name}: error {err:.3g} > float32 bound {bound:.3g}"


@needs_onednn
def test_bfloat16_accumulates_in_float32():
    """bf16 operands, bf16 results within bf16 rounding of the float64 sums of the same operands,
    whether oneDNN has bf16 kernels on this CPU (AVX-512, AMX) or XLA's conv serves the case
    (AVX2-only CPUs; then the program has no oneDNN call)."""
    case = ref_conv.CASES[0]
    kernel_hw, strides, padding = case[:3]
    x, w, dy = _inputs(case, 16, jnp.bfloat16)
    has_kernels = native.conv_unsupported("bfloat16", x.shape, w.shape, strides, padding) is None
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, strides, padding, "onednn"))(x, w))
    assert ("vq_jax_onednn_conv_forward" in jaxpr) == has_kernels
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides, padding, "onednn"), x, w)
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


def test_unsupported_case_falls_back_to_xla_with_one_warning(monkeypatch, caplog):
    """A case oneDNN cannot create a primitive for on this CPU is computed by XLA's conv, with
    one warning line per dtype, instead of failing when the program runs."""
    monkeypatch.setattr(native, "require", lambda: None)
    monkeypatch.setattr(native, "cpu_isa", lambda: "AVX2")
    monkeypatch.setattr(native, "conv_unsupported", lambda *a: "could not create a primitive")
    monkeypatch.setattr(conv, "_warned_fallbacks", set())
    x, w, dy = _inputs(ref_conv.CASES[0], 8)
    strides, padding = ref_conv.CASES[0][1:3]
    with caplog.at_level("WARNING"):
        for _ in range(2):
            fn = lambda x, w: jnp.vdot(conv2d(x, w, strides, padding, "onednn"), dy)
            jaxpr = str(jax.make_jaxpr(jax.grad(fn, (0, 1)))(x, w))
    assert "vq_jax_onednn" not in jaxpr and "conv_general_dilated" in jaxpr
    lines = [r.getMessage() for r in caplog.records if "oneDNN has no" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "float32" in lines[0] and "AVX2" in lines[0] and "using XLA's convolution" in lines[0]


def _onednn_isa_subprocess(isa: str, *args: str, timeout: int):
    """`python ARGS` from the repo root on one CPU device with oneDNN capped at `isa`."""
    env = script_env(devices=1)
    env["ONEDNN_MAX_CPU_ISA"] = isa
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@needs_onednn
@pytest.mark.slow
def test_avx2_cpu_runs_float32_and_bfloat16_gd_steps_like_xla():
    """On an AVX2-only CPU (imitated with ONEDNN_MAX_CPU_ISA=AVX2; a no-op on such a CPU), the
    VQGAN G + D step (R1 and LeCam on) runs in float32 through oneDNN with XLA's measurements,
    and in bfloat16 (no oneDNN bf16 kernels there) through XLA's convs, reported in one line,
    with the measurements of the bfloat16 step in XLA mode."""
    proc = _onednn_isa_subprocess("AVX2", "tests/onednn_isa_check.py", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    f32, f32_xla = runs["float32/onednn"], runs["float32/xla"]
    bf16, bf16_xla = runs["bfloat16/onednn"], runs["bfloat16/xla"]
    assert f32["onednn"] == {"float32": True, "bfloat16": False}
    assert not bf16["onednn"]["bfloat16"]  # its float32 adaptive-weight conv may use oneDNN
    assert f32_xla["onednn"] == bf16_xla["onednn"] == {"float32": False, "bfloat16": False}
    fallback = [line for line in proc.stderr.splitlines() if "oneDNN has no" in line]
    assert len(fallback) == 1 and "bfloat16" in fallback[0] and "AVX2" in fallback[0], fallback
    for got, want in ((f32, f32_xla), (bf16, bf16_xla)):
        assert set(got["metrics"]) == set(want["metrics"])
    for name, want in f32_xla["metrics"].items():
        # the same float32 sums in another order
        assert f32["metrics"][name] == pytest.approx(want, rel=1e-4, abs=1e-5), name
    for name, want in bf16_xla["metrics"].items():
        # the same bf16 convs; only the float32 adaptive-weight conv differs, and with it the
        # fusions around it, which may round to bf16 at other points (a few bf16 ulps, 2^-8)
        assert bf16["metrics"][name] == pytest.approx(want, rel=2e-2, abs=1e-3), name


@needs_onednn
@pytest.mark.slow
def test_kernel_tests_pass_with_onednn_capped_at_avx2():
    """This file's tests under ONEDNN_MAX_CPU_ISA=AVX2, as on an AVX2-only CPU: on a CPU with
    AVX-512 or AMX, the only way CI here exercises oneDNN's AVX2 kernels and the bf16 fallback."""
    if native.cpu_isa() in ("SSE4.1", "AVX", "AVX2"):
        pytest.skip(f"oneDNN runs {native.cpu_isa()} here already: the suite itself is that run")
    proc = _onednn_isa_subprocess(
        "AVX2", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
        "-k", "not capped_at_avx2 and not avx2_cpu_runs", timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]


@needs_onednn
def test_sharded_program_gives_the_unsharded_result():
    """A custom call inside a program whose batch is sharded over the 4 test devices: XLA gathers
    its operands (it has no sharding rule), and the values stay right."""
    case = ref_conv.CASES[1]
    strides, padding = case[1:3]
    x, w, dy = _inputs(case, 8)
    x = jax.device_put(x, jax.NamedSharding(loop.make_mesh(), jax.P(loop.DATA_AXIS)))
    grads = jax.jit(
        jax.grad(lambda x, w: jnp.vdot(conv2d(x, w, strides, padding, "onednn"), dy), (0, 1))
    )(x, w)
    want = jax.grad(lambda x, w: jnp.vdot(conv2d(x, w, strides, padding, "xla"), dy), (0, 1))
    chex.assert_trees_all_close(grads, want(x, w), rtol=1e-5, atol=1e-4)


@pytest.fixture
def setting():
    """Each test's CPU kernel setting is its own: back to XLA's kernels afterwards."""
    yield
    kernels.install(kernels.XLA)


def _one_device(monkeypatch):
    devices = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: devices[:1])


def _model_jaxpr() -> str:
    """The traced forward and backward pass of a tiny conv + GroupNorm network."""
    from vq_jax.nets.autoencoder import ResnetBlock

    x = jnp.ones((2, 8, 8, 8))
    block = ResnetBlock(16, num_groups=4)
    params = block.init(jax.random.key(0), x)
    return str(jax.make_jaxpr(jax.grad(lambda p: block.apply(p, x).sum()))(params))


@needs_onednn
def test_auto_picks_onednn_only_for_a_single_cpu_device(monkeypatch, setting):
    assert jax.device_count() > 1  # tests fake 4 devices: a custom call would gather the batch
    assert cpu.enable("auto") == "xla"
    assert "vq_jax_onednn" not in _model_jaxpr()
    _one_device(monkeypatch)
    assert cpu.enable("auto") == "onednn"
    jaxpr = _model_jaxpr()
    assert "vq_jax_onednn_conv_forward" in jaxpr and "vq_jax_group_norm_forward" in jaxpr


@pytest.fixture
def no_onednn(monkeypatch, setting):
    """onednn as on a machine without the extra (the load result is cached: reset it around)."""
    monkeypatch.setattr(native, "onednn_root", lambda: None)
    native._library.cache_clear()
    yield
    monkeypatch.undo()
    native._library.cache_clear()


def test_missing_onednn_names_the_fix_and_auto_falls_back(no_onednn, monkeypatch):
    """ "auto" on one CPU device without the extra: a visible warning naming the fix, then
    XLA's kernels; "onednn" asked for explicitly is an error naming the fix."""
    _one_device(monkeypatch)
    with pytest.warns(cpu.NativeKernelWarning, match=r"pip install 'vq-jax\[onednn\]'"):
        assert cpu.enable("auto") == "xla"
    assert kernels.current() == kernels.XLA
    with pytest.raises(native.NativeUnavailable, match=r"pip install 'vq-jax\[onednn\]'"):
        cpu.enable("onednn")


def test_failed_build_warns_and_falls_back(monkeypatch, setting, tmp_path):
    """A compiler that fails during enable("auto"): a warning quoting it, XLA's kernels."""
    monkeypatch.setenv("VQ_JAX_CACHE_DIR", str(tmp_path))
    script = tmp_path / "broken-cxx"
    script.write_text("#!/bin/sh\necho 'fatal: no oneDNN today' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    monkeypatch.setattr(native, "onednn_root", lambda: tmp_path)  # any root: the build fails
    monkeypatch.setattr(native, "library_path", lambda root: tmp_path / "lib.so")
    _one_device(monkeypatch)
    native._library.cache_clear()
    try:
        with pytest.warns(cpu.NativeKernelWarning, match="building the native kernels failed"):
            assert cpu.enable("auto") == "xla"
        assert "vq_jax_onednn" not in _model_jaxpr()
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_tracing_and_init_never_build(monkeypatch, setting):
    """Under XLA's kernels (the default, or enable("xla")) no model trace, init or encode
    builds or loads the native library."""

    def no_build(*a, **k):
        raise AssertionError("the native library was built while tracing")

    monkeypatch.setattr(native, "build", no_build)
    native._library.cache_clear()
    try:
        kernels.install(kernels.XLA)
        assert "vq_jax_onednn" not in _model_jaxpr()
        assert cpu.enable("xla") == "xla"
        from configs import vqvae
        from vq_jax import state as state_lib

        config = vqvae.get_config("tiny")
        comps = state_lib.build(config)
        r, c = config.input.resolution, config.input.channels
        x = jnp.zeros((1, r, r, c))
        variables = comps.model.init(jax.random.key(0), x)
        comps.model.apply(variables, x, method=comps.model.encode)
        assert native._library.cache_info().currsize == 0
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_environment_switch_turns_the_kernels_off(monkeypatch, setting):
    """VQ_JAX_NATIVE=off: "auto" means XLA's ops even on one CPU device, and asking for oneDNN
    names the switch."""
    monkeypatch.setenv(native.ENV_SWITCH, "off")
    _one_device(monkeypatch)
    native._library.cache_clear()
    try:
        assert not native.available() and cpu.enable("auto") == "xla"
        with pytest.raises(native.NativeUnavailable, match="VQ_JAX_NATIVE=off"):
            cpu.enable("onednn")
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


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
