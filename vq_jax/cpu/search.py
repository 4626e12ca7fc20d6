"""The native nearest-code search as the networks' large-codebook search kernel.

``csrc/nearest_code.cc`` finds the exact nearest code (squared L2, ties to the lowest index) by
screening every code with a oneDNN matmul, keeping those a rounding bound cannot rule out, and
rescoring them in float64. The screen is bfloat16 on CPUs that compute bfloat16 dot products in
hardware (AVX512-BF16, AMX) and D >= ``BF16_MIN_DIM``, float32 elsewhere: at K = 65536 it is
2.1x XLA's blocked float32 search at D = 256 and 1.7x at D = 8, and at K = 256...4096 2-12x
XLA:CPU's exhaustive search (BENCHMARKS.md section 3d).
Where oneDNN has no matmul for the case, XLA's search runs instead (one warning line), as it does
on other platforms (a program traced here but run on an accelerator).
"""

from __future__ import annotations

import logging

import jax

from vq_jax.cpu import native
from vq_jax.nets import quantizers

BF16_MIN_DIM = 16
"""Below this code dimension the float32 screen is as fast (the matmul is not the cost there)."""

_warned: set[int] = set()


def screen_bits(dim: int) -> int:
    """16 (bfloat16 screen) where the hardware computes bfloat16 dot products and dim is large
    enough to gain from it, else 32."""
    return 16 if dim >= BF16_MIN_DIM and native.bf16_dot_hardware() else 32


def nearest_code(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """The index [N] int32 of the nearest code of each row of x [N, D] in codebook [K, D]; the
    same indices as ``quantizers.exhaustive_nearest_code`` (see the module docstring)."""
    native.require()
    x = jax.lax.stop_gradient(x)
    codebook = jax.lax.stop_gradient(codebook)
    bits = screen_bits(x.shape[-1])
    block = min(native.SEARCH_BLOCK, codebook.shape[0])  # the block the call will use
    why = native.nearest_code_unsupported(x.shape[-1], bits, block=block)
    if why is not None:
        if bits not in _warned:
            _warned.add(bits)
            logging.warning(
                "vq_jax: oneDNN has no %d-bit matmul for the nearest-code search on this CPU "
                "(oneDNN ISA %s: %s); using XLA's search (same indices, slower).",
                bits, native.cpu_isa(), why,
            )  # fmt: skip
        return quantizers.xla_nearest_code(x, codebook)
    return jax.lax.platform_dependent(
        x,
        codebook,
        cpu=lambda x_, c_: native.nearest_code(x_, c_, screen_bits=bits, block=block)[0],
        default=quantizers.xla_nearest_code,
    )
