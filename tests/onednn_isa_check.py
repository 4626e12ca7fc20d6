"""One VQGAN G + D train step (configs/vqgan.py:tiny, adversarial terms, R1 and LeCam on) in
float32 and in bfloat16, each through the oneDNN mode and through XLA's convolutions; prints
one JSON line with each step's measurements and whether its program calls oneDNN on float32
and on bfloat16 operands.

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


def measurements(dtype: str, mode: str) -> tuple[dict[str, float], dict[str, bool]]:
    config = common.adversarial_on(vqgan.get_config("tiny"))
    config.model.dtype = dtype
    config.train.cpu_kernels = mode
    setup = common.setup_step(config)
    lowered = setup.step.lower(setup.state, setup.batch, setup.key)
    calls = [line for line in lowered.as_text().splitlines() if "vq_jax_onednn_conv" in line]
    # (the adaptive weight's last-layer kernel gradient is float32 in every config)
    onednn = {
        "float32": any("xf32>" in c for c in calls),
        "bfloat16": any("xbf16>" in c for c in calls),
    }
    _, metrics = lowered.compile()(setup.state, setup.batch, setup.key)
    return {k: float(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}, onednn


def main() -> None:
    assert jax.device_count() == 1, "run on one CPU device (XLA_FLAGS device count 1)"
    out = {}
    for dtype in ("float32", "bfloat16"):
        for mode in ("onednn", "xla"):
            metrics, onednn = measurements(dtype, mode)
            out[f"{dtype}/{mode}"] = {"metrics": metrics, "onednn": onednn}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
