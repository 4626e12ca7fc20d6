"""Issue 20: fast preemption, validated API inputs, read-only loads, one-line errors, progress.

Each test reproduces one scenario a new user met; the RELIABILITY.md rows point here.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import faults
import numpy as np
import pytest
from subproc import ROOT, run_script, script_env, start_lock_holder, train_args

import vq_jax
from configs import prior as prior_configs
from configs import vqvae
from vq_jax import api, data, errors, loop, metrics, trainer, validate
from vq_jax.workdir_lock import WorkdirLock

LONG = [  # tiny config, far more steps than the test waits for
    "--config.train.steps=100000",
    "--config.train.checkpoint_every=100000",
    "--config.train.log_every=10",
    "--config.train.eval_every=100000",
]


def _tiny(**train):
    config = vqvae.get_config("tiny")
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def tok_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tok"))
    trainer.train(_tiny(), workdir)  # checkpoints at steps 2 and 4
    return workdir


# --- preemption ---------------------------------------------------------------------------


def _signal_after_progress(sig, workdir, *, twice=False):
    """Starts a long tiny run; at its second progress line sends `sig` (twice: back to back).
    Returns (returncode, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen(
        [sys.executable, *train_args("vqvae", workdir, *LONG)],
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, seen = [], 0
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step "):
                seen += 1
                if seen == 2:
                    t0 = time.time()
                    proc.send_signal(sig)
                    if twice:
                        proc.send_signal(sig)
                    break
        out.append(proc.stdout.read())
        proc.wait(timeout=120)
        latency = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out), latency


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_saves_the_current_step_and_exits_fast(tmp_path, sig):
    """Ctrl-C and SIGTERM: the step reached is saved, exit 0, within seconds (the loop keeps at
    most 2 steps in flight, so it does not first finish a deep queue of dispatched steps)."""
    workdir = str(tmp_path / "w")
    rc, out, latency = _signal_after_progress(sig, workdir)
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    saved = int(out.split("preempted: saved checkpoint at step ")[1].split(";")[0])
    last_logged = max(int(x.split()[1].split("/")[0]) for x in out.splitlines() if x[:5] == "step ")
    assert last_logged <= saved <= last_logged + 10 + loop.MAX_IN_FLIGHT, out[-2000:]
    assert str(saved) in os.listdir(os.path.join(workdir, "checkpoints"))
    assert latency < 30, f"{latency:.1f} s from the signal to the exit"  # generous on a busy CPU


def test_second_ctrl_c_exits_at_once():
    """The first Ctrl-C asks for a save; the second leaves at once with status 130."""
    code = (
        "import os, signal, time\n"
        "from vq_jax.loop import Preemption\n"
        "p = Preemption()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert p.requested\n"
        "print('first handled', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running', flush=True)\n"
    )
    t0 = time.time()
    proc = run_script("-c", code, check=False, timeout=60)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "first handled" in proc.stdout and "still running" not in proc.stdout
    assert "exiting now without saving" in proc.stderr
    assert time.time() - t0 < 25


def test_preemption_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    p = loop.Preemption()
    assert signal.getsignal(signal.SIGINT) == p._handle
    p.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_trainer_starts_after_the_lock_holder_was_killed(tmp_path):
    """A stale lock (its holder SIGKILLed) does not stop the next run."""
    workdir = str(tmp_path / "w")
    proc = start_lock_holder(workdir)
    try:
        with pytest.raises(errors.UserError, match=rf"pid {proc.pid} on"):
            trainer.train(_tiny(steps=2), workdir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(os.path.join(workdir, ".lock.process_0"))  # the file stays: harmless
    trainer.train(_tiny(steps=2), workdir)
    assert "2" in os.listdir(os.path.join(workdir, "checkpoints"))
    with WorkdirLock(workdir):  # and the finished run released it
        pass


# --- Tokenizer.encode: dtype policy --------------------------------------------------------


def test_encode_float_needs_its_range_and_agrees_with_uint8(tok_workdir):
    tok = vq_jax.load(tok_workdir)
    u8 = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    want = tok.encode(u8)
    x = u8.astype(np.float64)
    for value_range, scaled in (((0, 255), x), ((0, 1), x / 255), ((-1, 1), x / 127.5 - 1)):
        np.testing.assert_array_equal(tok.encode(scaled, value_range=value_range), want)
    for bad, match in (
        (x, r"float images need their range stated: value_range=None"),
        (x, r"images span \[0, 255\] but value_range=\(-1, 1\)"),
        (u8.astype(np.int64), r"dtype int64; pass uint8 pixels .*astype\(np.uint8\)"),
        (u8.tolist(), r"images is a list; pass an array"),
        (np.zeros((0, 16, 16, 1), np.uint8), r"empty batch"),
        (np.zeros((2, 16, 16, 3), np.uint8), r"this tokenizer takes \(16, 16, 1\)"),
        (np.zeros((16, 16), np.uint8), r"this tokenizer takes"),
    ):
        with pytest.raises(errors.UserError, match=match):
            kw = {"value_range": (-1, 1)} if "but value_range" in match else {}
            tok.encode(bad, **kw)
    nan = np.zeros((1, 16, 16, 1), np.float32)
    nan[0, 3, 3] = np.nan
    with pytest.raises(errors.UserError, match=r"1 NaN/Inf values"):
        tok.encode(nan, value_range=(-1, 1))
    with pytest.raises(errors.UserError, match=r"drop value_range"):
        tok.encode(u8, value_range=(-1, 1))


# --- read-only paths never write -----------------------------------------------------------


def _tree(path):
    return {
        os.path.relpath(os.path.join(d, f), path): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, dirs, files in os.walk(path)
        for f in files + dirs
    }


def test_loading_skips_a_damaged_step_and_writes_nothing(tok_workdir, tmp_path):
    workdir = str(tmp_path / "w")
    import shutil

    shutil.copytree(tok_workdir, workdir)
    files = [
        f
        for f in glob.glob(
            os.path.join(workdir, "checkpoints", "4", "state", "**", "*"), recursive=True
        )
        if os.path.isfile(f) and os.path.getsize(f) > 100
    ]
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)
    before = _tree(workdir)
    tok = vq_jax.load(workdir)
    assert tok.step == 2
    proc = run_script("sample.py", f"--workdir={workdir}", "--num=4", f"--out={tmp_path / 'r.npz'}")
    assert "Falling back to the previous checkpoint" in proc.stderr
    assert len(proc.stderr.splitlines()) < 40, proc.stderr[-3000:]  # not thousands of lines
    assert _tree(workdir) == before  # same files, same mtimes: nothing moved or written
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


# --- validation before work ----------------------------------------------------------------


def test_unlabeled_data_refuses_a_class_conditional_prior(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    config = _tiny(steps=2)
    config.input.dataset = f"folder:{folder}"
    trainer.train(config, str(tmp_path / "tok"))
    prior = prior_configs.get_config("tiny")
    prior.tokenizer_workdir = str(tmp_path / "tok")
    assert prior.prior.num_classes == 10
    with pytest.raises(
        errors.UserError,
        match=r"num_classes=10 asks for a class-conditional .* "
        r"have no label; set --config.prior.num_classes=0",
    ):
        trainer.train(prior, str(tmp_path / "prior"))
    assert not os.path.exists(tmp_path / "prior" / "checkpoints")


def test_mixed_image_sizes_under_resize_none_name_the_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        size = 20 if i == 7 else 16
        Image.fromarray(np.zeros((size, size), np.uint8)).save(folder / f"{i:02d}.png")
    source = data.make_source(f"folder:{folder}", "train")
    odd = [p for p, hw in zip(source.paths, source.sizes, strict=True) if hw != (16, 16)]
    assert odd == [str(folder / "07.png")] or not odd  # the holdout may hold it
    config = _tiny(steps=2)
    config.input.dataset = f"folder:{folder}"
    config.input.train_split = config.input.eval_split = "train"
    if not odd:
        pytest.skip("the hash-based holdout took the odd file")
    t0 = time.time()
    with pytest.raises(errors.UserError, match=r"1 of \d+ images are not 16x16.*07.png \(20x20\)"):
        trainer.train(config, str(tmp_path / "w"))
    assert time.time() - t0 < 20


def test_tuple_field_given_a_scalar_is_refused():
    config = vqvae.get_config("tiny")
    validate.check_overrides(config, ["--config.model.ch_mult=(1,2)", "--config.seed=3"])
    with pytest.raises(
        errors.UserError,
        match=r"--config.model.ch_mult=2 gives one value .*"
        r"--config.model.ch_mult='\(2,\)'",
    ):
        validate.check_overrides(config, ["--config.model.ch_mult=2"])
    config.model.ch_mult = ()
    with pytest.raises(errors.UserError, match=r"config.model.ch_mult=\(\) is out of range"):
        validate.check(config)


def test_train_py_refuses_scalar_tuple_override_and_names_missing_workdir(tmp_path):
    proc = run_script(
        *train_args("vqvae", str(tmp_path / "w"), "--config.model.ch_mult=2"), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--config.model.ch_mult='(2,)'" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "w")
    proc = run_script("train.py", "--config=configs/vqvae.py:tiny", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: --workdir is required") and "config override" not in last


@pytest.mark.parametrize(
    "field,value", [("train.steps", 0), ("train.steps", -5), ("input.batch_size", 0)]
)
def test_steps_and_batch_size_refused_before_set_up(tmp_path, field, value):
    proc = run_script(
        *train_args("vqvae", str(tmp_path / "w"), f"--config.{field}={value}"), check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config.{field}={value} is out of range" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_sampling_parameters_are_checked_by_the_library():
    for kw, match in (
        (dict(temperature=0.0), r"temperature=0.0 is out of range; valid: > 0"),
        (dict(top_p=1.5), r"top_p=1.5 is out of range"),
        (dict(top_p=0.0), r"top_p=0.0 is out of range"),
        (dict(top_k=-1), r"top_k=-1 is out of range"),
        (dict(cfg_scale=-2.0), r"cfg_scale=-2.0 is out of range"),
    ):
        sampling = prior_configs.get_config("tiny").sampling
        sampling.update(kw)
        with pytest.raises(errors.UserError, match=match):
            validate.check_sampling(sampling)
    validate.check_sampling(prior_configs.get_config("tiny").sampling)
    for num in (0, -3, 2.5):
        with pytest.raises(errors.UserError, match=rf"num={num}: the number of images"):
            api.check_num(num)


# --- one-line errors -----------------------------------------------------------------------


def test_verbosity_1_shows_the_traceback(tmp_path):
    args = train_args("vqvae", str(tmp_path / "w"), "--config.input.resolution=17")
    quiet = run_script(*args, check=False)
    loud = run_script(*args, "--verbosity=1", check=False)
    assert "Traceback" not in quiet.stderr and quiet.returncode == 2
    assert "Traceback" in loud.stderr and "resolution=17 is not divisible" in loud.stderr


def test_sample_py_text_file_as_tokens(tok_workdir, tmp_path):
    text = tmp_path / "tokens.txt"
    text.write_text("1 2 3\n")
    proc = run_script(
        "sample.py",
        f"--workdir={tok_workdir}",
        "--mode=decode",
        f"--tokens={text}",
        f"--out={tmp_path / 'd.npz'}",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last == f"sample.py: --tokens={text} is not an .npz file; pass an .npz written by "
        "sample.py --mode=encode (or generate / inpaint)."
    )


def test_evaluate_reports_user_errors_in_one_line(tmp_path):
    proc = run_script("-m", "vq_jax.evaluate", f"--workdir={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("evaluate: No checkpoints in")


def test_resume_with_changed_shapes_does_not_call_the_steps_damaged(tok_workdir, tmp_path):
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(tok_workdir, workdir)
    config = _tiny(steps=6, allow_config_change=True)
    config.model.ch = 16
    config.model.num_groups = 4
    with pytest.raises(errors.UserError) as e:
        trainer.train(config, workdir)
    assert "do not fit this config (model.ch: 8 -> 16)" in str(e.value)
    assert "damaged" not in str(e.value)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))


@pytest.mark.slow
def test_reset_data_iterator_resumes_with_another_batch_size(tok_workdir, tmp_path):
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(tok_workdir, workdir)
    config = _tiny(steps=6)
    config.input.batch_size = 4
    with pytest.raises(errors.UserError, match=r"--config.train.reset_data_iterator=True"):
        trainer.train(config, workdir)
    config.train.reset_data_iterator = True
    trainer.train(config, workdir)
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


# --- small slips, progress, pictures -------------------------------------------------------


def test_nan_error_names_the_step_that_made_it(tmp_path, monkeypatch):
    config = _tiny(steps=6, checkpoint_every=2, log_every=3)
    faults.poison_batch(monkeypatch, 2)
    with pytest.raises(loop.NonFiniteError, match=r"at step 2 \(the update from step 2 to 3"):
        trainer.train(config, str(tmp_path / "w"))


def test_duration_shows_days():
    assert loop.format_duration(12 * 86400 + 13 * 3600 + 52 * 60 + 19) == "12d 13:52:19"
    assert loop.format_duration(3600 * 23 + 59) == "23:00:59"
    assert loop.format_duration(86400) == "1d 00:00:00"
    assert loop.format_duration(float("inf")) == "?"
    line = loop._progress(10, 1_000_000, 1.0, {"loss": 0.5})
    assert line.endswith("ETA 11d 13:46:30"), line


def test_progress_every_n_seconds_and_preview(tmp_path, capsys):
    """log_every far away: the time-based line still comes; the first one writes preview.png."""
    workdir = str(tmp_path / "w")
    config = _tiny(
        steps=20, log_every=1000, log_every_seconds=1e-9, eval_every=1000, checkpoint_every=1000
    )
    trainer.train(config, workdir)
    out = capsys.readouterr().out
    steps = [int(x.split()[1].split("/")[0]) for x in out.splitlines() if x.startswith("step ")]
    assert len(steps) >= 10 and steps[-1] == 20, out[-2000:]
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len([r for r in rows if "train/loss" in r]) == len(steps)
    from PIL import Image

    with Image.open(os.path.join(workdir, "preview.png")) as im:
        # 4 originals over 4 reconstructions, 16 px upscaled by 8 to 128 px, 2 px borders
        assert im.size == (4 * 128 + 5 * 2, 2 * 128 + 3 * 2)
    assert out.count("wrote " + os.path.join(workdir, "preview.png")) == 1


def test_progress_line_prints_every_interval(capsys, monkeypatch):
    clock = iter([0.0, 5.0, 11.0, 12.0, 25.0])
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    p = metrics.ProgressLine("eval step 3:", 20, "batches", every=10.0)
    for i in range(1, 5):
        p.update(i)
    assert capsys.readouterr().out.splitlines() == [
        "eval step 3: 2/20 batches (11 s)",
        "eval step 3: 4/20 batches (25 s)",
    ]


def test_readable_grid_is_upscaled_and_sample_grid_is_capped(tmp_path):
    imgs = np.arange(5 * 32 * 32, dtype=np.uint8).reshape(5, 32, 32, 1)
    up = metrics.upscale(imgs)
    assert up.shape == (5, 128, 128, 1)
    np.testing.assert_array_equal(up[:, ::4, ::4], imgs)  # nearest neighbour: 4x4 blocks
    np.testing.assert_array_equal(up[:, 3::4, 3::4], imgs)
    assert metrics.upscale(np.zeros((1, 256, 200, 3), np.uint8)).shape == (1, 256, 200, 3)
    # sample.py --num=5000: the .npz keeps all, the PNG shows 64 (8 rows of 8) at 128 px
    code = (
        "import sys, numpy as np, sample\n"
        "x = np.zeros((5000, 32, 32, 1), np.uint8)\n"
        "sample.save(sys.argv[1], x, 8, images=x)\n"
    )
    out = str(tmp_path / "gen.npz")
    proc = run_script("-c", code, out)
    assert "(the first 64 of 5000)" in proc.stdout
    from PIL import Image

    with Image.open(str(tmp_path / "gen.png")) as im:
        assert im.size == (8 * 128 + 9 * 2, 8 * 128 + 9 * 2)
    with np.load(out) as f:
        assert f["images"].shape == (5000, 32, 32, 1)


def test_native_build_says_what_it_does(tmp_path, monkeypatch, capsys):
    """The one-off build of the oneDNN kernels is announced, not silent (g++ stubbed out)."""
    import subprocess as sp
    from pathlib import Path

    from vq_jax.cpu import native

    out = tmp_path / "cache" / "libvq_jax_native_test.so"
    calls = []
    monkeypatch.setattr(native, "onednn_root", lambda: Path(tmp_path))
    monkeypatch.setattr(native, "library_path", lambda root: out)
    monkeypatch.setattr(native.shutil, "which", lambda cxx: "/usr/bin/" + cxx)
    monkeypatch.setattr(
        native.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or sp.CompletedProcess(cmd, 0)
    )
    assert native.build() == out and out.exists() and len(calls) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(
        f"vq_jax: building the native CPU kernels (oneDNN convs, GroupNorm) into {out}"
    )
    assert err[1].startswith("vq_jax: built the native CPU kernels in ")
    assert native.build() == out and len(calls) == 1  # cached: silent, no rebuild
    assert capsys.readouterr().err == ""


def test_plain_kinds_print_without_their_class_name(capsys):
    from vq_jax.convert import ConversionError

    for error in (validate.ConfigError("config.x=1 is out of range."), ConversionError("bad.")):
        with pytest.raises(SystemExit) as exc:
            errors.exit_with("p.py", error)
        assert exc.value.code == 2
        assert capsys.readouterr().err == f"p.py: {error}\n"
    with pytest.raises(SystemExit):
        errors.exit_with("p.py", loop.NonFiniteError("nan."))
    assert capsys.readouterr().err == "p.py: NonFiniteError: nan.\n"


def test_prior_labels_and_inpainting_mask_are_checked(tok_workdir):
    """Checked before any sampling: a stand-in prior with 10 classes over a real tokenizer."""
    from types import SimpleNamespace

    tok = vq_jax.load(tok_workdir)
    comps = SimpleNamespace(model=SimpleNamespace(num_classes=10))
    prior = api.Prior(prior_configs.get_config("tiny"), comps, None, tok, 0)
    np.testing.assert_array_equal(prior._labels(4, None), [0, 1, 2, 3])  # cycles the classes
    np.testing.assert_array_equal(prior._labels(3, 7), [7, 7, 7])
    for labels, match in (
        ([3, 10], r"class labels must lie in \[0, 9\] \(num_classes=10\); got \[3, 10\]"),
        (-1, r"must lie in \[0, 9\].*got \[-1, -1\]"),
        ([1, 2, 3], r"give one int class or 2 of them"),
        ([0.5, 1.0], r"give one int class or 2 of them"),
    ):
        with pytest.raises(errors.UserError, match=match):
            prior._labels(2, labels)
    images = np.zeros((2, 16, 16, 1), np.uint8)
    mask = np.zeros((2, 16, 16), bool)
    mask[0, 4:8, 4:8] = True
    with pytest.raises(errors.UserError, match=r"mask of image\(s\) \[1\] selects no pixel"):
        prior.inpaint(images, mask)
