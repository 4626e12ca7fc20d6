"""One VQGAN G + D train step (configs/vqgan.py:tiny, adversarial terms, R1 and LeCam on) in
float32 through the oneDNN kernels and through XLA's convolutions, and in bfloat16 through the
oneDNN mode; prints one JSON line with each step's measurements and whether its program calls
oneDNN.

Run by tests/test_onednn.py in a subprocess on one CPU device, with ONEDNN_MAX_CPU_ISA set to
imitate a smaller CPU (oneDNN reads it once, at its first use in the process).
"""

import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")  # the repo root: configs/ and benchmarks/

from benchmarks import common
from configs import vqgan


def measurements(dtype: str, mode: str) -> tuple[dict[str, float], bool]:
    config = common.adversarial_on(vqgan.get_config("tiny"))
    config.model.dtype = dtype
    config.model.conv_weight_grad = mode
    setup = common.setup_step(config)
    lowered = setup.step.lower(setup.state, setup.batch, setup.key)
    calls_onednn = "vq_jax_onednn_conv" in lowered.as_text()
    _, metrics = lowered.compile()(setup.state, setup.batch, setup.key)
    return {k: float(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}, calls_onednn


def main() -> None:
    assert jax.device_count() == 1, "run on one CPU device (XLA_FLAGS device count 1)"
    out = {}
    for dtype, mode in (("float32", "onednn"), ("float32", "xla"), ("bfloat16", "onednn")):
        metrics, calls_onednn = measurements(dtype, mode)
        out[f"{dtype}/{mode}"] = {"metrics": metrics, "calls_onednn": calls_onednn}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
