"""The optional CPU kernel layer: ``enable(mode)`` builds, loads and installs the native kernels.

The networks compute with XLA's ops unless ``enable`` installs others into
``vq_jax.nets.kernels`` (the runtime setting they read while tracing):

- "xla": XLA's conv and the networks' XLA GroupNorm formulation.
- "onednn": oneDNN convolutions (``conv``), the fused GroupNorm + swish kernel
  (``group_norm``) and the screened nearest-code search for codebooks above
  ``quantizers.CPU_SEARCH_ABOVE`` codes (``search``), all XLA FFI custom calls built from
  ``csrc/`` by ``native``; raises
  ``native.NativeUnavailable`` naming the fix when they cannot be built here.
- "auto": "onednn" where one CPU device runs the programs and the kernels build, else "xla"
  (a custom call has no sharding rule: on several devices XLA would gather its operands). A
  failed build is a visible warning naming the fix, and XLA's kernels.

Building happens here and only here (g++, seconds, once per machine: the library is cached),
never while tracing, in ``model.init`` or in ``Tokenizer.encode``. The trainer calls
``enable(config.train.cpu_kernels)`` before it traces anything, sample.py and
``vq_jax.evaluate`` call ``enable("auto")``; ``vq_jax.load`` leaves the setting as it is (no
build, no output when loading a tokenizer), so a library user opts in with
``vq_jax.cpu.enable()``. The setting never changes parameters, shapes or code indices: only
the order of the float additions. ``xla_options`` holds the XLA compiler options the programs
compile with.
"""

from __future__ import annotations

import sys
import warnings

import jax

from vq_jax.cpu import native
from vq_jax.nets import kernels

MODES = ("auto", "onednn", "xla")


class NativeKernelWarning(UserWarning):
    """The native CPU kernels could not be built or loaded; XLA's kernels are used."""


def onednn_kernels() -> kernels.Kernels:
    """The native kernels as a ``vq_jax.nets.kernels.Kernels`` (the library must be loaded)."""
    from vq_jax.cpu import conv, group_norm, search  # import cost only for those who use them

    return kernels.Kernels(
        "onednn", conv.conv_general_dilated, group_norm.group_norm, search.nearest_code
    )


def check_mode(mode: str, field: str = "mode") -> None:
    """Raise ValueError naming `field`, the value and the valid values unless `mode` is one."""
    if mode not in MODES:
        raise ValueError(f"{field}={mode!r} is not a CPU kernel mode; valid: {', '.join(MODES)}")


def enable(mode: str = "auto") -> str:
    """Install the kernels `mode` asks for (see the module docstring) for every program traced
    from now on; builds the native library first if needed (one log line). Returns the mode in
    force: "onednn" or "xla"."""
    check_mode(mode)
    chosen = "xla"
    if mode == "onednn":
        native.require()  # raises NativeUnavailable, naming the fix
        chosen = "onednn"
    elif mode == "auto":
        devices = jax.devices()
        if len(devices) == 1 and devices[0].platform == "cpu":
            reason = native.load()
            if reason is None:
                chosen = "onednn"
            elif not native.switched_off():
                warnings.warn(
                    f"vq_jax: the native CPU kernels are unavailable, using XLA's (slower): "
                    f"{reason}",
                    NativeKernelWarning,
                    stacklevel=2,
                )
    kernels.install(onednn_kernels() if chosen == "onednn" else kernels.XLA)
    detail = f" (oneDNN ISA {native.cpu_isa()})" if chosen == "onednn" else ""
    print(f"vq_jax: CPU kernels {mode!r}: {chosen}{detail}", file=sys.stderr, flush=True)
    return chosen
