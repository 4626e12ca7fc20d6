"""Reliability: exact resume after SIGKILL, SIGTERM preemption, corrupt checkpoints, NaN guard,
restores across device counts, and clear errors for bad input."""

import glob
import logging
import os
import signal
import subprocess
import sys
import time

import chex
import faults
import jax
import numpy as np
import pytest
from subproc import ROOT, run_script, script_env, train_args

import vq_jax
from configs import vqgan, vqvae
from vq_jax import checkpoints, loop, trainer
from vq_jax import state as state_lib
from vq_jax.tasks import tokenizer as tokenizer_task

LONG = [  # tiny config, long enough to interrupt
    "--config.train.steps=60",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=10",
    "--config.train.eval_every=1000",
]


def _committed_steps(workdir):
    """Finalized checkpoint steps (orbax renames a step's directory only once it is complete)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]


def _start_and_signal(cmd, sig, after_line, workdir):
    """Starts `cmd`; once stdout shows `after_line` and a checkpoint is committed, sends `sig`.
    Returns (returncode, stdout)."""
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(after_line):
                deadline = time.time() + 60
                while not _committed_steps(workdir) and time.time() < deadline:
                    time.sleep(0.01)
                proc.send_signal(sig)
                break
        out.append(proc.stdout.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out)


def _params(workdir):
    _, _, params, _, step = vq_jax.api.restore_params(workdir, use_ema=False)
    return step, jax.device_get(params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same 60-step VQGAN run without interruption."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    run_script(*train_args("vqgan", workdir, *LONG))
    return _params(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_run_resumes_bit_identically(tmp_path, uninterrupted, sig):
    """VQGAN (D, both optimizers, loss state, data position): kill, restart, same params."""
    workdir = str(tmp_path / "w")
    rc, out = _start_and_signal(train_args("vqgan", workdir, *LONG), sig, "step 20/60", workdir)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, out[-2000:]
    else:
        assert rc == 0, out[-2000:]
        assert "preempted: saved checkpoint at step" in out
        saved = int(out.split("preempted: saved checkpoint at step ")[1].split(";")[0])
        assert 20 <= saved < 60
        assert saved in checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")).steps()
    proc = run_script(*train_args("vqgan", workdir, *LONG))
    assert "resumed from checkpoint step" in proc.stdout
    step, params = _params(workdir)
    assert step == uninterrupted[0] == 60
    chex.assert_trees_all_equal(params, uninterrupted[1])


def test_restore_across_device_counts(tmp_path):
    """2 steps on 1 device, 2 more on 4 devices, 2 more on 1 device: all restores work."""
    workdir = str(tmp_path / "w")
    for devices, steps in ((1, 2), (4, 4), (1, 6)):
        run_script(*train_args("vqvae", workdir, f"--config.train.steps={steps}"), devices=devices)
    assert _params(workdir)[0] == 6


def _tiny(**train):
    config = vqvae.get_config("tiny")
    config.train.update(train)
    return config


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    trainer.train(_tiny(), workdir)  # checkpoints at steps 2 and 4
    ckpt_dir = os.path.join(workdir, "checkpoints")
    files = [
        f
        for f in glob.glob(os.path.join(ckpt_dir, "4", "state", "**", "*"), recursive=True)
        if os.path.isfile(f) and os.path.getsize(f) > 100
    ]
    assert files
    for f in files:  # truncate the newest step's array data
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)
    ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
    config = _tiny()
    comps = state_lib.build(config)
    abstract = checkpoints.abstract_like(
        jax.eval_shape(lambda k: state_lib.init_state(comps, k, ema=False), jax.random.key(0)),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    with pytest.raises(checkpoints.CheckpointError, match=r"step 4 .* cannot be restored"):
        ckpt.restore_latest(abstract, fallback=False)
    with caplog.at_level(logging.WARNING):
        step, *_ = ckpt.restore_latest(abstract)
    assert step == 2
    assert "Checkpoint step 4" in caplog.text and "Falling back to the previous" in caplog.text
    assert ckpt.steps() == [2]  # the broken step is set aside, not deleted
    assert os.listdir(ckpt_dir + "_corrupt")[0].startswith("4.")
    ckpt.close()
    # The trainer resumes from step 2 and finishes.
    config.train.steps = 6
    trainer.train(config, workdir)
    assert _params(workdir)[0] == 6


def test_injected_nan_stops_with_step_and_writes_no_nan_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    config = _tiny(steps=6, checkpoint_every=2, log_every=3)
    faults.poison_batch(monkeypatch, 2)
    with pytest.raises(loop.NonFiniteError, match=r"at step 2 .*Last good checkpoint: 2"):
        trainer.train(config, workdir)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert ckpt.steps() == [2]
    ckpt.close()
    _, params = _params(workdir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_skip_nonfinite_steps_counts_and_continues(tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    config = _tiny(steps=4, log_every=4, skip_nonfinite_steps=True)
    faults.poison_batch(monkeypatch, 1)
    trainer.train(config, workdir)
    import json

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_row = [r for r in rows if "train/skipped" in r][-1]
    assert train_row["train/skipped"] == 1.0 and np.isfinite(train_row["train/loss"])


# --- bad input: a clear error before compiling ---------------------------------------------


def _raises(config, match, workdir):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        trainer.train(config, str(workdir))


def test_unknown_config_key_is_rejected(tmp_path):
    proc = run_script(*train_args("vqvae", tmp_path, "--config.train.stepz=3"), check=False)
    assert proc.returncode == 2
    assert "invalid config override" in proc.stderr and 'Did you mean "steps"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resolution_not_divisible(tmp_path):
    config = _tiny()
    config.input.resolution = 17
    _raises(config, r"resolution=17 is not divisible by the downsampling factor 2", tmp_path)


def test_channels_mismatch(tmp_path):
    config = _tiny()
    config.input.update(dataset="fashion_mnist", channels=3, resize="pad", resolution=32)
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("dataset-fashion-mnist not installed")
    _raises(config, r"channel", tmp_path)


def test_missing_fashion_mnist(tmp_path):
    config = _tiny()
    config.input.update(dataset="fashion_mnist", data_dir=str(tmp_path / "nothing"))
    _raises(config, r"dataset-fashion-mnist", tmp_path / "w")


def test_missing_and_empty_folder(tmp_path):
    config = _tiny()
    config.input.dataset = f"folder:{tmp_path / 'missing'}"
    _raises(config, r"missing", tmp_path / "w")
    (tmp_path / "empty").mkdir()
    config.input.dataset = f"folder:{tmp_path / 'empty'}"
    _raises(config, r"(?i)no .*images|empty", tmp_path / "w")


def test_batch_not_divisible_by_devices(tmp_path):
    config = _tiny()
    config.input.batch_size = 6
    _raises(config, r"batch_size=6 is not divisible by the 4 devices", tmp_path)


def test_codebook_too_small(tmp_path):
    config = _tiny()
    config.quantizer.codebook_size = 1
    _raises(config, r"codebook_size=1", tmp_path)


def test_fsq_levels_invalid(tmp_path):
    config = _tiny()
    config.quantizer.kind = "fsq"
    config.quantizer.fsq.levels = (8, 1)
    _raises(config, r"levels", tmp_path)


def test_workdir_of_another_model_config_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    trainer.train(_tiny(steps=2), workdir)
    config = _tiny(steps=4)
    config.model.ch = 16
    _raises(config, r"different model config \(model.ch: 8 -> 16\)", workdir)
    config = _tiny(steps=4)
    config.quantizer.ema.beta = 0.5  # same shapes: resumable when explicitly allowed
    _raises(config, r"quantizer.ema.beta: 0.25 -> 0.5", workdir)
    config.train.allow_config_change = True
    trainer.train(config, workdir)
    assert _params(workdir)[0] == 4


def test_gan_config_overrides_are_independent():
    """disc_train_start is not tied to disc_start once set (an ml_collections pitfall)."""
    config = vqgan.get_config("tiny")
    config.loss.disc_start = 7
    assert tokenizer_task.loss_settings(config).disc_train_start == 7
    config.loss.disc_train_start = 2
    s = tokenizer_task.loss_settings(config)
    assert (s.disc_start, s.disc_train_start) == (7, 2)


def test_decode_tokens_of_wrong_grid(tmp_path):
    workdir = str(tmp_path / "w")
    trainer.train(_tiny(steps=2), workdir)
    tok = vq_jax.load(workdir)
    with pytest.raises(ValueError, match=r"decodes \[N, 8, 8\] grids"):
        tok.decode(np.zeros((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match=r"token values must lie in \[0, 32\)"):
        tok.decode(np.full((1, 8, 8), 40, np.int32))
