"""taming-transformers' VQGAN (`taming.models.vqgan.VQModel`): a `last.ckpt` + `model.yaml`.

The architecture comes from the yaml's `model.params` (`ddconfig`, `n_embed`, `embed_dim`);
the weights from the checkpoint's `state_dict` (encoder, decoder, quantize, quant_conv,
post_quant_conv; `loss.*`, the LPIPS and discriminator weights, are skipped).

Key names (read from taming/modules/diffusionmodules/model.py): `encoder.down.{i}.block.{j}`,
`encoder.down.{i}.attn.{j}`, `encoder.down.{i}.downsample.conv`, `{en,de}coder.mid.block_1 /
attn_1 / block_2`, `decoder.up.{i}.block.{j}` (indexed by level like the encoder, i.e. the
decoder runs them from the last index down), `decoder.up.{i}.upsample.conv`,
`quantize.embedding.weight`. Attention follows a level when `resolution // 2**level` is in
`attn_resolutions`, at any input size; that is vq-jax's `attn_levels`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from vq_jax.convert.arch import Architecture, ConversionError
from vq_jax.convert.mapping import leaf_name
from vq_jax.convert.torch_file import load_torch_file

SOURCE = "taming"
_TARGETS = ("taming.models.vqgan.VQModel",)
HINT = (
    "check that --config is the model.yaml released with this checkpoint, and that it is a "
    "taming VQGAN checkpoint (LlamaGen's .pt files: --source=llamagen)."
)


def _yaml_params(yaml_path: str | None) -> dict:
    if not yaml_path:
        raise ConversionError(
            "--source=taming needs the model's yaml: pass --config=PATH/model.yaml (in the "
            "released folder next to last.ckpt, e.g. configs/model.yaml)."
        )
    if not os.path.isfile(yaml_path):
        raise ConversionError(
            f"--config={yaml_path!r} does not exist; pass the model.yaml released with the "
            "checkpoint."
        )
    import yaml

    with open(yaml_path) as f:
        doc = yaml.safe_load(f)
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise ConversionError(
            f"{yaml_path!r} has no model.params.ddconfig; pass taming's model.yaml (the one "
            "with model.target: taming.models.vqgan.VQModel)."
        )
    target = model.get("target", _TARGETS[0])
    if target not in _TARGETS:
        raise ConversionError(
            f"{yaml_path!r} describes model.target={target!r}; only {_TARGETS[0]} (the f16 "
            "VQGANs) converts: Gumbel and EMA quantizers have other weights."
        )
    return params


def architecture(yaml_path: str | None) -> Architecture:
    """The vq-jax architecture of a taming model.yaml."""
    params = _yaml_params(yaml_path)
    dd = params["ddconfig"]
    try:
        ch_mult = tuple(int(m) for m in dd["ch_mult"])
        resolution = int(dd["resolution"])
        attn_res = {int(r) for r in dd.get("attn_resolutions", ())}
        arch = Architecture(
            ch=int(dd["ch"]),
            ch_mult=ch_mult,
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_levels=tuple(i for i in range(len(ch_mult)) if resolution // 2**i in attn_res),
            z_channels=int(dd["z_channels"]),
            in_channels=int(dd["in_channels"]),
            codebook_size=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            l2_normalize=False,
            resolution=resolution,
        )
    except KeyError as e:
        raise ConversionError(
            f"{yaml_path!r} lacks model.params.{'' if e.args[0] in params else 'ddconfig.'}"
            f"{e.args[0]}; pass the model.yaml released with the checkpoint."
        ) from e
    if dd.get("double_z", False):
        raise ConversionError(
            f"{yaml_path!r} has ddconfig.double_z=true (a KL autoencoder's encoder); VQGAN "
            "yamls have double_z: false."
        )
    if int(dd.get("out_ch", arch.in_channels)) != arch.in_channels:
        raise ConversionError(
            f"{yaml_path!r} has ddconfig.out_ch={dd['out_ch']} != in_channels="
            f"{arch.in_channels}; vq-jax decodes to the channels it encodes."
        )
    return arch


def state_dict(checkpoint: str) -> Mapping[str, Any]:
    """The `state_dict` of a Lightning `.ckpt` (or a bare state dict)."""
    obj = load_torch_file(checkpoint, "--checkpoint")
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        raise ConversionError(
            f"{checkpoint!r} holds {{'model': state_dict}}, LlamaGen's layout, not a taming "
            "Lightning checkpoint with 'state_dict'; use --source=llamagen."
        )
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return obj
    raise ConversionError(
        f"{checkpoint!r} holds a {type(obj).__name__} without 'state_dict'; pass taming's "
        "last.ckpt."
    )


_LEVEL = re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)")
_RESAMPLE = re.compile(r"(down|up)_(\d+)_(downsample|upsample)")
_MID = {"mid_block_1": "mid.block_1", "mid_attn_1": "mid.attn_1", "mid_block_2": "mid.block_2"}


def torch_key(path: tuple[str, ...]) -> str:
    """taming's state-dict key of a vq-jax parameter path."""
    top, *mid, leaf = path
    if top == "quantizer":
        return "quantize.embedding.weight"
    parts = [top]
    if mid:
        name, *rest = mid
        if m := _LEVEL.fullmatch(name):
            parts += [m[1], m[2], m[3], m[4]]
        elif m := _RESAMPLE.fullmatch(name):
            parts += [m[1], m[2], m[3]]
        else:
            parts.append(_MID.get(name, name))
        parts += rest
    return ".".join([*parts, leaf_name(leaf)])


LPIPS_PREFIX = "loss.perceptual_loss."


def lpips_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The LPIPS weights inside the loss keys, named as the lpips model names them
    (`net.sliceK.N.weight`, `linK.model.1.weight`): what scripts/convert_lpips.py reads."""
    found = {k[len(LPIPS_PREFIX) :]: v for k, v in sd.items() if k.startswith(LPIPS_PREFIX)}
    if not found:
        raise ConversionError(
            f"the taming checkpoint has no {LPIPS_PREFIX}* keys (LPIPS weights); drop "
            "--lpips_out, or make the file with scripts/convert_lpips.py from VGG16 weights."
        )
    return found


def ignored(key: str) -> bool:
    """Keys that are not generator weights: the loss (LPIPS, discriminator)."""
    return key.startswith("loss.")
