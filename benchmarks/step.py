"""Times the tokenizer train step of a config: compile time, median step time, images/s, model
FLOPs (XLA cost analysis of the compiled step), achieved GFLOP/s and the fraction of a matmul
peak measured in the same run.

  python -m benchmarks.step --config=configs/vqvae.py:fashion_mnist
  python -m benchmarks.step --config=configs/vqgan.py:fashion_mnist --steps=20
  python -m benchmarks.step --config=configs/vqvae.py:taming_cpu --config.model.dtype=bfloat16

Runs on whatever devices JAX sees (set JAX_PLATFORMS=cpu to force the CPU). For configs with a
discriminator the adversarial terms are switched on from step 0, so the full G + D step is timed.
"""

import copy
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from vq_jax.cpu import native, xla_options
from vq_jax.nets import kernels

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override config.input.batch_size.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.mark_flags_as_required(["config"])


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Achieved float32 GFLOP/s of an n x n matmul: the practical peak of this device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    times = common.time_calls(jax.jit(lambda x: x @ x), a, repeats=repeats)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def model_flops(config, state, batch, key) -> float:
    """FLOPs of the step by XLA's cost analysis, with XLA's own kernels (XLA counts no FLOPs in
    custom calls; the math, and so the model FLOPs, are the same)."""
    config = copy.deepcopy(config)
    config.train.cpu_kernels = "xla"
    return flops_of(common.setup_step(config).step.lower(state, batch, key).compile())


def native_kernels() -> dict:
    """Whether this process can use the native CPU kernels, and oneDNN's ISA here."""
    if native.load() is not None:
        return {"native_kernels": False}
    return {"native_kernels": True, "onednn_isa": native.cpu_isa()}


def bench(config, num_steps: int) -> dict:
    comps, _, step, state, batch, key = common.setup_step(config)
    bs, r, _, c = batch["image"].shape
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    cpu_kernels = kernels.current().name
    compile_s = time.perf_counter() - t0
    flops = model_flops(config, state, batch, key)
    donated = [state]  # the step donates its state: each call feeds the previous call's output

    def call():
        donated[0], m = compiled(donated[0], batch, key)
        return donated[0], m

    times = common.time_calls(call, repeats=num_steps, warmup=2)
    median = statistics.median(times)
    peak = matmul_peak()
    return {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch_size": bs,
        "image_shape": [r, r, c],
        "discriminator": comps.disc is not None,
        "dtype": config.model.dtype,
        "cpu_kernels": f"{config.train.get('cpu_kernels', 'auto')} -> {cpu_kernels}",
        "compiler_options": xla_options.compiler_options(),
        **native_kernels(),
        "compile_s": round(compile_s, 2),
        "median_step_s": round(median, 4),
        "min_step_s": round(min(times), 4),
        "steps_per_s": round(1 / median, 3),
        "images_per_s": round(bs / median, 1),
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflop_s": round(flops / median / 1e9, 1),
        "matmul_peak_gflop_s": round(peak, 1),
        "fraction_of_peak": round(flops / median / 1e9 / peak, 3),
    }


def main(argv):
    del argv
    config = common.adversarial_on(_CONFIG.value)  # time the full G + D step
    if _BATCH.value:
        config.input.batch_size = _BATCH.value
    result = {"config": flags.FLAGS["config"].config_filename, **bench(config, _STEPS.value)}
    common.report(result, _JSON.value)


if __name__ == "__main__":
    app.run(main)
