"""scripts/convert_checkpoint.py and vq_jax.convert against PyTorch reference tokenizers.

Real checkpoints cannot be downloaded here, so tests/torch_tokenizers.py re-implements both
sources (same key names and layouts, written from reading them) at small sizes with random
weights; the files are saved in each source's format (taming: a Lightning-style dict whose
pickle names a class that cannot be imported; LlamaGen: {"model": state_dict}). Parity: encode
indices equal the PyTorch argmin on >= 99% of tokens, decoding matches within 1e-4 in float32.
"""

import ast
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subproc import run_script

import vq_jax
from configs import prior, vqgan, vqvae
from vq_jax import api, convert, finetune, trainer

torch = pytest.importorskip("torch")
import torch_tokenizers as tt  # noqa: E402  (needs torch)

LLAMAGEN = convert.LlamaGenModel(**tt.LLAMAGEN)


def base_config():
    """Everything but the generator from the tiny test config (synthetic data, batch 8)."""
    config = vqvae.get_config("tiny")
    config.input.synthetic_size = 16
    return config


@pytest.fixture(scope="module")
def taming_run(tmp_path_factory):
    """A taming checkpoint converted by the script, as a user runs it."""
    d = tmp_path_factory.mktemp("taming")
    model, ckpt, yaml_path = tt.write_taming(str(d))
    workdir = str(d / "workdir")
    proc = run_script(
        "scripts/convert_checkpoint.py",
        "--source=taming",
        f"--checkpoint={ckpt}",
        f"--config={yaml_path}",
        f"--workdir={workdir}",
        "--base=configs/vqvae.py:tiny",
    )
    assert "attention at levels (1,)" in proc.stdout, proc.stdout
    return model, ckpt, yaml_path, workdir


@pytest.fixture(scope="module")
def llamagen_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamagen")
    model, path = tt.write_llamagen(str(d))
    workdir = str(d / "workdir")
    convert.convert("llamagen", path, workdir, base_config=base_config(), model=LLAMAGEN)
    return model, path, workdir


def assert_parity(torch_model, workdir, size, seed=0):
    tok = vq_jax.load(workdir)
    images = np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = torch_model.encode(x).numpy()
    got = tok.encode(images)
    assert got.shape == want.shape == (4, size // 2, size // 2)
    assert np.mean(got == want) >= 0.99, np.mean(got == want)
    with torch.no_grad():
        want_images = torch_model.decode_code(torch.from_numpy(want)).permute(0, 2, 3, 1).numpy()
    got_images = tok.model.apply(tok.variables, jnp.asarray(want), method="decode_indices")
    assert np.abs(want_images).max() > 0.5  # a non-trivial output
    np.testing.assert_allclose(np.asarray(got_images), want_images, atol=1e-4, rtol=0)
    return tok, images


def test_taming_checkpoint_needs_the_stub_unpickler(taming_run):
    _, ckpt, _, _ = taming_run
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, map_location="cpu", weights_only=True)


def test_taming_parity(taming_run):
    model, _, _, workdir = taming_run
    tok, images = assert_parity(model, workdir, 32)
    assert tok.config.model.attn_levels == [1] and tok.config.quantizer.vq.l2_normalize is False
    recon = tok.reconstruct(images)
    assert recon.shape == images.shape and recon.dtype == np.uint8


def test_llamagen_parity(llamagen_run):
    model, _, workdir = llamagen_run
    tok, _ = assert_parity(model, workdir, 16, seed=1)
    assert tok.config.model.attn_levels == [1] and tok.config.quantizer.vq.l2_normalize is True
    assert tok.codebook_size == tt.LLAMAGEN_CODES[0]


def test_sample_py_reconstructs_a_converted_workdir(taming_run, tmp_path):
    out = str(tmp_path / "recon.npz")
    run_script("sample.py", f"--workdir={taming_run[3]}", "--mode=reconstruct", "--num=4",
               f"--out={out}")  # fmt: skip
    with np.load(out) as f:
        assert f["reconstructions"].shape == (4, 32, 32, 3)


def test_converted_workdir_serves_a_prior(llamagen_run, tmp_path):
    """A prior trains on the converted tokenizer's tokens (its data: the base config's) and its
    samples decode through it."""
    config = prior.get_config("tiny")
    config.tokenizer_workdir = llamagen_run[2]
    config.train.update(steps=2, eval_every=2, eval_batches=1)
    result = trainer.train(config, str(tmp_path / "prior"))
    assert np.isfinite(result["loss"])  # eval: held-out loss, then samples decoded by it
    assert os.path.exists(tmp_path / "prior" / "eval" / "samples_step_2.png")
    p = vq_jax.load_prior(str(tmp_path / "prior"))
    assert p.tokenizer.codebook_size == tt.LLAMAGEN_CODES[0]
    assert p.comps.token_shape == (8, 8)


def test_finetune_starts_from_the_converted_generator(taming_run, tmp_path):
    """train.init_from: the generator (and codebook) of the converted workdir, its architecture,
    at another resolution (16 instead of 32), a fresh optimizer. With a zero learning rate the
    fine-tuned generator still equals the converted one. (A VQ-VAE run keeps the test short; a
    VQGAN run's discriminator is initialised as in any new run, README shows one.)"""
    source = taming_run[3]
    config = vqvae.get_config("tiny")  # its own model config is replaced by the source's
    config.input.channels = 3
    config.train.init_from = source
    config.train.update(steps=2, eval_every=2, eval_batches=1)
    config.optimizer.generator.lr = 0.0
    workdir = str(tmp_path / "ft")
    trainer.train(config, workdir)
    cfg, _, params, _, step = api.restore_params(workdir, use_ema=False)
    assert step == 2 and cfg.model.attn_levels == [1] and cfg.model.ch == 32
    assert cfg.input.resolution == 16 and cfg.quantizer.kind == "vq"
    np.testing.assert_equal(jax_tree(params), jax_tree(vq_jax.load(source).params))


def jax_tree(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def test_finetune_config_errors(taming_run, tmp_path):
    config = vqgan.get_config("tiny")
    config.train.init_from = taming_run[3]
    with pytest.raises(ValueError, match=r"config.input.channels=1 but .* takes 3-channel"):
        trainer.train(config, str(tmp_path / "ft"))
    config.input.channels = 3
    with pytest.raises(ValueError, match="is this run's own workdir"):
        trainer.train(config, taming_run[3])
    config.train.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer.train(config, str(tmp_path / "ft2"))
    # a run that has checkpoints resumes with its saved architecture, the source may be gone
    config.train.init_from = str(tmp_path / "moved_away")
    resumed = finetune.with_source_generator(config, taming_run[3])
    assert resumed.model.ch == 32 and tuple(resumed.model.attn_levels) == (1,)
    assert resumed.model.dtype == config.model.dtype


# ------------------------------------------------------------------------------ bad input


def _error(tmp_path, source, ckpt, **kw) -> str:
    with pytest.raises(convert.ConversionError) as e:
        convert.convert(source, ckpt, str(tmp_path / "w"), base_config=base_config(), **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_yaml_is_named(taming_run, tmp_path):
    assert "needs the model's yaml" in _error(tmp_path, "taming", taming_run[1])
    assert "does not exist" in _error(
        tmp_path, "taming", taming_run[1], yaml_path=str(tmp_path / "nope.yaml")
    )


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    def extra(sd):
        sd["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)

    def missing(sd):
        del sd["encoder.down.1.block.0.nin_shortcut.weight"]

    _, ckpt, yaml_path = tt.write_taming(str(tmp_path), sd_edit=extra)
    msg = _error(tmp_path, "taming", ckpt, yaml_path=yaml_path)
    assert "unknown key 'encoder.down.0.block.0.temb_proj.weight'" in msg
    _, ckpt, yaml_path = tt.write_taming(str(tmp_path), sd_edit=missing)
    msg = _error(tmp_path, "taming", ckpt, yaml_path=yaml_path)
    assert "lacks key 'encoder.down.1.block.0.nin_shortcut.weight'" in msg
    assert "(expected shape (64, 32, 1, 1))" in msg
    _, ckpt, yaml_path = tt.write_taming(str(tmp_path), yaml_edit={"n_embed": 64})
    msg = _error(tmp_path, "taming", ckpt, yaml_path=yaml_path)
    assert "'quantize.embedding.weight'" in msg and "(128, 16), expected (64, 16)" in msg
    # an architecture that does not match the weights: one more res block per level
    _, ckpt, yaml_path = tt.write_taming(str(tmp_path), yaml_edit={"num_res_blocks": 2})
    msg = _error(tmp_path, "taming", ckpt, yaml_path=yaml_path)
    assert "lacks key 'decoder.up.0.block.2.conv1.bias' (expected shape (32,))" in msg


def test_wrong_source_is_named(taming_run, llamagen_run, tmp_path):
    msg = _error(tmp_path, "llamagen", taming_run[1], model="VQ-16")
    assert "taming's layout" in msg and "--source=taming" in msg
    msg = _error(tmp_path, "taming", llamagen_run[1], yaml_path=taming_run[2])
    assert "LlamaGen's layout" in msg and "--source=llamagen" in msg
    # taming's weights under LlamaGen's {"model": ...}: the first key is LlamaGen-unknown
    path = str(tmp_path / "mixed.pt")
    torch.save({"model": taming_run[0].state_dict()}, path)
    msg = _error(tmp_path, "llamagen", path, model=LLAMAGEN)
    assert "unknown key 'encoder.down." in msg and "--source=taming" in msg
    assert "not a LlamaGen VQ model" in _error(tmp_path, "llamagen", path, model="VQ-32")


def test_script_reports_errors_in_one_line(taming_run, tmp_path):
    proc = run_script(
        "scripts/convert_checkpoint.py",
        "--source=taming",
        f"--checkpoint={taming_run[1]}",
        f"--workdir={tmp_path / 'w'}",
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "convert_checkpoint.py: --source=taming needs the model's yaml: pass "
        "--config=PATH/model.yaml (in the released folder next to last.ckpt, e.g. "
        "configs/model.yaml)."
    ]
    assert not os.path.exists(tmp_path / "w")


def test_refuses_to_overwrite_a_workdir(taming_run):
    _, ckpt, yaml_path, workdir = taming_run
    with pytest.raises(convert.ConversionError, match="already holds checkpoints"):
        convert.convert("taming", ckpt, workdir, base_config=base_config(), yaml_path=yaml_path)


def test_torch_is_imported_by_the_converter_only():
    """No module outside vq_jax/convert imports torch (and that one only inside a function)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vq_jax")
    importers = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                tree = ast.parse(open(path).read())
                for node in ast.walk(tree):
                    mods = []
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        mods = [node.module]
                    if any(m == "torch" or m.startswith("torch.") for m in mods):
                        importers.append((os.path.relpath(path, root), node.col_offset > 0))
    assert importers and all(p.startswith("convert/") and nested for p, nested in importers)


def test_lpips_weights_in_the_taming_loss_become_an_npz(tmp_path):
    """--lpips_out: the loss.perceptual_loss.* keys (taming's LPIPS: net.sliceK.N, linK.model.1)
    become, through scripts/convert_lpips.py, the .npz config.loss.lpips_weights reads."""
    from scripts_util import load_script

    from vq_jax.nets.lpips import load_lpips_params, lpips_param_shapes, vgg16_conv_names

    script = load_script("convert_lpips")
    rng = np.random.default_rng(0)
    shapes = lpips_param_shapes()
    sd, want = {}, {}
    indices = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision features indices
    for idx, name in zip(indices, vgg16_conv_names(), strict=True):
        kh, kw, i, o = shapes[f"vgg/{name}/kernel"]
        w = rng.standard_normal((o, i, kh, kw)).astype(np.float32)
        sd[f"loss.perceptual_loss.net.slice{1 + idx // 5}.{idx}.weight"] = torch.from_numpy(w)
        sd[f"loss.perceptual_loss.net.slice{1 + idx // 5}.{idx}.bias"] = torch.zeros(o)
        want[f"vgg/{name}/kernel"] = w.transpose(2, 3, 1, 0)
    for k in range(5):
        c = shapes[f"lin{k}/kernel"][2]
        sd[f"loss.perceptual_loss.lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1)
    sd["encoder.conv_in.weight"] = torch.zeros(1)  # generator keys are left alone
    torch.save({"state_dict": sd}, tmp_path / "last.ckpt")
    out = str(tmp_path / "lpips.npz")
    np.savez(out, **script.from_taming_checkpoint(str(tmp_path / "last.ckpt")))
    load_lpips_params(out)  # validates every array's name and shape
    with np.load(out) as f:
        assert len(f.files) == len(shapes)
        for key, value in want.items():
            np.testing.assert_array_equal(f[key], value)
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "b.ckpt")
    with pytest.raises(convert.ConversionError, match=r"no loss\.perceptual_loss"):
        script.from_taming_checkpoint(str(tmp_path / "b.ckpt"))


def test_resolution_flag_sets_the_workdir_image_size(llamagen_run, tmp_path):
    """Attention is by level, so the converted blocks are the same at another image size."""
    _, path, workdir = llamagen_run
    convert.convert("llamagen", path, str(tmp_path / "w"), base_config=base_config(),
                    model=LLAMAGEN, resolution=32)  # fmt: skip
    tok32, tok16 = vq_jax.load(str(tmp_path / "w")), vq_jax.load(workdir)
    assert tok32.token_shape == (16, 16) and tok16.token_shape == (8, 8)
    np.testing.assert_equal(jax_tree(tok32.params), jax_tree(tok16.params))


def test_nothing_in_the_file_runs(tmp_path):
    """A pickle that would call exec() on load gets an inert stub instead of exec."""
    from vq_jax.convert.torch_file import Stub, load_torch_file

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": Evil()}, tmp_path / "e.ckpt")
    obj = load_torch_file(str(tmp_path / "e.ckpt"), "--checkpoint")
    assert not marker.exists() and isinstance(obj["evil"], Stub)
    np.testing.assert_array_equal(obj["state_dict"]["w"].numpy(), [1.0, 1.0])
