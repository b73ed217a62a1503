"""PatchGAN discriminator and GAN objectives for the VQ-GAN tokenizer.

The discriminator is the pix2pix "NLayer" PatchGAN: stride-2 4×4 convs doubling the width
(capped at 8·ndf), one stride-1 conv, and a 1-channel conv giving one logit per
overlapping patch. Weights are initialised as in DCGAN/pix2pix: convs N(0, 0.02), norm
scales N(1, 0.02), norm shifts 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` initialised from the first batch it sees so
    that the output has zero mean and unit variance per channel (Glow's ActNorm).

    Unlike BatchNorm it keeps no batch statistics, so the discriminator behaves the same on
    real and fake batches and in train and eval mode.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.eps = eps
        # a buffer so the "already initialised" flag is saved and restored with the weights
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (C, B·H·W)
        mean, std = flat.mean(1), flat.std(1)
        self.loc.copy_((-mean).view_as(self.loc))
        self.scale.copy_((1.0 / (std + self.eps)).view_as(self.scale))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return self.scale * (x + self.loc)


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "act": ActNorm,
}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
    # ActNorm is data-initialised on its first batch; nothing to do here.


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, in_channels, H, W) → (B, 1, H', W') logits, one per receptive-field patch.

    Args:
        in_channels: image channels.
        ndf: width of the first conv.
        n_layers: number of stride-2 convs (3 → a 70×70 receptive field).
        norm: ``"batch"`` (BatchNorm, as taming) or ``"act"`` (ActNorm).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"discriminator norm {norm!r} is not one of {sorted(_NORMS)}; "
                             "set vqgan.disc_norm accordingly")
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"discriminator needs n_layers >= 1 and ndf >= 1 (got {n_layers}, {ndf})")
        make_norm = _NORMS[norm]
        # A norm right after a conv makes the conv's bias redundant.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       make_norm(out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


# -- objectives ---------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[softplus(−D(x))] + E[softplus(D(x̂))]): the non-saturating BCE objective."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adopt_weight(step: int, start: int, value: float = 1.0) -> float:
    """``value`` from step ``start`` on, 0 before (GAN warm-up)."""
    return value if step >= start else 0.0


__all__ = ["ActNorm", "D_LOSSES", "NLayerDiscriminator", "adopt_weight", "hinge_d_loss",
           "vanilla_d_loss"]
