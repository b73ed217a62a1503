"""``vq``: the vector quantizer of VQ-VAE / VQ-GAN, with the usual options.

* nearest code by squared L2 or cosine distance, searched in bounded memory
  (:mod:`lgvq_plugins.backbones.quant_search`), always in fp32 — autocast is switched off
  inside the quantizer and the latents are cast to float;
* straight-through estimator;
* codebook + β·commitment loss (taming's ``legacy`` β placement selectable);
* optional EMA codebook (VQ-VAE-2 / Sonnet style, Laplace-smoothed cluster sizes), whose
  sums are all-reduced under DDP so every rank holds the same codebook;
* optional factorised codes (ViT-VQGAN): a linear map to a low ``code_dim``, l2-normalised
  lookup there, and a linear map back to ``dim``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import Quantized

from .quant_base import CodebookQuantizer, from_rows, to_rows, usage_stats, vq_loss
from .quant_search import DEFAULT_CHUNK_SIZE, nearest_codes

Distance = Literal["l2", "cosine"]


class VectorQuantizer(CodebookQuantizer):
    """Nearest-code quantizer with a straight-through estimator.

    Args:
        dim: D, the latent width (channels of the encoder output).
        num_codes: K, codebook size.
        beta: weight of the commitment term. The loss is
            ``‖sg(x) − q‖² + β·‖x − sg(q)‖²`` (means over elements), where ``x`` are the
            latents in lookup space and ``q`` their nearest codes.
        distance: ``"l2"`` (squared Euclidean on raw vectors) or ``"cosine"`` (latents and
            codes are l2-normalised, and ``z_q`` is the normalised code).
        legacy: taming's ``legacy=True`` placement: ``β·‖sg(x) − q‖² + ‖x − sg(q)‖²``, i.e.
            β weighs the *codebook* term and the commitment term has weight 1.
        ema: update the codebook by exponential moving averages of the assigned latents
            instead of by gradient. The codebook is then a buffer (no gradient), and ``loss``
            is only ``β·‖x − sg(q)‖²``. Cannot be combined with ``legacy``.
        ema_decay: decay of the cluster-size and sum averages.
        ema_eps: Laplace smoothing of the cluster sizes (keeps unused codes finite).
        code_dim: if set, factorised codes: ``Linear(dim→code_dim)``, l2-normalise, look up
            among l2-normalised ``code_dim`` codes, ``Linear(code_dim→dim)`` back. Implies
            cosine lookup in the low-dimensional space.
        chunk_size: the most entries of the N×K distance matrix computed at once.
    """

    def __init__(
        self,
        dim: int,
        num_codes: int = 1024,
        beta: float = 0.25,
        distance: Distance = "l2",
        legacy: bool = False,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        code_dim: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__(dim, num_codes, chunk_size)
        if distance not in ("l2", "cosine"):
            raise ValueError(f"vq distance must be 'l2' or 'cosine', got {distance!r}")
        if ema and legacy:
            raise ValueError("vq: legacy=True only moves β between the codebook and commitment "
                             "terms, and with ema=True there is no codebook term; set one of them "
                             "to False")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"vq ema_decay must be in [0, 1), got {ema_decay}")
        if code_dim is not None and code_dim < 1:
            raise ValueError(f"vq code_dim must be a positive width or None, got {code_dim}")
        self.beta, self.distance, self.legacy = float(beta), distance, bool(legacy)
        self.ema, self.ema_decay, self.ema_eps = bool(ema), float(ema_decay), float(ema_eps)
        self.code_dim = None if code_dim is None else int(code_dim)
        self.config: dict[str, Any] = {
            "dim": self.dim, "num_codes": self.num_codes, "beta": self.beta,
            "distance": distance, "legacy": self.legacy, "ema": self.ema,
            "ema_decay": self.ema_decay, "ema_eps": self.ema_eps, "code_dim": self.code_dim,
            "chunk_size": self.chunk_size,
        }

        lookup_dim = self.code_dim or self.dim
        # taming's initialisation; for the normalised variants only the direction matters.
        weight = torch.empty(num_codes, lookup_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if self.code_dim is not None:
            self.project_in = nn.Linear(self.dim, self.code_dim)
            self.project_out = nn.Linear(self.code_dim, self.dim)
        if self.ema:
            self.register_buffer("weight", weight)
            # Cluster sizes start at one and the sums at the codes themselves, so the
            # smoothed ratio starts at the initial codebook and unused codes stay put.
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", weight.clone())
        else:
            self.weight = nn.Parameter(weight)

    # -- spaces ---------------------------------------------------------------------------
    @property
    def _normalised(self) -> bool:
        return self.distance == "cosine" or self.code_dim is not None

    def _to_lookup(self, rows: Tensor) -> Tensor:
        """(N, D) latents → (N, C) vectors in the space where codes are looked up."""
        if self.code_dim is not None:
            rows = self.project_in(rows)
        return F.normalize(rows, dim=-1) if self._normalised else rows

    def _from_lookup(self, rows: Tensor) -> Tensor:
        """(N, C) vectors in lookup space → (N, D) latents."""
        return self.project_out(rows) if self.code_dim is not None else rows

    @property
    def lookup_codebook(self) -> Tensor:
        """(K, C) codes in lookup space (normalised where the lookup is cosine), fp32."""
        weight = self.weight.float()
        return F.normalize(weight, dim=-1) if self._normalised else weight

    @property
    def codebook(self) -> Tensor:
        """(K, D) the codes as ``embed`` returns them (projected back to ``dim`` when
        ``code_dim`` is set)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._from_lookup(self.lookup_codebook)

    # -- forward --------------------------------------------------------------------------
    def forward(self, z: Tensor) -> Quantized:
        """(B, D, h, w) latents → :class:`Quantized` with ``z_q`` (B, D, h, w)."""
        out_dtype = self.weight.dtype
        with torch.autocast(z.device.type, enabled=False):
            rows, grid = to_rows(z.float(), self.dim)
            x = self._to_lookup(rows)  # (N, C)
            codes = self.lookup_codebook  # (K, C), carries the gradient when learned
            found = nearest_codes(x.detach(), codes.detach(), chunk_size=self.chunk_size)
            q = F.embedding(found.indices, codes)  # (N, C)

            if self.ema:
                loss = self.beta * F.mse_loss(x, q.detach())
            else:
                loss = vq_loss(x, q, self.beta, self.legacy)

            if self.training and self.ema:
                sums = torch.zeros_like(self.embed_sum).index_add_(0, found.indices, x.detach())
                counts, sums = self._count(found.indices, sums)
                self._ema_update(counts, sums)
            else:
                counts, _ = self._count(found.indices)

            # Straight-through in training; in eval the exact codes, so that
            # forward(z).z_q == embed(indices) bit for bit.
            q_out = x + (q - x).detach() if self.training else q
            z_q = from_rows(self._from_lookup(q_out), grid).to(out_dtype)
        indices = found.indices.view(grid)
        return Quantized(z_q, indices, loss, usage_stats(counts))

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """EMA of cluster sizes and sums (already summed over ranks), then
        ``codebook = sums / smoothed sizes``."""
        keep = self.ema_decay
        self.cluster_size.mul_(keep).add_(counts, alpha=1.0 - keep)
        self.embed_sum.mul_(keep).add_(sums, alpha=1.0 - keep)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.ema_eps) / (total + self.num_codes * self.ema_eps) * total
        self.weight.copy_(self.embed_sum / smoothed[:, None])

    def embed(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 indices → (B, D, h, w) codes."""
        with torch.autocast(self.weight.device.type, enabled=False):
            q = F.embedding(indices.reshape(-1), self.lookup_codebook)
            return from_rows(self._from_lookup(q), tuple(indices.shape)).to(self.weight.dtype)


@hookimpl
def register_quantizers(register):
    register("vq", VectorQuantizer)
