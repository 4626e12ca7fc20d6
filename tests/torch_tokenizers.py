"""Small PyTorch re-implementations of the tokenizers vq_jax.convert reads, for parity tests.

Written for these tests from reading the sources, not copied: taming-transformers'
taming/modules/diffusionmodules/model.py (Encoder, Decoder, ResnetBlock, AttnBlock, Upsample,
Downsample), taming/modules/vqvae/quantize.py (VectorQuantizer2) and taming/models/vqgan.py
(VQModel); LlamaGen's tokenizer/tokenizer_image/vq_model.py. Each model's `state_dict()` has
exactly the source's key names and tensor layouts (nin_shortcut only where the channel count
changes, taming's decoder `up` list indexed by level and run in reverse, LlamaGen's decoder
`conv_blocks` in execution order, attention lists per level, LlamaGen's `codebook_used`
buffer, taming's `loss.*` weights); the forward passes follow the sources' arithmetic.
`randomize` gives every tensor random values (GroupNorm scales and biases included);
`write_taming` / `write_llamagen` save such a model as the source releases it.

Run as a script it writes the parity test's random taming model (last.ckpt + model.yaml), the
stand-in for a real checkpoint in the README's fine-tuning example:

    python tests/torch_tokenizers.py --out=/tmp/random_taming
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """Both sources' block (taming with temb_channels=0: no temb_proj)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)
        self.cin, self.cout = cin, cout

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=2)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Quantize(nn.Module):
    """Nearest code by ||z||^2 + ||e||^2 - 2 z.e; LlamaGen l2-normalises both first."""

    def __init__(self, n: int, d: int, l2: bool, usage_buffer: bool):
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        self.l2 = l2
        if usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self):
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2 else w

    def indices(self, z):  # z NCHW -> [B, H, W]
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.l2:
            flat = F.normalize(flat, p=2, dim=-1)
        e = self.codes()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).reshape(b, h, w)

    def lookup(self, idx):  # [B, H, W] -> NCHW
        return self.codes()[idx].permute(0, 3, 1, 2)


class TamingEncoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, cin, z):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in, res, mults = ch, resolution, (1, *ch_mult)
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * mults[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(block_in, block_in), AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out, self.conv_out = norm(block_in), nn.Conv2d(block_in, z, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class TamingDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, cout, z):
        super().__init__()
        n = len(ch_mult)
        block_in, res = ch * ch_mult[-1], resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(block_in, block_in), AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, level)  # indexed by level, as in taming
        self.norm_out, self.conv_out = norm(block_in), nn.Conv2d(block_in, cout, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenEncoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z, cin=3):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        mults, n = (1, *ch_mult), len(ch_mult)
        for i in range(n):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * mults[i]
            for _ in range(num_res_blocks):
                blk.res.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if i == n - 1:
                    blk.attn.append(AttnBlock(block_in))
            if i != n - 1:
                blk.downsample = Downsample(block_in)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)]
        )
        self.norm_out, self.conv_out = norm(block_in), nn.Conv2d(block_in, z, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, blk in enumerate(self.conv_blocks):
            for j, res in enumerate(blk.res):
                h = res(h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if i != len(self.conv_blocks) - 1:
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z, cout=3):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)]
        )
        self.conv_blocks = nn.ModuleList()  # execution order: lowest resolution first
        for i in reversed(range(n)):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blk.res.append(ResnetBlock(block_in, ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if i == n - 1:
                    blk.attn.append(AttnBlock(block_in))
            if i != 0:
                blk.upsample = Upsample(block_in)
            self.conv_blocks.append(blk)
        self.norm_out, self.conv_out = norm(block_in), nn.Conv2d(block_in, cout, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for k, blk in enumerate(self.conv_blocks):
            for j, res in enumerate(blk.res):
                h = res(h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if k != len(self.conv_blocks) - 1:
                h = blk.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQModel(nn.Module):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder (both sources)."""

    def encode(self, x):  # NCHW float -> [B, h, w]
        return self.quantize.indices(self.quant_conv(self.encoder(x)))

    def decode_code(self, idx):
        return self.decoder(self.post_quant_conv(self.quantize.lookup(idx)))


class TamingVQModel(VQModel):
    """taming.models.vqgan.VQModel with a stand-in `loss` (LPIPS + discriminator keys)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels,
                 z_channels, n_embed, embed_dim):  # fmt: skip
        super().__init__()
        args = (ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels, z_channels)
        self.encoder, self.decoder = TamingEncoder(*args), TamingDecoder(*args)
        self.quantize = Quantize(n_embed, embed_dim, l2=False, usage_buffer=False)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.loss = nn.Module()
        self.loss.perceptual_loss = nn.Module()
        self.loss.perceptual_loss.lin0 = nn.Module()
        self.loss.perceptual_loss.lin0.model = nn.Sequential(
            nn.Dropout(), nn.Conv2d(64, 1, 1, bias=False)
        )
        self.loss.discriminator = nn.Module()
        self.loss.discriminator.main = nn.Sequential(nn.Conv2d(in_channels, 8, 4, 2, 1))


class LlamaGenVQModel(VQModel):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, codebook_size, embed_dim):
        super().__init__()
        self.encoder = LlamaGenEncoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = LlamaGenDecoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = Quantize(codebook_size, embed_dim, l2=True, usage_buffer=True)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights: convs ~ N(0, 1/fan_in), biases ~ 0.1 N, GroupNorm scale 1 + 0.3 N and
    bias 0.3 N, codes ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    return model.eval()


# ------------------------------------------------------------------ the sources' file formats

TAMING = dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),  # level 1 of 2 at resolution 32: the up list's last, run first
    resolution=32,
    in_channels=3,
    z_channels=32,
    n_embed=128,
    embed_dim=16,
)
LLAMAGEN = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, resolution=16)
LLAMAGEN_CODES = (64, 8)

YAML = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed_dim}
    n_embed: {n_embed}
    ddconfig:
      double_z: false
      z_channels: {z_channels}
      resolution: {resolution}
      in_channels: {in_channels}
      out_ch: {in_channels}
      ch: {ch}
      ch_mult: {ch_mult}
      num_res_blocks: {num_res_blocks}
      attn_resolutions: {attn_resolutions}
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {{disc_start: 250001}}
"""


def _lightning_checkpoint(state_dict):
    """A dict shaped like a PyTorch Lightning .ckpt; its pickle names
    pytorch_lightning.callbacks.ModelCheckpoint (a class, an instance) and a dict subclass
    (Lightning's AttributeDict), which this environment cannot import."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    callback = type("ModelCheckpoint", (), {"__module__": name})
    module.ModelCheckpoint = callback
    instance = callback()
    instance.best_model_score = torch.tensor(0.5)
    attribute_dict = type("AttributeDict", (dict,), {"__module__": name})
    module.AttributeDict = attribute_dict
    parents = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    for parent in parents:  # pickle imports the package chain; only while pickling
        sys.modules[parent] = types.ModuleType(parent)
    sys.modules[name] = module
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {callback: {"best_model_score": torch.tensor(0.5)}},
        "hparams": instance,
        "hyper_parameters": attribute_dict(embed_dim=16, ckpt_path=None),
        "optimizer_states": [],
    }, [name, *parents]


def write_taming(directory, *, seed=0, sd_edit=None, yaml_edit=None):
    """(model, ckpt path, yaml path) of a random taming VQGAN saved like a released folder."""
    model = randomize(TamingVQModel(**TAMING), seed)
    sd = model.state_dict()
    if sd_edit:
        sd_edit(sd)
    ckpt, fake_modules = _lightning_checkpoint(sd)
    path = os.path.join(directory, "last.ckpt")
    try:
        torch.save(ckpt, path)
    finally:
        for name in fake_modules:
            del sys.modules[name]
    yaml_path = os.path.join(directory, "model.yaml")
    fields = {**TAMING, **(yaml_edit or {})}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    with open(yaml_path, "w") as f:
        f.write(YAML.format(**fields))
    return model, path, yaml_path


def write_llamagen(directory, *, seed=1):
    arch = {k: v for k, v in LLAMAGEN.items() if k != "resolution"}
    model = LlamaGenVQModel(**arch, codebook_size=LLAMAGEN_CODES[0], embed_dim=LLAMAGEN_CODES[1])
    model = randomize(model, seed)
    path = os.path.join(directory, "vq_ds4_test.pt")
    torch.save({"model": model.state_dict()}, path)
    return model, path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the parity test's random taming model.")
    parser.add_argument("--out", required=True, help="directory for last.ckpt and model.yaml")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _, ckpt, yaml_path = write_taming(args.out, seed=args.seed)
    print(f"wrote {ckpt} and {yaml_path} (random weights, not a trained model)")


if __name__ == "__main__":
    main()
