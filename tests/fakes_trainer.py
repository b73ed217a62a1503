"""Small stand-ins meeting the contracts in ``lgvq_plugins/interfaces.py``, for trainer tests.

They are real (if tiny) models: a conv tokenizer with a nearest-code quantizer and an
optional hinge discriminator, a guidance wrapper adding one caption-dependent loss, and a
deterministic data set of coloured squares. Register them with :func:`registered_fakes`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import lgvq_plugins
from lgvq_plugins.interfaces import GuidedOutput, LossOutput, Quantized


class FakeQuantizer(nn.Module):
    """Nearest-code VQ with a straight-through estimator and a learned codebook."""

    def __init__(self, dim: int, num_codes: int = 16, beta: float = 0.25):
        super().__init__()
        self.dim, self.num_codes, self.beta = dim, num_codes, beta
        self.embedding = nn.Parameter(torch.randn(num_codes, dim) * 0.5)

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def embed(self, indices: Tensor) -> Tensor:
        return self.embedding[indices].permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> Quantized:
        z = z.float()
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        idx = torch.cdist(flat, self.embedding).argmin(dim=1)
        zq = self.embedding[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        p = counts / counts.sum()
        stats = {"perplexity": torch.exp(-(p * p.clamp_min(1e-10).log()).sum()).detach(),
                 "usage": (counts > 0).float().mean().detach()}
        zq = z + (zq - z).detach() if self.training else zq
        return Quantized(zq, idx.view(b, h, w), loss, stats)


class FakeTokenizer(nn.Module):
    """Conv encoder (÷4) → FakeQuantizer → conv decoder; L1 + quantizer loss, and with
    ``disc=True`` a tiny hinge discriminator whose GAN term starts at ``disc_start``."""

    def __init__(self, embed_dim: int = 8, num_codes: int = 16, width: int = 16, disc: bool = False,
                 disc_start: int = 0, disc_weight: float = 0.1):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, num_codes=num_codes, width=width, disc=disc,
                           disc_start=disc_start, disc_weight=disc_weight)
        self.embed_dim = embed_dim
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, embed_dim, 4, 2, 1))
        self.quantizer = FakeQuantizer(embed_dim, num_codes)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(embed_dim, width, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, 3, 4, 2, 1))
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.discriminator = (nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 1, 1))
                              if disc else None)

    def grid(self, image_size):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return h // 4, w // 4

    def encode(self, x: Tensor) -> Quantized:
        return self.quantizer(self.encoder(x))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.embed(indices))

    def forward(self, x: Tensor):
        q = self.encode(x)
        return self.decode(q.z_q), q

    def generator_loss(self, x, reconstruction, quantized, step) -> LossOutput:
        rec = (x - reconstruction).abs().mean()
        loss = rec + quantized.loss
        logs = {"rec_loss": rec.detach(), "q_loss": quantized.loss.detach()}
        if self.discriminator is not None and step >= self.disc_start:
            g = -self.discriminator(reconstruction).mean()
            loss = loss + self.disc_weight * g
            logs["g_loss"] = g.detach()
        return LossOutput(loss, logs)

    def discriminator_loss(self, x, reconstruction, step) -> LossOutput | None:
        if self.discriminator is None:
            return None
        real, fake = self.discriminator(x), self.discriminator(reconstruction)
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return LossOutput(loss, {"logits_real": real.mean().detach()})

    def discriminator_parameters(self):
        return list(self.discriminator.parameters()) if self.discriminator is not None else []


class FakeGuided(nn.Module):
    """LanguageGuided stand-in: one alignment loss pulling the mean code towards a learned
    embedding of the caption length (so the loss depends on the text and on z_q).

    ``dropout`` (drawn from the global torch RNG) and ``noise`` (drawn from a private
    ``torch.Generator`` that is not in the ``state_dict``, like a quantizer's anchor stream)
    make training random, so an exact resume needs both kinds of RNG state restored.
    """

    def __init__(self, tokenizer: nn.Module, enabled: bool = True, weight: float = 0.1,
                 dropout: float = 0.0, noise: float = 0.0):
        super().__init__()
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.weight = weight
        self.head = nn.Linear(tokenizer.embed_dim, 4)
        self.dropout = nn.Dropout(dropout)
        self.noise = noise
        self.noise_generator = torch.Generator().manual_seed(99)
        self.config = {"enabled": enabled, "weight": weight, "dropout": dropout, "noise": noise}

    def guidance_parameters(self):
        return list(self.head.parameters())

    def forward(self, images: Tensor, captions: list[str], batch: Mapping[str, Any]) -> GuidedOutput:
        rec, q = self.tokenizer(images)
        out = GuidedOutput(reconstruction=rec, quantized=q)
        if self.enabled:
            target = torch.tensor([len(c) % 4 for c in captions], device=images.device)
            feats = self.dropout(q.z_q.float().mean(dim=(2, 3)))
            if self.noise and self.training:
                feats = feats + self.noise * torch.randn(feats.shape, generator=self.noise_generator).to(feats.device)
            raw = F.cross_entropy(self.head(feats), target)
            out.raw_losses = {"align": raw}
            out.losses = {"align": self.weight * raw}
        return out


class FakeShapes(Dataset):
    """Deterministic coloured squares on a dark background with a caption naming the colour."""

    COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
               "yellow": (1.0, 1.0, -1.0)}

    def __init__(self, split: str = "train", size: int = 64, image_size: int = 16):
        self.split, self.size, self.image_size = split, size, image_size
        self.epoch = 0
        offset = 0 if split == "train" else 10_000
        g = torch.Generator().manual_seed(1234 + offset)
        n = size
        self.colour = torch.randint(0, 4, (n,), generator=g)
        self.pos = torch.randint(0, image_size // 2, (n, 2), generator=g)
        self.extent = torch.randint(image_size // 4, image_size // 2 + 1, (n,), generator=g)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.image_size
        img = torch.full((3, s, s), -0.8)
        name = list(self.COLOURS)[int(self.colour[i])]
        y, x = self.pos[i].tolist()
        e = int(self.extent[i])
        img[:, y:y + e, x:x + e] = torch.tensor(self.COLOURS[name])[:, None, None]
        caption = f"a {name} square" if (i + self.epoch) % 2 == 0 else f"one {name} box here"
        return {"image": img, "caption": caption, "index": i}


def fake_tokenizer(**kwargs) -> FakeTokenizer:
    return FakeTokenizer(**kwargs)


def fake_shapes(split: str = "train", **kwargs) -> FakeShapes:
    return FakeShapes(split=split, **kwargs)


@contextlib.contextmanager
def registered_fakes() -> Iterator[None]:
    """Register ``fake_vq`` (backbone) and ``fake_shapes`` (dataset) for the duration."""
    host = lgvq_plugins.get_host()

    class _Plugin:
        @staticmethod
        @lgvq_plugins.hookspecs.hookimpl
        def register_backbones(register):
            register("fake_vq", FakeTokenizer)

        @staticmethod
        @lgvq_plugins.hookspecs.hookimpl
        def register_datasets(register):
            register("fake_shapes", fake_shapes)

    name = host.register_plugin(_Plugin, name="tests.fakes_trainer")
    try:
        yield
    finally:
        host.unregister_plugin(name)
