"""vq_jax.cpu.search (csrc/nearest_code.cc): the screened nearest-code search returns the float64
argmin (ties to the lowest index) for bfloat16 and float32 screens, resolves codes closer than
bfloat16 can tell apart, searches rows with too many candidates exhaustively, and is what the
quantizers run for large codebooks once the native kernels are installed."""

import functools
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subproc import ROOT, script_env

from vq_jax import cpu
from vq_jax.cpu import native, search
from vq_jax.nets import kernels, quantizers
from vq_jax.nets.residual import ResidualVQ

needs_onednn = pytest.mark.skipif(
    not native.available(), reason="oneDNN extra not installed (pip install '.[onednn]')"
)


def screen_or_skip(bits: int, d: int) -> None:
    why = native.nearest_code_unsupported(d, bits)
    if why is not None:
        pytest.skip(f"no {bits}-bit oneDNN matmul on this CPU ({native.cpu_isa()}): {why}")


def float64_argmin(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The nearest code by direct float64 squared differences; np.argmin takes the first."""
    x, codes = np.asarray(x, np.float64), np.asarray(codes, np.float64)
    return np.stack([np.argmin(np.sum(np.square(row - codes), axis=-1)) for row in x])


def screened(x, codes, bits, **kwargs):
    fn = jax.jit(functools.partial(native.nearest_code, screen_bits=bits, **kwargs))
    indices, stats = fn(jnp.asarray(x), jnp.asarray(codes))
    return np.asarray(indices), np.asarray(stats)


@needs_onednn
@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize(
    "n, k, d, offset", [(257, 4097, 3, 0.0), (300, 2500, 8, 50.0), (130, 2100, 256, 0.0)]
)
def test_screened_search_is_the_float64_argmin(bits, n, k, d, offset):
    screen_or_skip(bits, d)
    rng = np.random.default_rng(d)
    # the offset: codes far from the origin (the kernel centres them on their mean)
    x = (rng.standard_normal((n, d)) + offset).astype(np.float32)
    codes = (rng.standard_normal((k, d)) + offset).astype(np.float32)
    # tiles and blocks that do not divide N and K
    indices, stats = screened(x, codes, bits, rows=64, block=1000)
    chex.assert_shape(indices, (n,))
    np.testing.assert_array_equal(indices, float64_argmin(x, codes))
    assert stats[0] == 0 and 1 <= stats[1] <= native.SEARCH_MAX_CANDIDATES


@needs_onednn
def test_codes_closer_than_bfloat16_resolves_are_rescored_exactly():
    screen_or_skip(16, 32)
    rng = np.random.default_rng(0)
    n, k, d = 200, 3000, 32
    codes = rng.standard_normal((k, d)).astype(np.float32)
    # pairs of codes 1e-3 apart (bfloat16 keeps ~3 significant digits) and inputs between them
    twins = codes[:n] + (1e-3 * rng.standard_normal((n, d))).astype(np.float32)
    codes = np.concatenate([codes, twins])
    x = (codes[:n] + 0.6 * (twins - codes[:n])).astype(np.float32)
    expected = float64_argmin(x, codes)
    bf16 = (
        np.asarray(x.astype(jnp.bfloat16), np.float64),
        np.asarray(codes.astype(jnp.bfloat16), np.float64),
    )
    assert (float64_argmin(*bf16) != expected).any()  # a bfloat16 argmin alone gets some wrong
    indices, stats = screened(x, codes, 16)
    np.testing.assert_array_equal(indices, expected)
    assert stats[1] >= 2  # both twins were candidates


@needs_onednn
@pytest.mark.parametrize("bits", [16, 32])
def test_ties_go_to_the_lowest_index_and_crowded_rows_are_searched_exhaustively(bits):
    screen_or_skip(bits, 8)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((700, 8)).astype(np.float32)
    codes = base[rng.permutation(np.repeat(np.arange(700), 3))]  # every code three times
    x = np.concatenate([base[:50], rng.standard_normal((50, 8)).astype(np.float32)])
    expected = float64_argmin(x, codes)
    indices, stats = screened(x, codes, bits)
    np.testing.assert_array_equal(indices, expected)
    assert stats[0] == 0 and stats[1] >= 3
    # more candidates than allowed (each row has >= 3): every row takes the exhaustive path
    indices, stats = screened(x, codes, bits, max_candidates=2)
    np.testing.assert_array_equal(indices, expected)
    assert stats[0] == len(x)


@needs_onednn
def test_quantizers_run_the_installed_kernel_above_the_threshold():
    native.require()
    k, n, d = quantizers.CPU_SEARCH_ABOVE + 3, 96, 16
    x = jax.random.normal(jax.random.key(0), (n, d))
    codes = jax.random.normal(jax.random.key(1), (k, d))
    assert "vq_jax_nearest_code" not in jax.jit(quantizers.nearest_code).lower(x, codes).as_text()
    small = codes[: quantizers.CPU_SEARCH_ABOVE]
    with kernels.installed(cpu.onednn_kernels()):  # small codebooks keep XLA's search
        small_text = jax.jit(quantizers.nearest_code).lower(x, small).as_text()
    assert "vq_jax_nearest_code" not in small_text
    vq = quantizers.VectorQuantizer(codebook_size=k, embed_dim=d)
    exhaustive = quantizers.VectorQuantizer(codebook_size=k, embed_dim=d, search="exhaustive")
    rvq = ResidualVQ(codebook_size=k, embed_dim=d, depth=2)
    z = x.reshape(2, 6, 8, d)
    params = vq.init(jax.random.key(2), z)
    rvq_params = rvq.init(jax.random.key(3), z)

    def loss(module, p, z):
        z_q, result = module.apply(p, z)
        return jnp.sum(jnp.square(z_q)) + result.loss, result.indices

    with kernels.installed(cpu.onednn_kernels()):
        text = jax.jit(quantizers.nearest_code).lower(x, codes).as_text()
        assert "vq_jax_nearest_code" in text
        np.testing.assert_array_equal(
            jax.jit(quantizers.nearest_code)(x, codes), float64_argmin(x, codes)
        )
        grad = jax.grad(functools.partial(loss, vq), argnums=(0, 1), has_aux=True)
        (g_native, gz_native), idx_native = jax.jit(grad)(params, z)
        rvq_idx = rvq.apply(rvq_params, z)[1].indices
    (g_ref, gz_ref), idx_ref = jax.jit(
        jax.grad(functools.partial(loss, exhaustive), argnums=(0, 1), has_aux=True)
    )(params, z)
    np.testing.assert_array_equal(idx_native, idx_ref)
    chex.assert_trees_all_close(g_native, g_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gz_native, gz_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rvq_idx, rvq.apply(rvq_params, z)[1].indices)


_AVX2_SCRIPT = """
import json, numpy as np, jax
from vq_jax.cpu import native, search
rng = np.random.default_rng(0)
x = rng.standard_normal((100, 64)).astype(np.float32)
codes = rng.standard_normal((3000, 64)).astype(np.float32)
d = ((x[:, None].astype(np.float64) - codes[None]) ** 2).sum(-1)
native.require()
got = np.asarray(jax.jit(search.nearest_code)(x, codes))
print(json.dumps({"isa": native.cpu_isa(), "bits": search.screen_bits(64),
                  "exact": bool((got == d.argmin(1)).all())}))
"""


@needs_onednn
def test_cpus_without_bfloat16_dot_products_screen_in_float32():
    env = script_env() | {"ONEDNN_MAX_CPU_ISA": "AVX2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"isa": "AVX2", "bits": 32, "exact": True}, out
    if native.bf16_dot_hardware():
        assert search.screen_bits(64) == 16 and search.screen_bits(8) == 32
