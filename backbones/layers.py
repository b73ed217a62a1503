"""Convolutional encoder/decoder blocks shared by the built-in tokenizers.

The layout follows the taming-transformers VQ-GAN autoencoder: a stack of resolution
levels, each with ``num_res_blocks`` residual blocks (GroupNorm + swish) and optional
self-attention, a stride-2 downsample between levels, and a middle block
``res → attn → res`` at the lowest resolution. The decoder mirrors it with nearest-neighbour
upsampling. VQ-VAE uses the same blocks with attention switched off.

Shapes: ``x`` (B, 3, H, W) → encoder → (B, z_channels, H/f, W/f) with ``f = 2**(len(ch_mult)-1)``.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with at most ``num_groups`` groups that divide ``channels``.

    taming uses 32 groups; tiny test models (16 channels) need fewer, so we fall back to the
    largest divisor rather than failing.
    """
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm → swish → 3×3 conv) × 2, with a 1×1
    shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Spatial self-attention over the h·w positions (one head, as in taming), residual.

    The projections are timm's :class:`~timm.layers.Attention` (fused scaled-dot-product
    attention when available); a 1×1 conv q/k/v is the same map as a linear layer applied
    per position, so we flatten the grid into tokens.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, num_heads=num_heads, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        out = self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3×3 conv with asymmetric (0, 1, 0, 1) padding: H → ⌊H/2⌋ exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv (avoids checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int) -> None:
    if ch <= 0 or num_res_blocks < 0 or not ch_mult or any(m <= 0 for m in ch_mult):
        raise ValueError(
            f"invalid architecture: ch={ch}, ch_mult={tuple(ch_mult)}, num_res_blocks={num_res_blocks}; "
            "ch and every ch_mult entry must be positive, ch_mult non-empty, num_res_blocks >= 0"
        )


def level_resolutions(resolution: int, num_levels: int) -> list[int]:
    """Feature-map side length at each level for an input of side ``resolution``."""
    sizes = [resolution]
    for _ in range(num_levels - 1):
        sizes.append(sizes[-1] // 2)
    return sizes


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → latents (B, z_channels, H/f, W/f).

    Args:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per level; ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per level.
        z_channels: output width.
        resolution: input side length the attention placement refers to.
        attn_resolutions: feature-map side lengths at which self-attention is inserted.
        mid_attn: attention in the middle block (VQ-GAN: yes; VQ-VAE: no).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 resolution: int, attn_resolutions: Sequence[int] = (), mid_attn: bool = True,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks)
        widths = [ch * m for m in ch_mult]
        sizes = level_resolutions(resolution, len(ch_mult))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, (width, size) in enumerate(zip(widths, sizes)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, width, dropout))
                block_in = width
                stage.attn.append(AttnBlock(width) if size in attn_resolutions else nn.Identity())
            stage.downsample = Downsample(block_in) if level < len(ch_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout),
            AttnBlock(block_in) if mid_attn else nn.Identity(),
            ResnetBlock(block_in, block_in, dropout),
        )
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block, attn in zip(stage.block, stage.attn):
                h = attn(block(h))
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) → image (B, out_channels, h·f, w·f); mirrors :class:`Encoder`
    with ``num_res_blocks + 1`` blocks per level. ``conv_out.weight`` is the "last layer" of
    the VQ-GAN adaptive weight."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 resolution: int, attn_resolutions: Sequence[int] = (), mid_attn: bool = True,
                 out_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks)
        widths = [ch * m for m in ch_mult]
        sizes = level_resolutions(resolution, len(ch_mult))
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout),
            AttnBlock(block_in) if mid_attn else nn.Identity(),
            ResnetBlock(block_in, block_in, dropout),
        )
        # Built lowest resolution first, in the order the forward pass runs.
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], dropout))
                block_in = widths[level]
                stage.attn.append(AttnBlock(block_in) if sizes[level] in attn_resolutions else nn.Identity())
            stage.upsample = Upsample(block_in) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for block, attn in zip(stage.block, stage.attn):
                h = attn(block(h))
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def downsample_factor(ch_mult: Sequence[int]) -> int:
    """Spatial reduction of an :class:`Encoder` with these multipliers."""
    return 2 ** (len(ch_mult) - 1)


def latent_grid(image_size: int | tuple[int, int], ch_mult: Sequence[int]) -> tuple[int, int]:
    """(h, w) an :class:`Encoder` produces for an image of ``image_size`` (side or (H, W)):
    every :class:`Downsample` maps n → ⌊n/2⌋."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps = len(ch_mult) - 1
    return H >> steps, W >> steps


__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample",
           "downsample_factor", "group_norm", "latent_grid", "level_resolutions"]

