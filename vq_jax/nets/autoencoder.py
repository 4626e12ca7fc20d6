"""Convolutional encoder/decoder of the VQGAN design (Esser et al., 2021, "Taming Transformers").

The encoder is a stack of resolution levels; each level holds ``num_res_blocks`` pre-activation
residual blocks (GroupNorm -> swish -> 3x3 conv, twice), optional single-head self-attention at the
spatial resolutions listed in ``attn_resolutions``, and a stride-2 downsampling conv between levels.
A middle section (res / attn / res) and a GroupNorm -> swish -> conv head map to ``z_channels``.
The decoder mirrors it with ``num_res_blocks + 1`` blocks per level and nearest-neighbour
upsampling.

All modules take NHWC inputs. ``dtype`` is the compute dtype (bfloat16 is fine); parameters are
always float32 and attention softmax, encoder output and decoder output are float32.

"Resolution" for ``attn_resolutions`` is the current feature-map height, read from the tensor
shape, so one module works for any input size whose sides are divisible by the downsample factor.
``attn_levels`` (indices into ``ch_mult``) places attention by level instead, so the same blocks
run at every input size; taming-transformers and LlamaGen fix their attention that way (taming
from the resolution in its config, LlamaGen at the lowest level), which is what converted
checkpoints use.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from vq_jax.nets import kernels
from vq_jax.nets.group_norm import GroupNorm

Dtype = jnp.dtype | type

_GN_EPS = 1e-6


def downsample_factor(ch_mult: Sequence[int]) -> int:
    """Spatial reduction factor of an encoder with these channel multipliers: 2^(levels-1)."""
    if len(ch_mult) == 0:
        raise ValueError("ch_mult is empty; give at least one channel multiplier, e.g. (1, 2, 4).")
    return 2 ** (len(ch_mult) - 1)


def check_resolution(height: int, width: int, ch_mult: Sequence[int]) -> None:
    """Raise ValueError unless both image sides are divisible by the downsample factor."""
    factor = downsample_factor(ch_mult)
    if height % factor or width % factor:
        raise ValueError(
            f"input resolution {height}x{width} is not divisible by the downsample factor {factor} "
            f"(ch_mult={tuple(ch_mult)} has {len(ch_mult)} levels); resize or crop the images to "
            f"a multiple of {factor}, or use fewer ch_mult levels."
        )


def has_attention(
    level: int, height: int, attn_resolutions: Sequence[int], attn_levels: Sequence[int]
) -> bool:
    """Whether the res blocks of `level` (feature maps `height` high) are followed by attention:
    by level when `attn_levels` is non-empty, else by the current resolution."""
    if attn_levels:
        return level in attn_levels
    return height in attn_resolutions


def check_attn_levels(attn_levels: Sequence[int], ch_mult: Sequence[int]) -> None:
    """Raise ValueError if an attention level is not an index into ch_mult."""
    bad = [lv for lv in attn_levels if not 0 <= lv < len(ch_mult)]
    if bad:
        raise ValueError(
            f"attn_levels={tuple(attn_levels)} holds {bad}, not a level of ch_mult="
            f"{tuple(ch_mult)}; use indices 0..{len(ch_mult) - 1} (0 = full resolution)."
        )


def _check_groups(channels: int, num_groups: int, what: str) -> None:
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"{what} has {channels} channels, not divisible by num_groups={num_groups}; choose "
            f"num_groups dividing every channel count (e.g. a divisor of ch) or change ch/ch_mult."
        )


def _conv3x3(features: int, dtype: Dtype, name: str | None) -> nn.Conv:
    return kernels.conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def conv1x1(features: int, dtype: Dtype, name: str | None) -> nn.Conv:
    """A per-position linear map as a 1x1 conv (float32 parameters)."""
    return kernels.conv(features, (1, 1), padding=((0, 0), (0, 0)), dtype=dtype, name=name)


def _group_norm(
    num_groups: int, dtype: Dtype, name: str | None = None, swish: bool = False
) -> GroupNorm:
    """GroupNorm (then swish), computed by the installed GroupNorm kernel (nets.kernels)."""
    return GroupNorm(num_groups, _GN_EPS, dtype, swish=swish, name=name)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv(drop(swish(gn(conv(swish(gn(x))))))).

    A 1x1 ``nin_shortcut`` conv projects the input only when the channel count changes, so a block
    with equal in/out channels has an exact identity skip path.
    """

    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_channels = x.shape[-1]
        _check_groups(in_channels, self.num_groups, "ResnetBlock input")
        _check_groups(self.out_channels, self.num_groups, "ResnetBlock output")
        h = _group_norm(self.num_groups, self.dtype, "norm1", True)(x)
        h = _conv3x3(self.out_channels, self.dtype, "conv1")(h)
        h = _group_norm(self.num_groups, self.dtype, "norm2", True)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if in_channels != self.out_channels:
            x = conv1x1(self.out_channels, self.dtype, "nin_shortcut")(x)
        return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions, with a residual connection.

    q/k/v/proj_out are per-position linear maps (equivalent to 1x1 convs). Logits are scaled by
    C^-0.5 and the softmax runs in float32 for stability under bf16 compute.
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        _check_groups(c, self.num_groups, "AttnBlock input")

        def dense(name: str) -> nn.Dense:
            return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        hn = _group_norm(self.num_groups, self.dtype, "norm")(x)
        q = dense("q")(hn).reshape(b, h * w, c)
        k = dense("k")(hn).reshape(b, h * w, c)
        v = dense("v")(hn).reshape(b, h * w, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c**-0.5), axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
        out = dense("proj_out")(out)
        return x.astype(out.dtype) + out


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv on an input padded by one pixel bottom/right only.

    The asymmetric ((0, 1), (0, 1)) padding gives exactly H/2 x W/2 for even sizes.
    """

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(
                f"Downsample needs even height and width, got {x.shape[1]}x{x.shape[2]}; "
                "make the input resolution divisible by the encoder's downsample factor."
            )
        return kernels.conv(
            self.channels, (3, 3), (2, 2), ((0, 1), (0, 1)), dtype=self.dtype, name="conv"
        )(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv3x3(self.channels, self.dtype, "conv")(x)


def _middle(owner: nn.Module, h: jax.Array, train: bool) -> jax.Array:
    """The middle section both Encoder and Decoder share: res block, attention, res block, at
    the input's channel count. Called from the owner's compact method, so the submodules are
    the owner's (names mid_block_1, mid_attn_1, mid_block_2)."""
    ch = h.shape[-1]
    args = (owner.dropout, owner.num_groups, owner.dtype)
    h = ResnetBlock(ch, *args, name="mid_block_1")(h, train)
    h = AttnBlock(owner.num_groups, owner.dtype, name="mid_attn_1")(h)
    return ResnetBlock(ch, *args, name="mid_block_2")(h, train)


def _level(
    owner: nn.Module, h: jax.Array, train: bool, level: int, blocks: int, prefix: str
) -> jax.Array:
    """One resolution level of Encoder or Decoder: `blocks` res blocks at ch * ch_mult[level]
    channels, each followed by attention where `has_attention` says (names
    {prefix}_{level}_block_{j}, {prefix}_{level}_attn_{j}; the owner's submodules)."""
    for j in range(blocks):
        h = ResnetBlock(
            owner.ch * owner.ch_mult[level],
            owner.dropout,
            owner.num_groups,
            owner.dtype,
            name=f"{prefix}_{level}_block_{j}",
        )(h, train)
        if has_attention(level, h.shape[1], owner.attn_resolutions, owner.attn_levels):
            h = AttnBlock(owner.num_groups, owner.dtype, name=f"{prefix}_{level}_attn_{j}")(h)
    return h


class Encoder(nn.Module):
    """Image [B, H, W, C] -> latent [B, H/f, W/f, z_channels] (float32), f = 2^(len(ch_mult)-1).

    Parameter names: conv_in, down_{i}_block_{j}, down_{i}_attn_{j}, down_{i}_downsample,
    mid_block_1, mid_attn_1, mid_block_2, norm_out, conv_out.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attn_levels: Sequence[int] = ()  # non-empty: attention by level, attn_resolutions unused

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Encoder expects NHWC images [B, H, W, C], got shape {x.shape}.")
        check_resolution(x.shape[1], x.shape[2], self.ch_mult)
        check_attn_levels(self.attn_levels, self.ch_mult)
        for m in self.ch_mult:
            _check_groups(self.ch * m, self.num_groups, f"Encoder level with ch*{m}")

        h = _conv3x3(self.ch, self.dtype, "conv_in")(x.astype(self.dtype))
        last = len(self.ch_mult) - 1
        for i in range(len(self.ch_mult)):
            h = _level(self, h, train, i, self.num_res_blocks, "down")
            if i != last:
                h = Downsample(h.shape[-1], self.dtype, name=f"down_{i}_downsample")(h)

        h = _middle(self, h, train)
        h = _group_norm(self.num_groups, self.dtype, "norm_out", True)(h)
        h = _conv3x3(self.z_channels, self.dtype, "conv_out")(h)
        return h.astype(jnp.float32)


class Decoder(nn.Module):
    """Latent [B, h, w, z] -> image [B, h*f, w*f, out_channels] (float32); mirrors ``Encoder``.

    Parameter names: conv_in, mid_block_1, mid_attn_1, mid_block_2, up_{i}_block_{j} (i = level
    index into ch_mult, j < num_res_blocks + 1), up_{i}_attn_{j}, up_{i}_upsample, norm_out,
    conv_out. ``conv_out`` is the last layer (3x3, padding 1); the VQGAN adaptive GAN weight
    differentiates through its kernel. Its input is sown as ``intermediates/conv_out_input``.
    """

    ch: int = 128
    out_channels: int = 3
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attn_levels: Sequence[int] = ()  # non-empty: attention by level, attn_resolutions unused

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if z.ndim != 4:
            raise ValueError(f"Decoder expects NHWC latents [B, h, w, C], got shape {z.shape}.")
        downsample_factor(self.ch_mult)  # validates ch_mult is non-empty
        check_attn_levels(self.attn_levels, self.ch_mult)
        for m in self.ch_mult:
            _check_groups(self.ch * m, self.num_groups, f"Decoder level with ch*{m}")

        block_ch = self.ch * self.ch_mult[-1]
        h = _conv3x3(block_ch, self.dtype, "conv_in")(z.astype(self.dtype))
        h = _middle(self, h, train)

        for i in reversed(range(len(self.ch_mult))):
            h = _level(self, h, train, i, self.num_res_blocks + 1, "up")
            if i != 0:
                h = Upsample(h.shape[-1], self.dtype, name=f"up_{i}_upsample")(h)

        h = _group_norm(self.num_groups, self.dtype, "norm_out", True)(h)
        # Input of the last layer, recorded only when "intermediates" is mutable: with it the
        # adaptive GAN weight gets d(loss)/d(conv_out kernel) without a second decoder backward.
        self.sow("intermediates", "conv_out_input", h)
        h = _conv3x3(self.out_channels, self.dtype, "conv_out")(h)
        return h.astype(jnp.float32)
