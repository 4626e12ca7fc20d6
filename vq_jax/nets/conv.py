"""2-D NHWC convolution with a choice of how it and its gradients are computed (``conv2d``'s
``weight_grad``; the same sums, only the order of the float additions differs):

- "xla": XLA's conv and its own gradients.
- "onednn": forward, input and kernel gradients through oneDNN as XLA FFI custom calls on CPU
  (``vq_jax.native``), XLA's on other platforms, and XLA's for the (dtype, shape) cases oneDNN
  has no kernel for on this CPU (bfloat16 on AVX2-only CPUs; one warning line per dtype).
  XLA:CPU transposes NHWC operands before each kernel-gradient conv and runs a strided conv's
  input gradient as a dilated conv; oneDNN works on NHWC directly, 1.2-4x faster per layer
  (BENCHMARKS.md section 6).
- "patches": XLA's forward conv and unit-stride input gradient; for strided convs the input
  gradient is one GEMM plus a fused scatter-sum (``col2im_input_grad``); the kernel gradient
      dW[ky, kx, ci, co] = sum_{b, i, j} x_pad[b, s*i + ky, s*j + kx, ci] * dy[b, i, j, co]
  is an im2col GEMM ([kh*kw*Ci, b*Ho*Wo] @ [b*Ho*Wo, Co]) accumulated over chunks of a few
  images (``lax.scan``) so each chunk's patches stay in cache. It won under XLA's YNNPACK
  convolutions; with the Eigen ones ``vq_jax.xla_options`` selects, XLA's are as fast.
- "auto": see ``resolve``.

``Conv`` is a drop-in for ``flax.linen.Conv`` (same parameter names and shapes) for NHWC inputs
with explicit padding.
"""

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax import native

Dtype = jnp.dtype | type
Padding = tuple[tuple[int, int], tuple[int, int]]
_DN = ("NHWC", "HWIO", "NHWC")
_CHUNK_BYTES = 4 * 2**20  # patch bytes per scan chunk: about what stays cached on a CPU core
WEIGHT_GRADS = ("auto", "xla", "patches", "onednn")


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _chunk_size(batch: int, per_image_bytes: int) -> int:
    """The largest divisor of ``batch`` whose patches fit in _CHUNK_BYTES (at least 1)."""
    best = 1
    for c in range(1, batch + 1):
        if batch % c == 0 and c * per_image_bytes <= _CHUNK_BYTES:
            best = c
    return best


def _patches_t(x: jax.Array, kernel_hw: tuple[int, int], strides, padding, out_hw) -> jax.Array:
    """x [b, H, W, C] -> transposed im2col patches [kh*kw*C, b*Ho*Wo] (HWI row order)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    b, _, _, c = x.shape
    xt = jnp.pad(x, ((0, 0), *padding, (0, 0))).transpose(3, 0, 1, 2)  # C, b, Hp, Wp
    taps = [
        xt[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps).reshape(kh * kw * c, b * ho * wo)


def patches_kernel_grad(
    x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides, padding
) -> jax.Array:
    """d(sum(conv(x, W) * dy)) / dW as chunked im2col GEMMs, float32 accumulation."""
    kh, kw, c, co = kernel_shape
    b, ho, wo, _ = dy.shape
    chunk = _chunk_size(b, kh * kw * c * ho * wo * x.dtype.itemsize)
    xs = x.reshape(b // chunk, chunk, *x.shape[1:])
    ds = dy.reshape(b // chunk, chunk * ho * wo, co)

    def body(acc, chunk_xd):
        xc, dc = chunk_xd
        p = _patches_t(xc, (kh, kw), strides, padding, (ho, wo))
        return acc + jnp.matmul(p, dc, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(body, jnp.zeros((kh * kw * c, co), jnp.float32), (xs, ds))
    return acc.reshape(kh, kw, c, co)


def col2im_input_grad(
    dy: jax.Array, kernel: jax.Array, x_shape: Sequence[int], strides, padding
) -> jax.Array:
    """d(sum(conv(x, W) * dy)) / dx as one GEMM (dy @ W^T -> per-tap columns) and a fused
    strided scatter-sum of the columns back onto the padded input grid:
        dx_pad[b, s*i + ky, s*j + kx, ci] += sum_co dy[b, i, j, co] * W[ky, kx, ci, co].
    For strided convs, where XLA:CPU's dilated-input conv is slow."""
    kh, kw, c, co = kernel.shape
    b, ho, wo, _ = dy.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    cols = jnp.matmul(
        dy.reshape(-1, co), kernel.reshape(kh * kw * c, co).T, preferred_element_type=jnp.float32
    ).reshape(b, ho, wo, kh, kw, c)
    zero = jnp.zeros((), cols.dtype)
    dx_pad = sum(
        jax.lax.pad(
            cols[:, :, :, i, j],
            zero,
            [
                (0, 0, 0),
                (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                (j, wp - j - sw * (wo - 1) - 1, sw - 1),
                (0, 0, 0),
            ],
        )
        for i in range(kh)
        for j in range(kw)
    )
    return dx_pad[:, pt : pt + x_shape[1], pl : pl + x_shape[2]].astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patches_grad(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, res, dy):
    x, kernel = res
    if strides == (1, 1):  # XLA's own input gradient is fast for unit strides
        _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)
        (dx,) = input_vjp(dy)
    else:
        dx = col2im_input_grad(dy, kernel, x.shape, strides, padding).astype(x.dtype)
    dk = patches_kernel_grad(x, dy.astype(x.dtype), kernel.shape, strides, padding)
    return dx, dk.astype(kernel.dtype)


_conv_patches_grad.defvjp(_fwd, _bwd)


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


def resolve(weight_grad: str) -> str:
    """The mode "auto" stands for here: "onednn" where a single CPU device runs the program and
    the oneDNN kernels can be built, else "xla". (Several devices: a custom call has no sharding
    rule, so XLA would gather its operands onto every device.)"""
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
    if weight_grad != "auto":
        return weight_grad
    if jax.default_backend() == "cpu" and jax.device_count() == 1 and native.available():
        return "onednn"
    return "xla"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    weight_grad: str = "auto",
) -> jax.Array:
    """NHWC x HWIO conv. ``weight_grad`` picks how it and its gradients are computed (the same
    sums in another order): "xla" (XLA's own), "patches" (XLA's forward, chunked im2col GEMM
    kernel gradients), "onednn" (forward and both gradients by oneDNN on CPU, XLA's elsewhere;
    ``vq_jax.native``) or "auto" (see ``resolve``; BENCHMARKS.md section 6)."""
    weight_grad = resolve(weight_grad)
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if weight_grad == "xla" or (weight_grad == "onednn" and x.dtype not in native.DTYPES):
        return _xla_conv(x, kernel, strides, padding)
    if weight_grad == "patches":
        return _conv_patches_grad(x, kernel, strides, padding)
    if not _onednn_serves(x, kernel, strides, padding):
        return _xla_conv(x, kernel, strides, padding)
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x_, k_: _onednn_conv(x_, k_, strides, padding),
        default=lambda x_, k_: _xla_conv(x_, k_, strides, padding),
    )


class Conv(nn.Module):
    """``flax.linen.Conv`` for NHWC inputs with explicit padding, using ``conv2d``.

    Parameters ``kernel`` [kh, kw, in, out] and ``bias`` [out] (unless ``use_bias=False``), as
    flax's Conv names and initialises them.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((1, 1), (1, 1))
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        if not self.use_bias:
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return conv2d(x, kernel, self.strides, self.padding, self.weight_grad)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding, self.weight_grad)
        return y + bias.reshape(1, 1, 1, -1)
