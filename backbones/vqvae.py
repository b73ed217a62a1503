"""The ``vqvae`` tokenizer: a convolutional VQ-VAE trained with a pixel (MSE) loss, no GAN.

Encoder and decoder are stacks of residual blocks (no attention), with ``len(ch_mult) - 1``
stride-2 downsamplings; 1×1 convs map the conv width ``z_channels`` to the code width
``embed_dim`` and back. Any registered quantizer can sit in the middle.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import LossOutput, Quantized

from .tokenizer_base import QuantizerSpec, VQTokenizer, zero_like_loss


class VQVAE(VQTokenizer):
    """VQ-VAE (van den Oord et al. 2017): ``L = pixel_weight·MSE(x̂, x) + codebook_weight·L_q``.

    Args:
        quantizer: registry name (or factory) of the quantizer, built with ``dim=embed_dim``.
        quantizer_config: the quantizer's settings (e.g. ``{"num_codes": 1024}``).
        embed_dim: code width D.
        z_channels: width of the encoder output / decoder input.
        ch, ch_mult, num_res_blocks: conv widths ``ch·ch_mult[i]`` per level, blocks per level;
            the downsampling factor is ``2**(len(ch_mult) - 1)``.
        dropout: dropout inside the residual blocks.
        pixel_weight: weight of the MSE reconstruction term.
        codebook_weight: weight of the quantizer's loss.
    """

    def __init__(self, quantizer: QuantizerSpec = "vq", quantizer_config: Mapping[str, Any] | None = None,
                 embed_dim: int = 256, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 dropout: float = 0.0, pixel_weight: float = 1.0, codebook_weight: float = 1.0):
        args = dict(locals())
        super().__init__(quantizer=quantizer, quantizer_config=quantizer_config, embed_dim=embed_dim,
                         z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         resolution=0, attn_resolutions=(), mid_attn=False, dropout=dropout)
        self.pixel_weight = float(pixel_weight)
        self.codebook_weight = float(codebook_weight)
        self._finish_config(args)

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized,
                       step: int) -> LossOutput:
        """MSE reconstruction + quantizer loss; ``step`` is unused (no schedule)."""
        rec = F.mse_loss(reconstruction.float(), x.float())
        quant = quantized.loss.float()
        total = self.pixel_weight * rec + self.codebook_weight * quant
        zero = zero_like_loss(rec)
        logs = {"rec": rec.detach(), "perceptual": zero, "quant": quant.detach(), "g_gan": zero,
                "d_weight": zero, "total": total.detach()}
        return LossOutput(total, logs)


@hookimpl
def register_backbones(register: Any) -> None:
    register("vqvae", VQVAE)


__all__ = ["VQVAE"]
