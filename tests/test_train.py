"""End to end: train.py on the tiny config, sample.py on its workdir, resume and checkpoints."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from subproc import run_script, train_args

import vq_jax
from configs import vqvae
from vq_jax import checkpoints, resume, trainer
from vq_jax import state as state_lib


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """One real `train.py` run of the tiny VQ-VAE config (4 steps)."""
    workdir = str(tmp_path_factory.mktemp("vqvae_tiny"))
    proc = run_script(*train_args("vqvae", workdir))
    assert "step 4/4" in proc.stdout  # the progress line
    return workdir


def test_train_writes_checkpoints_metrics_and_eval(trained_workdir):
    ckpt_dir = os.path.join(trained_workdir, "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [2, 4]
    lines = [json.loads(line) for line in open(os.path.join(trained_workdir, "metrics.jsonl"))]
    train_lines = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    for key in ("train/l2_grads", "train/perplexity", "train/usage", "train/lr"):
        assert np.isfinite(train_lines[-1][key])
    ev = json.load(open(os.path.join(trained_workdir, "eval", "step_4.json")))
    for key in ("psnr", "ssim", "l1", "mse", "codebook_usage", "codebook_perplexity"):
        assert np.isfinite(ev[key]), key
    assert 0 < ev["codebook_usage"] <= 1
    assert os.path.exists(os.path.join(trained_workdir, "eval", "step_4.png"))
    assert os.path.exists(os.path.join(trained_workdir, "config.json"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(trained_workdir, "tb")))


def test_sample_reconstruct_encode_decode(trained_workdir, tmp_path):
    out = str(tmp_path / "recon.npz")
    run_script(
        "sample.py",
        f"--workdir={trained_workdir}",
        "--mode=reconstruct",
        "--split=test",
        "--num=6",
        f"--out={out}",
    )
    with np.load(out) as f:
        assert f["originals"].shape == f["reconstructions"].shape == (6, 16, 16, 1)
        assert f["originals"].dtype == f["reconstructions"].dtype == np.uint8
        assert f["indices"].shape == (6, 8, 8) and f["indices"].dtype == np.int32
        assert f["labels"].shape == (6,)
        indices = f["indices"]
    assert os.path.exists(str(tmp_path / "recon.png"))

    tokens = str(tmp_path / "tokens.npz")
    run_script(
        "sample.py",
        f"--workdir={trained_workdir}",
        "--mode=encode",
        "--split=test",
        f"--out={tokens}",
    )
    with np.load(tokens) as f:
        assert f["indices"].shape[0] == 64  # the whole synthetic test split
        np.testing.assert_array_equal(f["indices"][:6], indices)

    decoded = str(tmp_path / "decoded.npz")
    run_script(
        "sample.py",
        f"--workdir={trained_workdir}",
        "--mode=decode",
        f"--tokens={out}",
        f"--out={decoded}",
    )
    with np.load(decoded) as f, np.load(out) as g:
        np.testing.assert_array_equal(f["images"], g["reconstructions"])


def test_python_api_round_trip(trained_workdir):
    tok = vq_jax.load(trained_workdir)
    images = (np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 1))).astype(np.uint8)
    tokens = tok.encode(images)
    chex.assert_shape(tokens, (3, 8, 8))
    out = tok.decode(tokens)
    chex.assert_shape(out, (3, 16, 16, 1))
    assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="tokens have shape"):
        tok.decode(tokens[:, :4])
    with pytest.raises(ValueError, match="this tokenizer takes"):
        tok.encode(np.zeros((2, 8, 8, 1), np.uint8))


def _final_params(workdir):
    config, _, params, _, step = vq_jax.api.restore_params(workdir, use_ema=False)
    del config
    return step, jax.device_get(params)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Train 4 steps straight vs 2 steps, stop, resume to 4: identical parameters."""
    config = vqvae.get_config("tiny")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    trainer.train(config, straight)
    config_2 = vqvae.get_config("tiny")
    config_2.train.steps = 2
    trainer.train(config_2, resumed)
    trainer.train(config, resumed)
    s_step, s_params = _final_params(straight)
    r_step, r_params = _final_params(resumed)
    assert s_step == r_step == 4
    chex.assert_trees_all_equal(s_params, r_params)


def test_checkpoint_round_trip_is_identical(tmp_path):
    config = vqvae.get_config("tiny")
    comps = state_lib.build(config)
    key = jax.random.key(0)
    state = state_lib.init_state(comps, key, ema=True)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(7, state, {"epoch": 1, "offset": 3}, {"seed": 0})
    ckpt.wait()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, restored, data_state, cfg = ckpt.restore_latest(
        checkpoints.abstract_like(state, sharding)
    )
    ckpt.close()
    assert step == 7 and data_state == {"epoch": 1, "offset": 3} and cfg == {"seed": 0}
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(restored))


def test_config_differences_ignore_compute_only_entries():
    """A workdir saved with the removed model.conv_weight_grad (how convs were computed: same
    state shapes) resumes under a config without it; a real shape change is still reported."""

    saved = {
        "model": {"ch": 8, "dtype": "float32", "conv_weight_grad": "xla"},
        "quantizer": {"codebook_size": 32},
    }
    current = {"model": {"ch": 8, "dtype": "float32"}, "quantizer": {"codebook_size": 32}}
    assert resume.config_differences(saved, current) == []
    current["quantizer"]["codebook_size"] = 64
    assert resume.config_differences(saved, current) == ["quantizer.codebook_size: 32 -> 64"]


def test_config_differences_treat_added_keys_as_their_default():
    """A workdir saved before model.attn_levels existed resumes under the current config,
    whose attn_levels=() means what the old config meant; a real placement change does not."""
    saved = {"model": {"ch": 8, "attn_resolutions": [8]}}
    current = {"model": {"ch": 8, "attn_resolutions": [8], "attn_levels": []}}
    assert resume.config_differences(saved, current) == []
    current["model"]["attn_levels"] = [1]
    assert resume.config_differences(saved, current) == ["model.attn_levels: [] -> [1]"]


def test_workdir_with_conv_weight_grad_loads_and_resumes(tmp_path):
    """A workdir whose saved config carries model.conv_weight_grad (removed when the CPU kernels
    became the runtime setting train.cpu_kernels; fixture as the code before saved it) loads,
    encodes and decodes, and resumes under today's config."""
    workdir = str(tmp_path / "w")
    config = vqvae.get_config("tiny")
    config.train.steps = 2
    trainer.train(config, workdir)
    with open(
        os.path.join(os.path.dirname(__file__), "fixtures", "pre_cpu_layer_tiny_config.json")
    ) as f:
        saved = json.load(f)
    assert saved["model"]["conv_weight_grad"] == "onednn"
    with open(os.path.join(workdir, "checkpoints", "2", "config", "metadata"), "w") as f:
        json.dump(saved, f)  # the config the checkpoint was written with

    tok = vq_jax.load(workdir)
    assert tok.config.model.conv_weight_grad == "onednn"  # read as saved, and ignored
    images = np.zeros((2, 16, 16, 1), np.uint8)
    codes = tok.encode(images)
    assert np.asarray(tok.decode(codes)).shape == images.shape
    trainer.train(vqvae.get_config("tiny"), workdir)  # 4 steps: resumes from step 2
    assert checkpoints.newest_step_dir(os.path.join(workdir, "checkpoints")) == 4
