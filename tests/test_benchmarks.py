"""The benchmark scripts run end to end on tiny settings and report what BENCHMARKS.md quotes.

These check the scripts work and their reports are complete and consistent, not speed.
"""

import json
import os

import pytest
from subproc import run_script

from vq_jax.cpu import native
from vq_jax.nets import quantizers


def _report(tmp_path, *args: str) -> dict:
    out = os.path.join(tmp_path, "r.json")
    run_script("-m", *args, f"--json={out}", devices=1)
    with open(out) as f:
        return json.load(f)


def test_step_benchmark_reports_flops_and_peak(tmp_path):
    r = _report(
        tmp_path,
        "benchmarks.step",
        "--config=configs/vqgan.py:tiny",
        "--config.train.cpu_kernels=xla",  # a real G + D step through XLA's conv VJPs
        "--steps=2",
    )
    assert r["discriminator"] and r["cpu_kernels"] == "xla -> xla"
    assert r["gflop_per_step"] > 0 and r["matmul_peak_gflop_s"] > 0
    assert r["min_step_s"] <= r["median_step_s"]
    assert (
        abs(r["achieved_gflop_s"] - r["gflop_per_step"] / r["median_step_s"])
        < 0.1 + 0.01 * (r["achieved_gflop_s"])
    )


def test_quantizer_benchmark_rows(tmp_path):
    r = _report(
        tmp_path,
        "benchmarks.quantizer",
        "--tokens=256",
        "--sizes=64,1024",
        "--dims=8,32",
        "--repeats=1",
    )
    assert [(row["codebook_size"], row["dim"]) for row in r["rows"]] == [
        (64, 8),
        (64, 32),
        (1024, 8),
        (1024, 32),
    ]
    for row in r["rows"]:
        assert row["tokenize_tokens_per_s"] > 0 and row["train_tokens_per_s"] > 0
        assert row["scratch_mib"] < row["nkd_tensor_mib"] or row["nkd_tensor_mib"] < 1


def test_quantizer_benchmark_native_search(tmp_path):
    """--search=native: the screened search's row, beside the blocked one, above the threshold."""
    if not native.available():
        pytest.skip("oneDNN extra not installed (pip install '.[onednn]')")
    k = quantizers.CPU_SEARCH_ABOVE + 1
    r = _report(
        tmp_path, "benchmarks.quantizer", "--tokens=256", f"--sizes={k}", "--dims=32",
        "--repeats=1", "--search=blocked,native",
    )  # fmt: skip
    assert [row["search"] for row in r["rows"]] == ["blocked", "native"]
    assert r["rows"][1]["screen_bits"] in (16, 32) and r["rows"][1]["tokenize_tokens_per_s"] > 0


def test_quantizer_benchmark_kinds(tmp_path):
    """--kinds: each registered kind (rvqN = depth N) at K; fsq / lfq set their own D."""
    r = _report(
        tmp_path,
        "benchmarks.quantizer",
        "--tokens=128",
        "--sizes=512",
        "--dims=16",
        "--repeats=1",
        "--kinds=ema,fsq,lfq,rvq2",
    )
    got = [(row["kind"], row["codebook_size"], row["dim"]) for row in r["rows"]]
    assert got == [("ema", 512, 16), ("fsq", 512, 3), ("lfq", 512, 9), ("rvq2", 512, 16)]
    assert all(row["train_tokens_per_s"] > 0 for row in r["rows"])


def test_input_pipeline_benchmark(tmp_path):
    r = _report(
        tmp_path,
        "benchmarks.input_pipeline",
        "--config=configs/vqvae.py:tiny",
        "--batches=4",
        "--steps=1",
    )
    assert r["pipeline_images_per_s"] > 0 and r["step_images_per_s"] > 0
    assert 0 <= r["data_wait_share"] <= 1


def test_vs_taming_needs_a_checkout(tmp_path):
    proc = run_script(
        "-m", "benchmarks.vs_taming", f"--taming_path={tmp_path}", check=False, devices=1
    )
    assert proc.returncode != 0
    assert "taming-transformers checkout" in proc.stderr


@pytest.mark.slow
def test_preemption_benchmark_reports_the_exit(tmp_path):
    r = _report(
        tmp_path,
        "benchmarks.preemption",
        "--config=configs/vqvae.py:tiny",
        "--signal=SIGINT",
        f"--workdir={tmp_path / 'w'}",
        "--override=--config.train.steps=100000",
        "--override=--config.train.log_every=5",
        "--override=--config.train.eval_every=100000",
        "--override=--config.train.checkpoint_every=100000",
    )
    assert r["exit_status"] == 0 and r["signal"] == "SIGINT"
    assert r["saved_step"] >= 10 and 0 < r["seconds_to_exit"] < 60
    assert str(r["saved_step"]) in os.listdir(tmp_path / "w" / "checkpoints")


def test_compare_quantizers_script(tmp_path):
    """scripts/compare_quantizers.sh trains and evaluates each (kind, K) once (here one: residual
    VQ of depth 2), then reports them all; a second call reuses the finished runs."""
    import subprocess
    import sys

    from subproc import ROOT, script_env

    env = dict(
        script_env(1),
        CONFIG="configs/vqvae.py:tiny",
        EVAL_FLAGS="--nofid --nolpips",
        PYTHON=sys.executable,
    )
    cmd = ["bash", "scripts/compare_quantizers.sh", str(tmp_path), "2", "64", "rvq2", "8"]

    def run():
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    first = run()
    assert first.count("== train") == 1
    with open(tmp_path / "evals" / "rvq2-64.json") as f:
        assert json.load(f)["num_images"] == 8
    table = (tmp_path / "report.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| rvq2-64 | 2 |") and "(stages " in table[2]
    assert "== train" not in run()  # finished runs are kept
    bad = subprocess.run(
        [*cmd[:3], "2", "100", "fsq", "8"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no FSQ levels for K=100" in bad.stderr
