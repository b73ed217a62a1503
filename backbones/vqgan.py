"""The ``vqgan`` tokenizer: taming-style autoencoder + L1/perceptual + hinge PatchGAN.

Generator objective (one forward per batch; ``x̂`` is that forward's reconstruction)::

    L_rec = pixel_weight·|x − x̂|₁ + perceptual_weight·P(x, x̂)
    L_G   = L_rec + codebook_weight·L_q + λ·disc_factor·(−E[D(x̂)])
    λ     = disc_weight · clamp(‖∇_w L_rec‖ / (‖∇_w L_GAN‖ + 1e-4), 0, 1e4)

with ``w`` the decoder's last conv weight, and ``disc_factor = 0`` before ``disc_start``.
The discriminator sees the *detached* reconstruction; the generator's pass through it uses
detached discriminator weights, so the generator objective never leaves gradients on them.

CVQ is this backbone with the ``cvq`` quantizer (``gin/backbones/cvq_backbone.gin``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lgvq_plugins import api
from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import LossOutput, Quantized

from .discriminator import D_LOSSES, NLayerDiscriminator, adopt_weight
from .tokenizer_base import QuantizerSpec, VQTokenizer, zero_like_loss

_PERCEPTUAL = "perceptual_loss."


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """``disc_weight · clamp(‖∇L_rec‖ / (‖∇L_gan‖ + 1e-4), 0, 1e4)`` at ``last_layer``, detached.

    Balances the GAN gradient against the reconstruction gradient where both enter the
    decoder. 0 when either loss carries no gradient (eval, ``torch.no_grad``) or does not
    reach ``last_layer``.
    """
    zero = torch.zeros((), device=last_layer.device)
    if not (torch.is_grad_enabled() and rec_loss.requires_grad and gan_loss.requires_grad):
        return zero
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True, allow_unused=True)
    if rec_grad is None or gan_grad is None:
        return zero
    ratio = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return (ratio.clamp(0.0, 1e4) * disc_weight).detach()


class VQGAN(VQTokenizer):
    """VQ-GAN (Esser et al. 2021) with any registered quantizer.

    Args:
        quantizer: registry name (or factory) of the quantizer, built with ``dim=embed_dim``.
        quantizer_config: the quantizer's settings (e.g. ``{"num_codes": 1024}``).
        embed_dim: code width D.
        z_channels: width of the encoder output / decoder input.
        ch, ch_mult, num_res_blocks: conv widths ``ch·ch_mult[i]`` per level, blocks per level;
            downsampling factor ``2**(len(ch_mult) - 1)``.
        attn_resolutions: feature-map sides (for ``resolution``-sized inputs) that get
            self-attention; the middle block always has it.
        resolution: image side the attention placement refers to.
        dropout: dropout inside the residual blocks.
        pixel_weight: weight of the L1 term.
        perceptual: registered perceptual loss, ``"none"`` (quick start) or ``"lpips"``.
        perceptual_weight: its weight (taming / LG-VQ: 1.0).
        perceptual_config: settings for the perceptual loss (e.g. ``{"backbone_weights": path}``).
        codebook_weight: weight of the quantizer's loss.
        disc_start: first step with the GAN terms (generator and discriminator).
        disc_weight: multiplies the adaptive weight λ.
        disc_factor: GAN factor once started.
        disc_loss: ``"hinge"`` or ``"vanilla"``.
        disc_ndf, disc_n_layers, disc_norm: PatchGAN width, depth and norm (``"batch"``/``"act"``).
    """

    def __init__(self, quantizer: QuantizerSpec = "vq", quantizer_config: Mapping[str, Any] | None = None,
                 embed_dim: int = 256, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), resolution: int = 256, dropout: float = 0.0,
                 pixel_weight: float = 1.0, perceptual: str = "none", perceptual_weight: float = 1.0,
                 perceptual_config: Mapping[str, Any] | None = None, codebook_weight: float = 1.0,
                 disc_start: int = 10000, disc_weight: float = 0.8, disc_factor: float = 1.0,
                 disc_loss: str = "hinge", disc_ndf: int = 64, disc_n_layers: int = 3,
                 disc_norm: str = "batch"):
        args = dict(locals())
        super().__init__(quantizer=quantizer, quantizer_config=quantizer_config, embed_dim=embed_dim,
                         z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         resolution=resolution, attn_resolutions=attn_resolutions, mid_attn=True,
                         dropout=dropout)
        if disc_loss not in D_LOSSES:
            raise ValueError(f"vqgan.disc_loss={disc_loss!r} is not one of {sorted(D_LOSSES)}")
        self.pixel_weight = float(pixel_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.codebook_weight = float(codebook_weight)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self._d_loss = D_LOSSES[disc_loss]
        self.perceptual_loss = api.create_perceptual_loss(perceptual, **dict(perceptual_config or {}))
        # weight files of the perceptual network are paths of this machine: never saved
        self.lgvq_local_settings = tuple(f"perceptual_config.{key}" for key in
                                         getattr(self.perceptual_loss, "lgvq_local_settings", ()))
        self.discriminator = NLayerDiscriminator(3, ndf=disc_ndf, n_layers=disc_n_layers, norm=disc_norm)
        # The perceptual network is a frozen loss, not part of the tokenizer: keep it out of
        # checkpoints (LPIPS-VGG alone is ~58 MB) and don't expect it when loading them.
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_perceptual_keys)
        self._finish_config(args)

    # -- objectives -------------------------------------------------------------------
    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def _logits_without_disc_grads(self, images: Tensor) -> Tensor:
        """D(images) with the discriminator's weights detached: gradients reach ``images``
        (the generator) but never accumulate on the discriminator."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (images,))

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized,
                       step: int) -> LossOutput:
        x32, rec32 = x.float(), reconstruction.float()
        l1 = (x32 - rec32).abs().mean()
        if getattr(self.perceptual_loss, "active", True) and self.perceptual_weight > 0:
            perceptual = self.perceptual_loss(x32, rec32).float().mean()
        else:
            perceptual = zero_like_loss(l1)
        rec = self.pixel_weight * l1 + self.perceptual_weight * perceptual
        quant = quantized.loss.float()
        total = rec + self.codebook_weight * quant

        zero = zero_like_loss(l1)
        disc_factor = adopt_weight(step, self.disc_start, self.disc_factor)
        g_loss, d_weight, gan = zero, zero, zero
        if disc_factor > 0:
            g_loss = -self._logits_without_disc_grads(reconstruction).float().mean()
            d_weight = adaptive_weight(rec, g_loss, self.last_layer, self.disc_weight)
            gan = d_weight * disc_factor * g_loss
            total = total + gan
        logs = {"rec": rec.detach(), "l1": l1.detach(), "perceptual": perceptual.detach(),
                "quant": quant.detach(), "g_loss": g_loss.detach(), "g_gan": gan.detach(),
                "d_weight": d_weight, "disc_factor": torch.tensor(disc_factor),
                "total": total.detach()}
        return LossOutput(total, logs)

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor, step: int) -> LossOutput:
        """Hinge (or vanilla) loss on real ``x`` and the detached reconstruction. Before
        ``disc_start`` a constant 0 that needs no backward (check ``loss.requires_grad``)."""
        disc_factor = adopt_weight(step, self.disc_start, self.disc_factor)
        if disc_factor == 0:
            # Off: no forward, and a constant zero (requires_grad False) so the caller skips the
            # backward. Leaving the gradients None (rather than zeros) keeps Adam's step count
            # and moments untouched until the discriminator really starts training.
            zero = zero_like_loss(x)
            return LossOutput(zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero,
                                     "disc_factor": torch.tensor(0.0)})
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(reconstruction.detach()).float()
        loss = disc_factor * self._d_loss(logits_real, logits_fake)
        return LossOutput(loss, {"d_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                                 "logits_fake": logits_fake.mean().detach(),
                                 "disc_factor": torch.tensor(disc_factor)})


def _drop_perceptual_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                          local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _PERCEPTUAL)]:
        del state_dict[key]


def _ignore_perceptual_keys(module: nn.Module, incompatible_keys: Any) -> None:
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if _PERCEPTUAL not in k]


@hookimpl
def register_backbones(register: Any) -> None:
    register("vqgan", VQGAN)


__all__ = ["VQGAN", "adaptive_weight"]
