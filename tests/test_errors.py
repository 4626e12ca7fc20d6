"""User errors: one exception type, printed by the entry points as one line without a traceback."""

import pytest
from subproc import run_script, train_args

from vq_jax import checkpoints, distributed, errors, loop


def test_user_error_keeps_the_builtin_types():
    """Callers that caught ValueError / FileNotFoundError before still catch them."""
    assert issubclass(errors.UserError, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.MissingFileError, errors.UserError)
    assert issubclass(checkpoints.CheckpointError, errors.UserError)
    assert issubclass(loop.NonFiniteError, errors.UserError)
    assert issubclass(loop.NonFiniteError, FloatingPointError)
    assert issubclass(distributed.DistributedConfigError, errors.UserError)


def test_exit_with_prints_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        errors.exit_with("train.py", errors.UserError("config.x=3 is too big;\n  use <= 2."))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "train.py: config.x=3 is too big; use <= 2.\n"
    with pytest.raises(SystemExit) as exc:
        errors.exit_with("train.py", loop.NonFiniteError("Non-finite loss\nat step 3."))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "train.py: NonFiniteError: Non-finite loss at step 3.\n"


def test_train_py_reports_a_config_error_in_one_line(tmp_path):
    """A config mistake found by the library (not by flag parsing): exit 2, one line."""
    proc = run_script(
        *train_args("vqvae", str(tmp_path / "w"), "--config.input.resolution=17"), check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: config.input.resolution=17 is not divisible"), last


def test_sample_py_reports_a_missing_workdir_in_one_line(tmp_path):
    proc = run_script(
        "sample.py", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'o.npz'}", check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: No checkpoints in") and "train.py" in last, last


def test_sample_py_inpainting_box_must_lie_inside_the_image():
    """A box outside the image masked nothing (silently); a non-integer one was a traceback."""
    code = (
        "import sample\n"
        "from vq_jax import errors\n"
        "assert sample.parse_box(['0', '0', '8', '16'], 16, 16) == (0, 0, 8, 16)\n"
        "for box in (['8', '8', '40', '40'], ['4', '4', '4', '8'], ['a', '0', '1', '1']):\n"
        "    try:\n"
        "        sample.parse_box(box, 16, 16)\n"
        "    except errors.UserError as e:\n"
        "        print(e)\n"
    )
    proc = run_script("-c", code)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("--box=8,8,40,40 is not a box inside the 16x16 images; valid: ")
    assert lines[1].startswith("--box=4,4,4,8 is not a box inside")
    assert lines[2] == "--box=a,0,1,1: give four integers y0,x0,y1,x1."
