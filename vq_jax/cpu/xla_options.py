"""XLA compiler options that vq-jax compiles its conv programs with, per backend.

On CPU, this jaxlib (0.10) hands convolutions to YNNPACK ("__ynn_fusion" in the compiled HLO)
by default. At the VQ-VAE's shapes XLA:CPU's Eigen convolutions compute the kernel gradients
1.3-3.6x faster and the 32x32 layers' forward passes 1.2-1.65x faster (benchmarks/layers.py,
BENCHMARKS.md section 6). The option below
lists the YNNPACK fusion kinds to keep, dots and reductions: this jaxlib's default list less
its convolutions (as ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
would say it; compiler options take the full list, not a +/- edit). The values are the
same sums in another order, so the math does not change. The train, eval and encode programs of
``vq_jax.trainer`` and ``vq_jax.api`` compile with it. To compile your own jitted calls the same
way, use ``jax.jit(f, compiler_options=vq_jax.cpu.xla_options.compiler_options())``.

If the user sets the flag in ``XLA_FLAGS``, their choice wins: we add nothing then.
"""

import os

import jax

_CPU_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {_CPU_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """Options for programs that run on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or _CPU_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(CPU_OPTIONS)


def mesh_compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str]:
    """Options for programs that run on `mesh`'s devices."""
    return compiler_options(mesh.devices.flat[0].platform)
