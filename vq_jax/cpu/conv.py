"""oneDNN convolutions as a differentiable ``conv_general_dilated`` for ``nn.Conv``.

Forward, input and kernel gradients run through oneDNN as XLA FFI custom calls on CPU
(``vq_jax.cpu.native``), XLA's conv on other platforms. XLA:CPU transposes NHWC operands before
each kernel-gradient conv and runs a strided conv's input gradient as a dilated conv; oneDNN
works on NHWC directly, 1.2-4x faster per layer (BENCHMARKS.md section 6). The same sums, only
the order of the float additions differs. ``conv_general_dilated`` serves the cases oneDNN has
(NHWC x HWIO, explicit padding, no dilation, one group, float32/bfloat16 that this CPU has
kernels for) and hands every other case to ``jax.lax.conv_general_dilated``: bfloat16 on
AVX2-only CPUs, with one warning line per dtype.
"""

import functools
import logging
from collections.abc import Sequence

import jax

from vq_jax.cpu import native

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")  # the layouts oneDNN serves: x, kernel, y


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS
    )


# oneDNN's three passes, each a custom_vjp whose VJP is made of the other two (all three are
# linear in each argument), so the conv can be differentiated any number of times (R1 penalty).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, strides, padding):
    return native.conv_forward(x, kernel, strides, padding)


def _onednn_conv_fwd(x, kernel, strides, padding):
    return _onednn_conv(x, kernel, strides, padding), (x, kernel)


def _onednn_conv_bwd(strides, padding, res, dy):
    x, kernel = res
    dy = dy.astype(x.dtype)
    return (
        _onednn_input_grad(dy, kernel, x.shape, strides, padding),
        _onednn_kernel_grad(x, dy, kernel.shape, strides, padding),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_input_grad(dy, kernel, x_shape, strides, padding):
    return native.conv_input_grad(dy, kernel, x_shape, strides, padding)


def _onednn_input_grad_fwd(dy, kernel, x_shape, strides, padding):
    return _onednn_input_grad(dy, kernel, x_shape, strides, padding), (dy, kernel)


def _onednn_input_grad_bwd(x_shape, strides, padding, res, ddx):
    dy, kernel = res
    ddx = ddx.astype(dy.dtype)
    return (
        _onednn_conv(ddx, kernel, strides, padding),
        _onednn_kernel_grad(ddx, dy, kernel.shape, strides, padding),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_kernel_grad(x, dy, kernel_shape, strides, padding):
    return native.conv_kernel_grad(x, dy, kernel_shape, strides, padding)


def _onednn_kernel_grad_fwd(x, dy, kernel_shape, strides, padding):
    return _onednn_kernel_grad(x, dy, kernel_shape, strides, padding), (x, dy)


def _onednn_kernel_grad_bwd(kernel_shape, strides, padding, res, ddw):
    x, dy = res
    ddw = ddw.astype(x.dtype)
    return (
        _onednn_input_grad(dy, ddw, x.shape, strides, padding),
        _onednn_conv(x, ddw, strides, padding),
    )


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)
_onednn_input_grad.defvjp(_onednn_input_grad_fwd, _onednn_input_grad_bwd)
_onednn_kernel_grad.defvjp(_onednn_kernel_grad_fwd, _onednn_kernel_grad_bwd)


_warned_fallbacks: set[str] = set()


def _onednn_serves(x: jax.Array, kernel: jax.Array, strides, padding) -> bool:
    """Whether oneDNN can run this case on this CPU; else warn (once per dtype) and say no."""
    native.require()
    shapes = (tuple(x.shape), tuple(kernel.shape), strides, padding)
    why = native.conv_unsupported(str(x.dtype), *shapes)
    if why is None:
        return True
    if str(x.dtype) not in _warned_fallbacks:
        _warned_fallbacks.add(str(x.dtype))
        logging.warning(
            "vq_jax: oneDNN has no %s convolution kernels for this CPU (oneDNN ISA %s; first "
            "case: x %s, kernel %s: %s); using XLA's convolution for those cases (same result, "
            "slower).",
            x.dtype, native.cpu_isa(), shapes[0], shapes[1], why,
        )  # fmt: skip
    return False


def _nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    if dimension_numbers is None or lhs.ndim != 4 or rhs.ndim != 4:
        return False
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS)


def _ones(v: Sequence[int] | None) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated``, through oneDNN for the cases it serves (see above;
    the native library must be loaded: ``vq_jax.cpu.enable``)."""
    xla = functools.partial(
        jax.lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    served = (
        not isinstance(padding, str)
        and _nhwc(lhs, rhs, dimension_numbers)
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and feature_group_count == batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and lhs.dtype in native.DTYPES
    )
    if not served:
        return xla()
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not _onednn_serves(lhs, rhs, strides, pads):
        return xla()
    return jax.lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda x_, k_: _onednn_conv(x_, k_, strides, pads),
        default=lambda x_, k_: _xla_conv(x_, k_, strides, pads),
    )


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
) -> jax.Array:
    """NHWC x HWIO conv with explicit padding, forward and both gradients by oneDNN."""
    return conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS)
