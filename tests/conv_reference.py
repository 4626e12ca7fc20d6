"""A 2-D NHWC x HWIO convolution and its two gradients in float64 numpy, from their definitions:
y[b, i, j, co]      = sum_{ky, kx, ci} x_pad[b, s*i + ky, s*j + kx, ci] * W[ky, kx, ci, co]
dW[ky, kx, ci, co]  = sum_{b, i, j} x_pad[b, s*i + ky, s*j + kx, ci] * dy[b, i, j, co]
dx_pad[b, s*i + ky, s*j + kx, ci] += sum_co dy[b, i, j, co] * W[ky, kx, ci, co]
"""

import numpy as np

# kernel, strides, padding, in, out, batch: the forms the models use
CASES = [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 8, 16, 5),  # the autoencoder's 3x3 conv; prime batch
    ((3, 3), (2, 2), ((0, 1), (0, 1)), 8, 8, 4),  # the encoder's Downsample
    ((1, 1), (1, 1), ((0, 0), (0, 0)), 8, 12, 3),  # nin_shortcut / quant_conv
    ((4, 4), (2, 2), ((1, 1), (1, 1)), 3, 8, 2),  # PatchGAN conv
]


def out_hw(size: int, kernel_hw, strides, padding) -> tuple[int, int]:
    return tuple((size + sum(padding[i]) - kernel_hw[i]) // strides[i] + 1 for i in range(2))


def _windows(x, kernel_hw, strides, padding, ho, wo):
    """(ky, kx, the [b, ho, wo, ci] input window that kernel tap meets)."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
    for ky in range(kh):
        for kx in range(kw):
            yield ky, kx, xp[:, ky : ky + sh * (ho - 1) + 1 : sh, kx : kx + sw * (wo - 1) + 1 : sw]


def conv(x, w, strides, padding):
    ho, wo = out_hw(x.shape[1], w.shape[:2], strides, padding)
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    w = np.asarray(w, np.float64)
    for ky, kx, win in _windows(x, w.shape[:2], strides, padding, ho, wo):
        y += np.einsum("bijc,co->bijo", win, w[ky, kx])
    return y


def kernel_grad(x, dy, kernel_hw, strides, padding):
    _, ho, wo, _ = dy.shape
    out = np.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]))
    for ky, kx, win in _windows(x, kernel_hw, strides, padding, ho, wo):
        out[ky, kx] = np.einsum("bijc,bijo->co", win, np.asarray(dy, np.float64))
    return out


def input_grad(dy, w, x_shape, strides, padding):
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = w.shape[:2], strides, padding
    batch, h, wd, cin = x_shape
    dy, w = np.asarray(dy, np.float64), np.asarray(w, np.float64)
    dx = np.zeros((batch, h + pt + pb, wd + pl + pr, cin))
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            dx[:, sh * i : sh * i + kh, sw * j : sw * j + kw] += np.einsum(
                "bo,yxco->byxc", dy[:, i, j], w
            )
    return dx[:, pt : pt + h, pl : pl + wd]
