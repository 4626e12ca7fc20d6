"""The native CPU kernels as XLA FFI custom calls: build once, load, register, call.

- ``csrc/onednn_conv.cc``: convolutions through oneDNN, the library behind PyTorch's CPU
  convolutions. XLA:CPU computes a conv's kernel gradient only after transposing its NHWC
  operands into other layouts, and a strided conv's input gradient as a slow dilated conv
  (BENCHMARKS.md section 6); oneDNN computes the forward pass and both gradients directly on
  NHWC activations and HWIO kernels.
- ``csrc/group_norm_swish.cc``: GroupNorm (+ swish), forward and backward, two sweeps each,
  parallel over the batch. XLA:CPU runs these fusions single-threaded.

Not every CPU has oneDNN kernels for every case: oneDNN 3.2 has no bfloat16 convolutions on
AVX2-only CPUs (AMD EPYC before Zen 4, most laptops). ``conv_supported`` asks oneDNN, while
tracing and before a custom call is emitted, whether it can create the three primitives of a
(dtype, shape) case here; where it cannot, ``vq_jax.cpu.conv`` computes that case with XLA's
convolution and logs one warning line. ``VQ_JAX_NATIVE=off`` turns the kernels off altogether.

This module compiles both files with the system C++ compiler against the oneDNN of the
``onednn`` extra (``pip install 'vq-jax[onednn]'``) when ``vq_jax.cpu.enable`` asks for them,
caches the shared library (keyed by the sources' contents, jaxlib, oneDNN, compiler and CPU),
and registers the handlers with JAX for the CPU platform. ``vq_jax.cpu.conv`` and
``vq_jax.cpu.group_norm`` wrap them as differentiable kernels.

Prebuild (e.g. in a Docker image): ``python scripts/build_native.py``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "onednn_conv.cc", _CSRC / "group_norm_swish.cc", _CSRC / "nearest_code.cc")
HEADERS = (_CSRC / "onednn_engine.h",)  # included by the sources; part of the cache key
_TARGETS = {  # custom-call name -> symbol in the library
    "vq_jax_onednn_conv_forward": "VqOnednnConvForward",
    "vq_jax_onednn_conv_backward_data": "VqOnednnConvBackwardData",
    "vq_jax_onednn_conv_backward_weights": "VqOnednnConvBackwardWeights",
    "vq_jax_group_norm_forward": "VqGroupNormForward",
    "vq_jax_group_norm_backward": "VqGroupNormBackward",
    "vq_jax_nearest_code": "VqNearestCode",
}
DTYPES = (jnp.float32, jnp.bfloat16)
INSTALL_HINT = (
    "install the oneDNN extra and a C++ compiler (`pip install 'vq-jax[onednn]'`, "
    "`apt-get install g++`), or use XLA's kernels: config.train.cpu_kernels='xla' "
    "(vq_jax.cpu.enable('xla'))"
)
ENV_SWITCH = "VQ_JAX_NATIVE"  # "off": never use the native kernels (XLA's ops everywhere)
# dnnl_cpu_isa_t values (oneapi/dnnl/dnnl_types.h) -> names, for messages
_ISA_NAMES = {
    0x0: "default", 0x1: "SSE4.1", 0x3: "AVX", 0x7: "AVX2", 0xF: "AVX2_VNNI",
    0x1F: "AVX2_VNNI_2", 0x27: "AVX512_CORE", 0x67: "AVX512_CORE_VNNI",
    0xE7: "AVX512_CORE_BF16", 0x1EF: "AVX512_CORE_FP16", 0xFEF: "AVX512_CORE_AMX",
    0x1FEF: "AVX512_CORE_AMX_FP16",
}  # fmt: skip


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why and what to install."""


def onednn_root() -> Path | None:
    """The prefix holding oneDNN >= 3 headers and library: $VQ_JAX_ONEDNN_ROOT, else the Python
    environment (where the pip wheels `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` put them)."""
    candidates = [os.environ.get("VQ_JAX_ONEDNN_ROOT"), sys.prefix, sys.base_prefix]
    for root in filter(None, candidates):
        version = Path(root, "include", "oneapi", "dnnl", "dnnl_version.h")
        if version.is_file() and Path(root, "lib", "libdnnl.so").exists():
            major = re.search(r"#define DNNL_VERSION_MAJOR (\d+)", version.read_text())
            if major and int(major.group(1)) >= 3:
                return Path(root)
    return None


def _compile_command(root: Path, out: Path) -> list[str]:
    cxx = os.environ.get("CXX", "g++")
    return [
        cxx, "-std=c++17", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{root / 'include'}",
        *map(str, SOURCES), f"-L{root / 'lib'}", "-ldnnl", f"-Wl,-rpath,{root / 'lib'}",
        "-o", str(out),
    ]  # fmt: skip


def _cpu_signature() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()


def library_path(root: Path) -> Path:
    """Where the built library is cached: one file per (sources, jaxlib, oneDNN, compiler, CPU);
    it is built with -march=native, so a cache shared between machines keeps one per CPU."""
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES + HEADERS))
    version = (root / "include" / "oneapi" / "dnnl" / "dnnl_version.h").read_bytes()
    digest.update(f"{jaxlib.__version__}|{root}|{os.environ.get('CXX', 'g++')}".encode())
    digest.update(version + _cpu_signature())
    cache = os.environ.get("VQ_JAX_CACHE_DIR") or Path.home() / ".cache" / "vq_jax"
    return Path(cache) / f"libvq_jax_native_{digest.hexdigest()[:16]}.so"


def build(verbose: bool = True) -> Path:
    """Compile csrc/*.cc (seconds) unless the cached library exists; its path."""
    root = onednn_root()
    if root is None:
        raise NativeUnavailable(f"oneDNN >= 3 headers and libdnnl.so not found; {INSTALL_HINT}.")
    out = library_path(root)
    if out.exists():
        return out
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler {cxx!r} for the oneDNN convs; {INSTALL_HINT}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if verbose:  # a visible line: the build takes a while and happens before any training log
        print(
            f"vq_jax: building the native CPU kernels (oneDNN convs, GroupNorm) into {out}, once "
            "per machine and version",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.time()
    # Build into a temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(_compile_command(root, Path(tmp)), capture_output=True, text=True)
        if proc.returncode:
            raise NativeUnavailable(
                f"building the native kernels failed ({' '.join(_compile_command(root, out))}):\n"
                f"{proc.stderr[-3000:]}"
            )
        os.replace(tmp, out)
        if verbose:
            print(
                f"vq_jax: built the native CPU kernels in {time.time() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def _library() -> ctypes.CDLL | str:
    """Build if needed, load and register the handlers: the library, or why that is impossible."""
    if switched_off():
        return f"the native kernels are turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    try:
        lib = ctypes.CDLL(str(build()))
    except (NativeUnavailable, OSError) as e:
        return str(e)
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    dims = ctypes.POINTER(ctypes.c_int64)
    lib.VqOnednnConvSupported.argtypes = [ctypes.c_int, *[dims] * 5, ctypes.c_char_p, ctypes.c_int]
    lib.VqOnednnConvSupported.restype = ctypes.c_int
    lib.VqOnednnCpuIsa.restype = ctypes.c_int
    search_args = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p]
    lib.VqNearestCodeSupported.argtypes = [*search_args, ctypes.c_int]
    lib.VqNearestCodeSupported.restype = ctypes.c_int
    return lib


def switched_off() -> bool:
    """Whether $VQ_JAX_NATIVE turns the native kernels off."""
    return os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "false", "no")


def load() -> str | None:
    """Build if needed, load and register: None when the kernels are usable, else why not."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def cpu_isa() -> str:
    """The instruction set oneDNN uses on this CPU (capped by $ONEDNN_MAX_CPU_ISA)."""
    require()
    isa = _library().VqOnednnCpuIsa()
    return _ISA_NAMES.get(isa, hex(isa))


@functools.cache
def conv_unsupported(
    dtype: str, x_shape: tuple, kernel_shape: tuple, strides: tuple, padding: tuple
) -> str | None:
    """None when oneDNN can run this convolution case (forward and both gradients) on this CPU,
    else oneDNN's reason. Asked once per case, before any custom call for it is emitted."""
    require()
    if dtype not in ("float32", "bfloat16"):
        return f"oneDNN convolutions here take float32 or bfloat16, not {dtype}"
    y_shape = (x_shape[0], *_out_hw(x_shape, kernel_shape, strides, padding), kernel_shape[3])
    (pt, pb), (pl, pr) = padding
    arrays = [
        np.ascontiguousarray(a, np.int64)
        for a in (x_shape, kernel_shape, y_shape, strides, (pt, pb, pl, pr))
    ]
    why = ctypes.create_string_buffer(512)
    ok = _library().VqOnednnConvSupported(
        int(dtype == "bfloat16"),
        *(a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for a in arrays),
        why,
        len(why),
    )
    return None if ok else why.value.decode(errors="replace") or "unsupported"


def available() -> bool:
    """Whether the native kernels can be used (builds them on the first call; False when
    $VQ_JAX_NATIVE is off)."""
    return load() is None


def require() -> None:
    """Raise NativeUnavailable, naming the fix, unless the native kernels can be used."""
    reason = load()
    if reason is not None:
        raise NativeUnavailable(reason)


def _attrs(strides, padding) -> dict[str, np.ndarray]:
    (pt, pb), (pl, pr) = padding
    return {
        "strides": np.asarray(strides, np.int64),
        "padding": np.asarray((pt, pb, pl, pr), np.int64),
    }


def _out_hw(x_shape, kernel_shape, strides, padding) -> tuple[int, int]:
    return tuple(
        (x_shape[1 + i] + sum(padding[i]) - kernel_shape[i]) // strides[i] + 1 for i in range(2)
    )


def _call(name: str, out_shape, dtype, *args, strides, padding) -> jax.Array:
    out = jax.ShapeDtypeStruct(tuple(out_shape), dtype)
    return jax.ffi.ffi_call(name, out)(*args, **_attrs(strides, padding))


def conv_forward(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """y = conv(x, kernel): NHWC x HWIO through oneDNN (CPU only; call `require()` first)."""
    ho, wo = _out_hw(x.shape, kernel.shape, strides, padding)
    y_shape = (x.shape[0], ho, wo, kernel.shape[3])
    return _call(
        "vq_jax_onednn_conv_forward", y_shape, x.dtype, x, kernel, strides=strides, padding=padding
    )


def conv_input_grad(dy: jax.Array, kernel: jax.Array, x_shape, strides, padding) -> jax.Array:
    """d(sum(conv(x, kernel) * dy)) / dx for x of shape `x_shape`."""
    name = "vq_jax_onednn_conv_backward_data"
    return _call(name, x_shape, dy.dtype, dy, kernel, strides=strides, padding=padding)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, padding) -> jax.Array:
    """d(sum(conv(x, kernel) * dy)) / dkernel for a kernel of shape `kernel_shape`."""
    name = "vq_jax_onednn_conv_backward_weights"
    return _call(name, kernel_shape, x.dtype, x, dy, strides=strides, padding=padding)


def group_norm_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, swish: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(out, mean [B, G], rstd [B, G]) of GroupNorm (then swish) over float32 NHWC `x`."""
    b = x.shape[0]
    stats = jax.ShapeDtypeStruct((b, num_groups), jnp.float32)
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
    return jax.ffi.ffi_call("vq_jax_group_norm_forward", outs)(
        x, scale, bias, num_groups=np.int32(num_groups), epsilon=np.float32(epsilon), swish=swish
    )


def group_norm_backward(
    x, scale, bias, mean, rstd, dout, num_groups: int, swish: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dscale, dbias) of sum(group_norm_forward(x, scale, bias)[0] * dout)."""
    outs = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, scale, bias))
    return jax.ffi.ffi_call("vq_jax_group_norm_backward", outs)(
        x, scale, bias, mean, rstd, dout, num_groups=np.int32(num_groups), swish=swish
    )


# dnnl_cpu_isa_t bits of AVX512_CORE_BF16: ISAs that include them (AVX512-BF16, AMX) compute
# bfloat16 dot products in hardware, 2-3x float32's rate.
_BF16_ISA_BITS = 0xE7
SEARCH_ROWS, SEARCH_BLOCK, SEARCH_MAX_CANDIDATES = 256, 2048, 256


def bf16_dot_hardware() -> bool:
    """Whether oneDNN computes bfloat16 dot products in hardware here (AVX512-BF16 or AMX)."""
    require()
    return _library().VqOnednnCpuIsa() & _BF16_ISA_BITS == _BF16_ISA_BITS


@functools.cache
def nearest_code_unsupported(
    d: int, screen_bits: int = 16, rows: int = SEARCH_ROWS, block: int = SEARCH_BLOCK
) -> str | None:
    """None when oneDNN has the screening matmul (bfloat16: 16, float32: 32) for D = `d` on this
    CPU, else its reason. oneDNN 3.2 has no bfloat16 matmul on AVX2-only CPUs."""
    require()
    why = ctypes.create_string_buffer(512)
    ok = _library().VqNearestCodeSupported(rows, block, d, screen_bits, why, len(why))
    return None if ok else why.value.decode(errors="replace") or "unsupported"


def nearest_code(
    x: jax.Array,
    codes: jax.Array,
    screen_bits: int = 16,
    rows: int = SEARCH_ROWS,
    block: int = SEARCH_BLOCK,
    max_candidates: int = SEARCH_MAX_CANDIDATES,
) -> tuple[jax.Array, jax.Array]:
    """(indices [N] int32, stats [2] int32): the exact nearest code (squared L2, ties to the
    lowest index) of each row of x [N, D] in codes [K, D], screened by a bfloat16 (16) or float32
    (32) matmul and rescored in float64 (csrc/nearest_code.cc; CPU only). stats: rows searched
    exhaustively (more than `max_candidates` candidates), most candidates of one row."""
    outs = (
        jax.ShapeDtypeStruct((x.shape[0],), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    call = jax.ffi.ffi_call("vq_jax_nearest_code", outs, vmap_method="sequential")
    return call(
        x.astype(jnp.float32),
        codes.astype(jnp.float32),
        rows=np.int64(rows),
        block=np.int64(min(block, codes.shape[0])),
        max_candidates=np.int64(max_candidates),
        screen_bits=np.int64(screen_bits),
    )
