"""Tests for vq_jax.nets.lpips and scripts/convert_lpips.py against an independent torch LPIPS."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts_util import load_script

from vq_jax.nets.lpips import (
    LPIPS,
    VGG16Features,
    _unit_normalize,
    load_lpips_params,
    lpips_loss_fn,
)

torch = pytest.importorskip("torch")


convert_lpips = load_script("convert_lpips")


# ----------------------------------------------------------------------------------------------
# Independent PyTorch reference: torchvision-style VGG16 `features` + lpips-style linear heads.
# ----------------------------------------------------------------------------------------------
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


class TorchLin(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(c, 1, 1, bias=False))


class TorchLPIPS(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in VGG_CFG:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(c_in, v, 3, padding=1), torch.nn.ReLU()]
                c_in = v
        self.features = torch.nn.Sequential(*layers)
        for k, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", TorchLin(c))

    def feats(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a, b):  # NCHW in [-1, 1] -> [B]
        shift, scale = SHIFT.to(a.dtype), SCALE.to(a.dtype)
        fa, fb = self.feats((a - shift) / scale), self.feats((b - shift) / scale)
        total = 0
        for k, (u, v) in enumerate(zip(fa, fb, strict=True)):
            u = u / (torch.sqrt(torch.sum(u**2, dim=1, keepdim=True)) + 1e-10)
            v = v / (torch.sqrt(torch.sum(v**2, dim=1, keepdim=True)) + 1e-10)
            head = getattr(self, f"lin{k}").model[1]
            total = total + head((u - v) ** 2).mean(dim=(2, 3)).squeeze(1)
        return total


def make_torch_model(seed=0):
    """Random weights: He-normal convs, small biases, non-negative heads (as in pretrained)."""
    gen = torch.Generator().manual_seed(seed)
    model = TorchLPIPS().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                w = torch.randn(m.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in)
                if m.bias is None:  # linear head
                    w = w.abs()
                else:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.weight.copy_(w)
    return model


def split_state_dict(model):
    sd = model.state_dict()
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    return vgg, lin


def torch_lpips(model, a, b):
    """float64 torch LPIPS of NHWC numpy images."""
    m = model.double()
    to_t = lambda x: torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return m(to_t(a), to_t(b)).numpy()


def assert_grads_close(got, want):
    """Relative L2 error, not elementwise: a pre-activation within float32 rounding of 0 can flip
    its ReLU between float32 and float64 (seen at these sizes), which moves a few input-gradient
    entries by ~1e-3 of the largest (relative L2 error up to ~4e-4 seen) while the LPIPS values
    still agree to 1e-6."""
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-2, f"relative gradient error {err:.2e}"
    assert np.linalg.norm(want) > 0


def save_npz(flat, path):
    np.savez(path, **flat)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_torch_model()
    vgg, lin = split_state_dict(model)
    path = save_npz(
        convert_lpips.convert_state_dicts(vgg, lin), tmp_path_factory.mktemp("w") / "l.npz"
    )
    return model, load_lpips_params(path)


def rand_images(seed, shape):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


_apply = jax.jit(lambda p, x, y: LPIPS().apply({"params": p}, x, y))
# lpips_loss_fn builds its closure inside the trace, so all tests share one compiled gradient.
_loss_and_grad = jax.jit(lambda p, x, y: jax.value_and_grad(lpips_loss_fn(p))(x, y))


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_matches_torch_reference(setup, size):
    model, params = setup
    a, b = rand_images(1, (2, size, size, 3)), rand_images(2, (2, size, size, 3))
    b[1] = np.clip(a[1] + 0.05 * rand_images(3, a[1].shape), -1, 1)  # a near pair too
    got = np.asarray(_apply(params, a, b))
    want = torch_lpips(model, a, b)
    chex.assert_shape(got, (2,))
    assert got.dtype == np.float32
    assert np.all(want > 0) and want[1] < want[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_separate_trunk_calls_equal_the_concatenated_call(setup):
    """concat_batch=False (the training loss: no VGG backward over the target half) gives the
    same distances and gradients as the single call on [x; y]."""
    _, params = setup
    a, b = rand_images(11, (2, 32, 32, 1)), rand_images(12, (2, 32, 32, 1))

    def value_and_grads(concat):
        f = lambda x, y: jnp.mean(LPIPS(concat_batch=concat).apply({"params": params}, x, y))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a, b)

    (v1, g1), (v2, g2) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    chex.assert_trees_all_close(g2, g1, rtol=1e-5, atol=1e-9)


def test_identical_images_give_zero(setup):
    model, params = setup
    a = rand_images(4, (3, 32, 32, 3))
    got = np.asarray(_apply(params, a, a))
    chex.assert_shape(got, (3,))
    np.testing.assert_allclose(got, 0.0, atol=1e-12)  # 0 up to float rounding under jit
    b = a.copy()
    b[:, 10, 10, 0] += 1e-2  # a one-pixel change is far above that rounding
    near = np.asarray(_apply(params, a, b))
    assert np.all(near > 1e-8)
    # ~3e-8: a float32 difference of unit-normalised features, ~1e-4 relative rounding seen
    np.testing.assert_allclose(near, torch_lpips(model, a, b), rtol=1e-3)


def test_grayscale_is_repeated_to_rgb(setup):
    model, params = setup
    a, b = rand_images(5, (2, 32, 32, 1)), rand_images(6, (2, 32, 32, 1))
    got = np.asarray(_apply(params, a, b))
    want = torch_lpips(model, np.repeat(a, 3, -1), np.repeat(b, 3, -1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_param_shapes_match_torch_layout(setup):
    model, params = setup
    init_shapes = jax.eval_shape(
        lambda: LPIPS().init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3))
        )
    )["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(init_shapes, params)
    sd = model.state_dict()
    np.testing.assert_array_equal(
        np.asarray(params["vgg"]["conv3_2"]["kernel"]),
        sd["features.12.weight"].float().numpy().transpose(2, 3, 1, 0),
    )
    chex.assert_shape(params["lin4"]["kernel"], (1, 1, 512, 1))


def test_vgg_features_shapes():
    x = jnp.zeros((2, 32, 48, 3))
    shapes = jax.eval_shape(lambda: VGG16Features().init_with_output(jax.random.key(0), x)[0])
    chex.assert_shape(
        list(shapes),
        [(2, 32, 48, 64), (2, 16, 24, 128), (2, 8, 12, 256), (2, 4, 6, 512), (2, 2, 3, 512)],
    )


def test_input_gradient_matches_torch_and_is_finite(setup):
    model, params = setup
    a, b = rand_images(7, (2, 32, 32, 3)), rand_images(8, (2, 32, 32, 3))
    value, g = _loss_and_grad(params, a, b)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0

    ta = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_(True)
    tb = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2)
    model.double()(ta, tb).mean().backward()
    want = ta.grad.permute(0, 2, 3, 1).numpy()
    assert_grads_close(g, want)
    np.testing.assert_allclose(float(value), torch_lpips(model, a, b).mean(), rtol=1e-5)


def test_gradient_where_features_are_all_zero(tmp_path):
    """relu5_3 forced to 0 everywhere: gradients stay finite and match the torch reference."""
    model = make_torch_model(seed=1)
    with torch.no_grad():
        model.features[28].bias.fill_(-1e4)
    a, b = rand_images(9, (2, 32, 32, 3)), rand_images(10, (2, 32, 32, 3))
    ta = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_(True)
    tb = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2)
    model.double()(ta, tb).mean().backward()
    want = ta.grad.permute(0, 2, 3, 1).numpy()

    params = load_lpips_params(
        save_npz(convert_lpips.convert_state_dicts(*split_state_dict(model)), tmp_path / "z.npz")
    )
    value, g = _loss_and_grad(params, a, b)
    np.testing.assert_allclose(float(value), torch_lpips(model, a, b).mean(), rtol=1e-5)
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert_grads_close(g, want)


def test_unit_normalize_gradient_at_zero_vector():
    """d/df <w, f / (|f| + eps)> at f = 0 is w / eps (a plain sqrt-norm gives NaN there)."""
    w = jnp.asarray([0.5, -2.0, 3.0])
    f0 = jnp.zeros((2, 3))
    g = jax.grad(lambda f: jnp.sum(w * _unit_normalize(f)))(f0)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.asarray(w) / 1e-10, (2, 3)))
    naive = lambda f: jnp.sum(w * f / (jnp.sqrt(jnp.sum(f**2, -1, keepdims=True)) + 1e-10))
    assert np.isnan(np.asarray(jax.grad(naive)(f0))).all()
    f = jnp.asarray([[0.3, -1.2, 2.0]])  # away from 0: same values and gradient as the formula
    np.testing.assert_allclose(_unit_normalize(f), f / jnp.linalg.norm(f), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda f: jnp.sum(w * _unit_normalize(f)))(f), jax.grad(naive)(f), rtol=1e-6
    )


def test_grads_do_not_reach_params(setup):
    _, params = setup
    a, b = rand_images(11, (1, 16, 16, 3)), rand_images(12, (1, 16, 16, 3))
    gp = jax.grad(lambda p: lpips_loss_fn(p)(a, b))(params)
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(gp))


def test_bfloat16_trunk_close_to_float32(setup):
    _, params = setup
    a, b = rand_images(13, (2, 16, 16, 3)), rand_images(14, (2, 16, 16, 3))
    f32 = np.asarray(_apply(params, a, b))
    bf16 = LPIPS(dtype=jnp.bfloat16).apply({"params": params}, a, b)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16), f32, rtol=0.1)


def test_bad_inputs_raise(setup):
    _, params = setup
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        LPIPS().apply({"params": params}, jnp.zeros((1, 16, 16, 2)), jnp.zeros((1, 16, 16, 2)))
    with pytest.raises(ValueError, match="NHWC"):
        LPIPS().apply({"params": params}, jnp.zeros((16, 16, 3)), jnp.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="at least 16x16"):
        LPIPS().apply({"params": params}, jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        LPIPS().apply({"params": params}, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 32, 32, 3)))


def test_missing_file_error_names_converter(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("scripts/convert_lpips.py --out=")):
        load_lpips_params(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=r"convert_lpips\.py"):
        load_lpips_params("")


def test_bad_file_contents_raise_value_error(tmp_path):
    flat = convert_lpips.convert_state_dicts(*split_state_dict(make_torch_model()))
    oihw = dict(flat)
    oihw["vgg/conv1_1/kernel"] = flat["vgg/conv1_1/kernel"].transpose(3, 2, 0, 1)
    with pytest.raises(
        ValueError, match=r"conv1_1/kernel has shape \(64, 3, 3, 3\).*convert_lpips"
    ):
        load_lpips_params(save_npz(oihw, tmp_path / "oihw.npz"))
    missing = {k: v for k, v in flat.items() if not k.startswith("lin4")}
    with pytest.raises(ValueError, match="missing keys \\['lin4/kernel'\\]"):
        load_lpips_params(save_npz(missing, tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_lpips_params(tmp_path / "junk.npz")


def test_converter_rejects_incomplete_state_dicts():
    vgg, lin = split_state_dict(make_torch_model())
    with pytest.raises(ValueError, match=r"features\.28\.weight"):
        convert_lpips.convert_state_dicts({k: v for k, v in vgg.items() if "28" not in k}, lin)
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight"):
        convert_lpips.convert_state_dicts(vgg, {k: v for k, v in lin.items() if "lin2" not in k})


def test_converter_cli_round_trip(tmp_path, capsys):
    model = make_torch_model(seed=2)
    vgg, lin = split_state_dict(model)
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg_lin.pth")
    out = tmp_path / "out" / "lpips.npz"
    convert_lpips.main(
        [f"--vgg16={tmp_path / 'vgg16.pth'}", f"--lpips={tmp_path / 'vgg_lin.pth'}", f"--out={out}"]
    )
    assert "wrote" in capsys.readouterr().out
    params = load_lpips_params(out)
    np.testing.assert_array_equal(
        np.asarray(params["lin1"]["kernel"])[0, 0, :, 0],
        lin["lin1.model.1.weight"].numpy()[0, :, 0, 0],
    )
    np.testing.assert_array_equal(
        np.asarray(params["vgg"]["conv5_3"]["bias"]), vgg["features.28.bias"].numpy()
    )

    # the lpips model's own key layout (net.sliceK.N.*) is accepted for the trunk as well
    sliced = {}
    for k, v in vgg.items():
        idx = int(k.split(".")[1])
        stage = 1 + sum(idx > t for t in TAPS)
        sliced[f"net.slice{stage}.{k.split('.', 1)[1]}"] = v
    flat = convert_lpips.convert_state_dicts(sliced, lin)
    chex.assert_trees_all_equal(flat, convert_lpips.convert_state_dicts(vgg, lin))
