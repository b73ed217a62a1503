"""Tiny stand-ins that meet the contracts in ``lgvq_plugins.interfaces``, for fast tests.

* :class:`FakeTextEncoder` — a word-level frozen text encoder (hashing vocabulary,
  ``[CLS] words [SEP]`` then padding), with token width, global width and vocabulary
  embedding width all different, so every projection path is exercised.
* :class:`FakeTokenizer` — conv encoder (stride 4) → nearest-code quantizer with the
  straight-through estimator → conv decoder.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lgvq_plugins.interfaces import LossOutput, Quantized, TextFeatures, TextTokens


class FakeTextEncoder(nn.Module):
    """Frozen word-level text encoder. Ids: 0 pad, 1 [CLS], 2 [SEP], words hashed to 3..V-1."""

    PAD, CLS, SEP = 0, 1, 2

    def __init__(self, vocab_size: int = 64, max_length: int = 8, width: int = 32,
                 global_width: int = 24, embed_width: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.max_length = vocab_size, max_length
        self.width, self.global_width = width, global_width
        self.special_token_ids = frozenset({self.PAD, self.CLS, self.SEP})
        self.embedding = nn.Parameter(torch.randn(vocab_size, embed_width, generator=gen))
        self.position = nn.Parameter(torch.randn(max_length, width, generator=gen) * 0.1)
        self.to_width = nn.Parameter(torch.randn(embed_width, width, generator=gen) / embed_width ** 0.5)
        self.to_global = nn.Parameter(torch.randn(width, global_width, generator=gen) / width ** 0.5)
        self.requires_grad_(False)
        self.eval()
        self.identity = f"fake-text/v{vocab_size}-L{max_length}-w{width}-seed{seed}"
        self.encode_calls = 0  # how many captions went through encode()

    @property
    def vocab_embeddings(self) -> Tensor:
        return self.embedding

    def word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)

    def tokenize(self, captions: list[str]) -> TextTokens:
        rows, lengths = [], []
        for caption in captions:
            words = [self.word_id(w) for w in caption.lower().split()][: self.max_length - 2]
            ids = [self.CLS, *words, self.SEP]
            lengths.append(len(ids))
            rows.append(ids + [self.PAD] * (self.max_length - len(ids)))
        ids = torch.tensor(rows, dtype=torch.long)
        special = (ids == self.CLS) | (ids == self.SEP)
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        special &= torch.arange(self.max_length)[None] < lengths_t[:, None]
        return TextTokens(ids, lengths_t, special)

    @torch.no_grad()
    def encode(self, tokens: TextTokens) -> TextFeatures:
        tokens = tokens.to(self.embedding.device)
        self.encode_calls += tokens.ids.shape[0]
        x = self.embedding[tokens.ids] @ self.to_width + self.position[: tokens.ids.shape[1]]
        real = (~tokens.padding_mask).float()[..., None]
        context = (x * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
        feats = torch.tanh(x + 0.5 * context)
        pooled = (feats * real).sum(1) / real.sum(1).clamp_min(1)
        return TextFeatures(feats, pooled @ self.to_global, tokens)


class FakeQuantizer(nn.Module):
    """Nearest-code VQ with a straight-through output (codebook + 0.25·commitment loss)."""

    def __init__(self, dim: int, num_codes: int = 16):
        super().__init__()
        self.dim, self.num_codes = dim, num_codes
        self.embedding = nn.Parameter(torch.randn(num_codes, dim))

    @property
    def codebook(self) -> Tensor:
        return self.embedding

    def forward(self, z: Tensor) -> Quantized:
        b, _, h, w = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        indices = torch.cdist(flat, self.embedding).argmin(dim=1)
        q = self.embedding[indices]
        loss = F.mse_loss(q, flat.detach()) + 0.25 * F.mse_loss(flat, q.detach())
        z_q = flat + (q - flat).detach()
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        probs = counts / counts.sum()
        stats = {"perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()).detach(),
                 "usage": (counts > 0).float().mean()}
        return Quantized(rearrange(z_q, "(b h w) d -> b d h w", b=b, h=h, w=w),
                         indices.view(b, h, w), loss, stats)

    def embed(self, indices: Tensor) -> Tensor:
        return rearrange(self.embedding[indices], "b h w d -> b d h w")


class FakeTokenizer(nn.Module):
    """Two stride-2 convs down, quantize, two transposed convs up (grid = size / 4)."""

    def __init__(self, embed_dim: int = 8, num_codes: int = 16, image_size: int | None = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.config: dict[str, Any] = {"embed_dim": embed_dim, "num_codes": num_codes,
                                       "image_size": image_size}
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.GELU(), nn.Conv2d(16, embed_dim, 4, 2, 1))
        self.quantizer = FakeQuantizer(embed_dim, num_codes)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(embed_dim, 16, 4, 2, 1), nn.GELU(),
                                     nn.ConvTranspose2d(16, 3, 4, 2, 1))

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return h // 4, w // 4

    def encode(self, x: Tensor) -> Quantized:
        return self.quantizer(self.encoder(x))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.embed(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        quantized = self.encode(x)
        return self.decode(quantized.z_q), quantized

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized, step: int) -> LossOutput:
        rec = F.l1_loss(reconstruction, x)
        return LossOutput(rec + quantized.loss, {"rec": rec.detach(), "q": quantized.loss.detach()})

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor, step: int) -> LossOutput | None:
        return None

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return []


CAPTIONS = [
    "a red bird on a branch",
    "the woman is holding a racket",
    "small yellow bird",
    "a man with a beard",
]
