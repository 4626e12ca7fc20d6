"""Side-by-side CPU step time: vq-jax's VQ-VAE step against taming-transformers' PyTorch modules.

  python -m benchmarks.vs_taming --taming_path=/path/to/taming-transformers

Both sides train the same shapes (configs/vqvae.py:taming_cpu): 32x32x1 inputs, batch 64,
ch 64, ch_mult (1, 2, 2), 2 res blocks, attention at 8x8, z 64, 512 codes, one Adam step of
L1 + VQ loss, float32. The PyTorch side imports taming's own Encoder, Decoder and
VectorQuantizer2 from a local checkout (never part of this repo) with 1x1 quant/post-quant convs,
as taming's VQModel has. Each side runs in its own subprocess, alternately for --rounds rounds,
so that both see the same machine state; the result is the median over rounds of each side's
median step time. torch needs `pip install torch` (the `torch` extra).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_TAMING = flags.DEFINE_string("taming_path", None, "Local taming-transformers checkout.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (one subprocess per side each).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round, after 2 warm-up steps.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads (XLA uses every core).")
_SIDE = flags.DEFINE_enum("side", None, ["torch"], "Internal: run the taming side and exit.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_CONFIG = "configs/vqvae.py:taming_cpu"


def _taming_step(taming_path: str, steps: int, threads: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, taming_path)
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    arch = dict(
        ch=64,
        out_ch=1,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=[8],
        dropout=0.0,
        in_channels=1,
        resolution=32,
        z_channels=64,
        double_z=False,
    )
    modules = [
        Encoder(**arch),
        torch.nn.Conv2d(64, 64, 1),
        VectorQuantizer2(512, 64, beta=0.25),
        torch.nn.Conv2d(64, 64, 1),
        Decoder(**arch),
    ]
    enc, quant_conv, quantize, post_quant_conv, dec = modules
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)
    x = torch.rand(64, 1, 32, 32) * 2 - 1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z_q, vq_loss, _ = quantize(quant_conv(enc(x)))
        loss = (x - dec(post_quant_conv(z_q))).abs().mean() + vq_loss
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "median_step_s": statistics.median(times),
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _run_side(side: str) -> dict:
    """One round of one side in a fresh subprocess; the jax side is benchmarks.step itself."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "result.json")
        if side == "jax":
            cmd = ["-m", "benchmarks.step", f"--config={_CONFIG}", f"--json={out_json}"]
        else:
            cmd = ["-m", "benchmarks.vs_taming", "--side=torch", f"--json={out_json}"]
            cmd += [f"--taming_path={_TAMING.value}", f"--threads={_THREADS.value}"]
        cmd.append(f"--steps={_STEPS.value}")
        proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the {side} side failed:\n{proc.stderr[-3000:]}")
        with open(out_json) as f:
            return json.load(f)


def main(argv):
    del argv
    if _SIDE.value == "torch":
        with open(_JSON.value, "w") as f:
            json.dump(_taming_step(_TAMING.value, _STEPS.value, _THREADS.value), f)
        return
    if not _TAMING.value or not os.path.isdir(os.path.join(_TAMING.value, "taming")):
        raise app.UsageError(
            "--taming_path must point at a taming-transformers checkout (the folder holding "
            "taming/); clone https://github.com/CompVis/taming-transformers outside this repo."
        )
    rounds = {"torch": [], "jax": []}
    for r in range(_ROUNDS.value):
        for side in ("torch", "jax"):
            res = _run_side(side)
            rounds[side].append(res)
            print(f"round {r + 1} {side}: {res['median_step_s']:.3f} s/step", flush=True)
    t_torch = statistics.median(r["median_step_s"] for r in rounds["torch"])
    t_jax = statistics.median(r["median_step_s"] for r in rounds["jax"])
    jax_last, torch_last = rounds["jax"][-1], rounds["torch"][-1]
    peak = statistics.median(r["matmul_peak_gflop_s"] for r in rounds["jax"])
    result = {
        "config": _CONFIG,
        "taming_step_s": round(t_torch, 3),
        "vq_jax_step_s": round(t_jax, 3),
        "ratio_vq_jax_over_taming": round(t_jax / t_torch, 3),
        "taming_gflop_per_step_torch_counter": round(torch_last["gflop_per_step"], 1),
        "vq_jax_gflop_per_step_xla": jax_last["gflop_per_step"],
        "taming_gflop_s": round(torch_last["gflop_per_step"] / t_torch, 1),
        "vq_jax_gflop_s": round(jax_last["gflop_per_step"] / t_jax, 1),
        "matmul_peak_gflop_s": peak,
        "vq_jax_fraction_of_peak": round(jax_last["gflop_per_step"] / t_jax / peak, 3),
        "torch": torch_last["torch"],
        "torch_threads": torch_last["threads"],
        "device": jax_last["device"],
        "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
