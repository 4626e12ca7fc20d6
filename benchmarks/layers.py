"""Per-layer throughput behind the step's speed work (BENCHMARKS.md, "attempts"): XLA's conv
gradients against oneDNN's (vq_jax.cpu.conv), and flax's GroupNorm + swish against
nets/group_norm.py's (jnp and native kernel, vq_jax.cpu.group_norm), at the VQ-VAE's shapes
(batch 64). The "patches" rows of older reports came from a mode since removed.

  JAX_PLATFORMS=cpu python -m benchmarks.layers                   # as the trainer compiles
  JAX_PLATFORMS=cpu python -m benchmarks.layers --noxla_options   # XLA:CPU's defaults (YNNPACK)

Times are the minimum over --repeats calls (less sensitive to a busy machine than the median).
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn

from benchmarks import common
from vq_jax import cpu
from vq_jax.cpu import conv as onednn_conv
from vq_jax.cpu import native, xla_options
from vq_jax.nets import kernels
from vq_jax.nets.group_norm import GroupNorm

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (minimum taken).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")
_XLA_OPTIONS = flags.DEFINE_bool(
    "xla_options", True, "Compile with vq_jax.xla_options, as the trainer does."
)


def _options() -> dict[str, str]:
    return xla_options.compiler_options() if _XLA_OPTIONS.value else {}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=_options(), **kwargs)


# (name, H=W, C_in, C_out, kernel, stride, padding)
CONVS = [
    ("3x3 conv 32x32 64->64", 32, 64, 64, 3, 1, ((1, 1), (1, 1))),
    ("3x3 conv 32x32 128->128 (upsample)", 32, 128, 128, 3, 1, ((1, 1), (1, 1))),
    ("3x3 conv 16x16 128->128", 16, 128, 128, 3, 1, ((1, 1), (1, 1))),
    ("3x3 conv 8x8 128->128", 8, 128, 128, 3, 1, ((1, 1), (1, 1))),
    ("3x3 stride-2 conv 32x32 64->64 (downsample)", 32, 64, 64, 3, 2, ((0, 1), (0, 1))),
    ("4x4 stride-2 conv 16x16 64->128 (PatchGAN)", 16, 64, 128, 4, 2, ((1, 1), (1, 1))),
]


def _min_time(fn, *args, repeats: int) -> float:
    return min(common.time_calls(fn, *args, repeats=repeats))


def _conv2d(x, w, strides, pad, mode):
    if mode == "onednn":
        return onednn_conv.conv2d(x, w, strides, pad)
    return jax.lax.conv_general_dilated(
        x, w, strides, pad, dimension_numbers=onednn_conv.DIMENSION_NUMBERS
    )


def conv_rows(repeats: int) -> list[dict]:
    rows = []
    for name, hw, cin, cout, k, s, pad in CONVS:
        x = jax.random.normal(jax.random.key(0), (64, hw, hw, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        y = _conv2d(x, w, (s, s), pad, "xla")
        dy = jax.random.normal(jax.random.key(2), y.shape)
        gflop = 2 * y.size * k * k * cin / 1e9

        def grads(mode, argnum, s=s, pad=pad, dy=dy):
            def f(inputs, kernel):
                return jnp.vdot(_conv2d(inputs, kernel, (s, s), pad, mode), dy)

            return _jit(jax.grad(f, argnums=argnum))

        row = {"layer": name, "gflop": round(gflop, 3)}
        forward = _jit(_conv2d, static_argnums=(2, 3, 4))
        row["forward"] = gflop / _min_time(forward, x, w, (s, s), pad, "xla", repeats=repeats)
        for mode in ("xla",):
            row[f"input_grad_{mode}"] = gflop / _min_time(grads(mode, 0), x, w, repeats=repeats)
            row[f"kernel_grad_{mode}"] = gflop / _min_time(grads(mode, 1), x, w, repeats=repeats)
        # oneDNN's forward, and both gradients (its custom calls cannot be told apart in a trace)
        modes = ("xla", "onednn") if native.load() is None else ("xla",)
        if "onednn" in modes:
            row["forward_onednn"] = gflop / _min_time(
                forward, x, w, (s, s), pad, "onednn", repeats=repeats
            )
        for mode in modes:
            both = 2 * gflop / _min_time(grads(mode, (0, 1)), x, w, repeats=repeats)
            row[f"both_grads_{mode}"] = both
        rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def group_norm_rows(repeats: int) -> list[dict]:
    rows = []
    for hw, c in ((32, 64), (32, 128), (16, 128)):
        x = jax.random.normal(jax.random.key(0), (64, hw, hw, c))
        row = {"layer": f"GroupNorm(32) 64x{hw}x{hw}x{c}"}
        # GroupNorm then swish, as the autoencoder uses them; the native kernel fuses the two.
        mods = [
            ("flax", nn.GroupNorm(32, epsilon=1e-6), nn.swish),
            ("vq_jax", GroupNorm(32, swish=True), None),
        ]
        if native.load() is None:
            mods.append(("native", GroupNorm(32, swish=True), None))
        for label, mod, act in mods:
            setting = cpu.onednn_kernels() if label == "native" else kernels.XLA
            with kernels.installed(setting):
                row.update(_norm_times(label, mod, act, x, repeats))
        rows.append(row)
    return rows


def _norm_times(label, mod, act, x, repeats: int) -> dict:
    """Forward and forward + backward milliseconds of one GroupNorm (+ swish) module."""
    p = mod.init(jax.random.key(1), x)
    apply = (lambda p, x, m=mod, a=act: a(m.apply(p, x))) if act else mod.apply
    fwd = _jit(apply)
    bwd = _jit(jax.grad(lambda p, x, f=apply: jnp.sum(f(p, x)), argnums=(0, 1)))
    return {
        f"{label}_forward_ms": round(1e3 * _min_time(fwd, p, x, repeats=repeats), 2),
        f"{label}_fwd_bwd_ms": round(1e3 * _min_time(bwd, p, x, repeats=repeats), 2),
    }


def main(argv):
    del argv
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; GFLOP/s per pass")
    convs = conv_rows(_REPEATS.value)
    cols = [c for c in convs[0] if c not in ("layer", "gflop")]
    print(f"{'layer':46s} " + " ".join(f"{c:>19s}" for c in cols))
    for r in convs:
        print(f"{r['layer']:46s} " + " ".join(f"{r[c]:19.1f}" for c in cols), flush=True)
    norms = group_norm_rows(_REPEATS.value)
    for r in norms:
        print(json.dumps(r))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(
                {
                    "device": jax.devices()[0].device_kind,
                    "compiler_options": _options(),
                    "convs": convs,
                    "group_norm": norms,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
