"""The README's Python snippets run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Workdirs the README's snippets load, made by commands the README shows (training, conversion);
# the test points them at one tiny trained workdir, the only change it makes to a snippet.
README_WORKDIRS = ("/tmp/vqvae_fm", "/tmp/taming_f16_16384", "/tmp/llamagen_vq16")
INCEPTION = os.path.expanduser("~/.cache/vq_jax/inception_fid.npz")


def _blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_module_example_runs():
    example = [b for b in _blocks() if "vq_jax.VQModel(" in b]
    assert len(example) == 1, "README must hold exactly one VQModel usage example"
    exec(compile(example[0], "README.md", "exec"), {})


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    from configs import vqvae
    from vq_jax import trainer

    workdir = str(tmp_path_factory.mktemp("readme_tok"))
    config = vqvae.get_config("tiny")
    config.train.steps = 2
    trainer.train(config, workdir)
    return workdir


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_every_readme_python_block_runs(index, tiny_workdir):
    """Each ```python block, alone in a fresh namespace (so each must import and define what it
    uses: the quick-start snippet once used an undefined `images`)."""
    code = _blocks()[index]
    if "inception_fid.npz" in code and not os.path.isfile(INCEPTION):
        pytest.skip(f"{INCEPTION} missing; make it with scripts/convert_inception.py")
    for workdir in README_WORKDIRS:
        code = code.replace(f'"{workdir}"', repr(tiny_workdir))
    exec(compile(code, f"README.md python block {index}", "exec"), {})
