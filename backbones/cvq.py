"""``cvq``: the online clustered codebook of CVQ-VAE (Zheng & Vedaldi, ICCV 2023,
arXiv 2307.15139), the quantizer of LG-VQ's CVQ baseline.

A plain VQ codebook trained by gradient, plus, in every training step:

1. a usage average ``p_k ← decay·p_k + (1 − decay)·(fraction of the batch assigned to k)``;
2. an *anchor* per code, a feature of the current batch: the one ``closest`` to the code,
   a ``random`` one, or one drawn with probability ``softmax_n(sim(x_n, e_k))``
   (``probrandom``; ``sim`` is the cosine, or ``−‖x − e‖²`` for ``l2``);
3. ``e_k ← (1 − w_k)·e_k + w_k·anchor_k`` with ``w_k = exp(−p_k·K·10/(1 − decay) − 1e-3)``,
   so codes that are rarely used (p_k ≈ 0, w_k ≈ 1) jump to where the features are, while
   used codes (w_k ≈ 0) are left to the gradient;
4. optionally a contrastive term per code: its mean similarity to its ``max(1, N//K)`` most
   similar features against its ``N//2`` least similar ones, temperature 0.07.

Unlike the reference, everything is global under DDP: usage counts are all-reduced and
anchors come from the features of every rank — each rank proposes its best candidate per
code, the candidates are all-gathered, and every rank takes the same winner — so every rank
holds the same codebook after every step. The re-anchoring itself is not differentiable
(it writes the codebook in place after the loss was formed from the previous codes).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lgvq_plugins.training import distributed
from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import Quantized

from .quant_base import CodebookQuantizer, from_rows, to_rows, usage_stats, vq_loss
from .quant_search import DEFAULT_CHUNK_SIZE, nearest_codes

Anchor = Literal["closest", "random", "probrandom"]
Distance = Literal["l2", "cosine"]


class ClusteredVectorQuantizer(CodebookQuantizer):
    """CVQ-VAE quantizer: a VQ codebook whose dead codes are re-anchored to batch features.

    Args:
        dim: D, latent width.
        num_codes: K, codebook size.
        beta: commitment weight; loss ``‖sg(x) − q‖² + β·‖x − sg(q)‖²`` on the raw latents
            and codes (``legacy=True``: β on the codebook term instead, as taming's legacy).
        distance: ``"cosine"`` (the reference default: codes are chosen by cosine
            similarity, but ``z_q`` and the loss use the raw, unnormalised codes) or ``"l2"``.
        anchor: ``"closest"``, ``"random"`` or ``"probrandom"`` (see the module docstring),
            or ``None`` to switch re-anchoring off (a plain VQ).
        usage_decay: decay of the usage average ``p_k`` (the reference uses 0.99).
        contrastive: add the contrastive term (reference ``contras_loss``).
        contrastive_temperature: its temperature.
        first_batch: re-anchor only once, in the first training step (the reference's
            "offline" variant); by default every training step re-anchors.
        legacy: taming's legacy β placement (see ``beta``).
        chunk_size: the most entries of the N×K distance matrix computed at once.
        seed: seeds the anchor sampling (``random`` / ``probrandom``).
    """

    def __init__(
        self,
        dim: int,
        num_codes: int = 1024,
        beta: float = 0.25,
        distance: Distance = "cosine",
        anchor: Anchor | None = "probrandom",
        usage_decay: float = 0.99,
        contrastive: bool = False,
        contrastive_temperature: float = 0.07,
        first_batch: bool = False,
        legacy: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        seed: int = 0,
    ):
        super().__init__(dim, num_codes, chunk_size)
        if distance not in ("l2", "cosine"):
            raise ValueError(f"cvq distance must be 'l2' or 'cosine', got {distance!r}")
        if anchor not in ("closest", "random", "probrandom", None):
            raise ValueError(f"cvq anchor must be 'closest', 'random', 'probrandom' or None, got {anchor!r}")
        if not 0.0 < usage_decay < 1.0:
            raise ValueError(f"cvq usage_decay must be in (0, 1), got {usage_decay}")
        if contrastive_temperature <= 0:
            raise ValueError(f"cvq contrastive_temperature must be positive, got {contrastive_temperature}")
        self.beta, self.distance, self.anchor = float(beta), distance, anchor
        self.usage_decay, self.contrastive = float(usage_decay), bool(contrastive)
        self.contrastive_temperature = float(contrastive_temperature)
        self.first_batch, self.legacy, self.seed = bool(first_batch), bool(legacy), int(seed)
        self.config: dict[str, Any] = {
            "dim": self.dim, "num_codes": self.num_codes, "beta": self.beta, "distance": distance,
            "anchor": anchor, "usage_decay": self.usage_decay, "contrastive": self.contrastive,
            "contrastive_temperature": self.contrastive_temperature, "first_batch": self.first_batch,
            "legacy": self.legacy, "chunk_size": self.chunk_size, "seed": self.seed,
        }
        self.weight = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        self.register_buffer("usage_ema", torch.zeros(num_codes))  # p_k
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))  # for first_batch
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}

    @property
    def codebook(self) -> Tensor:
        """(K, D) the raw codes, as ``embed`` returns them."""
        return self.weight

    def _search_codes(self, codes: Tensor) -> Tensor:
        return F.normalize(codes, dim=-1) if self.distance == "cosine" else codes

    def _generator(self, kind: str, device: torch.device) -> torch.Generator:
        """``shared``: the same stream on every rank (identical draws); ``local``: a stream
        per rank (independent noise)."""
        key = (kind, device)
        if key not in self._generators:
            offset = 0 if kind == "shared" else 1 + distributed.rank()
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed * 1_000_003 + offset)
            self._generators[key] = gen
        return self._generators[key]

    # -- forward --------------------------------------------------------------------------
    def forward(self, z: Tensor) -> Quantized:
        """(B, D, h, w) latents → :class:`Quantized`; in training also re-anchors codes."""
        out_dtype = self.weight.dtype
        with torch.autocast(z.device.type, enabled=False):
            x, grid = to_rows(z.float(), self.dim)  # (N, D)
            weight = self.weight.float()
            reanchor = self.training and self.anchor is not None and not (
                self.first_batch and bool(self.anchored))
            per_code = {"closest": "closest", "probrandom": "sample"}.get(self.anchor) if reanchor else None
            xs = self._search_codes(x.detach())
            # On unit vectors ‖x − e‖² = 2 − 2·cos, so softmax over cos is softmax over −½‖x − e‖².
            scale = 0.5 if self.distance == "cosine" else 1.0
            found = nearest_codes(xs, self._search_codes(weight.detach()), chunk_size=self.chunk_size,
                                  per_code=per_code, logit_scale=scale,
                                  generator=self._generator("local", x.device) if per_code == "sample" else None)
            q = F.embedding(found.indices, weight)  # gathers save no codebook for backward
            loss = vq_loss(x, q, self.beta, self.legacy)
            if self.training and self.contrastive:
                loss = loss + self._contrastive(x.detach(), weight)

            counts, _ = self._count(found.indices)
            if self.training:
                self._update_usage(counts)
            if reanchor:
                self._reanchor(x.detach(), found.code_score, found.code_arg)

            q_out = x + (q - x).detach() if self.training else q
            z_q = from_rows(q_out, grid).to(out_dtype)
        return Quantized(z_q, found.indices.view(grid), loss, usage_stats(counts))

    def embed(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 indices → (B, D, h, w) codes."""
        with torch.autocast(self.weight.device.type, enabled=False):
            q = F.embedding(indices.reshape(-1), self.weight.float())
            return from_rows(q, tuple(indices.shape)).to(self.weight.dtype)

    # -- online clustering ----------------------------------------------------------------
    @torch.no_grad()
    def _update_usage(self, counts: Tensor) -> None:
        probs = counts / counts.sum().clamp_min(1.0)
        self.usage_ema.mul_(self.usage_decay).add_(probs, alpha=1.0 - self.usage_decay)

    @torch.no_grad()
    def _reanchor(self, x: Tensor, code_score: Tensor | None, code_arg: Tensor | None) -> None:
        anchors = self._anchors(x, code_score, code_arg)  # (K, D), identical on every rank
        pull = torch.exp(-self.usage_ema * self.num_codes * 10.0 / (1.0 - self.usage_decay) - 1e-3)
        # In place after the loss was built: the gathers above saved only indices, and the
        # contrastive term works on a copy, so backward never reads the moved codes.
        self.weight.mul_(1.0 - pull[:, None]).add_(anchors.to(self.weight.dtype) * pull[:, None])
        self.anchored.fill_(True)

    def _anchors(self, x: Tensor, code_score: Tensor | None, code_arg: Tensor | None) -> Tensor:
        """(K, D) one batch feature per code, chosen among the features of all ranks.

        Each rank fills the rows of the codes whose anchor it owns and leaves zeros
        elsewhere; one sum over ranks then gives every rank the same anchors.
        """
        n_local = x.shape[0]
        me = distributed.rank()
        if self.anchor == "random":
            sizes = distributed.all_gather_cat(torch.tensor([n_local], device=x.device))  # (world,)
            offset = int(sizes[:me].sum())
            pick = torch.randint(int(sizes.sum()), (self.num_codes,), device=x.device,
                                 generator=self._generator("shared", x.device))  # same on all ranks
            mine = (pick >= offset) & (pick < offset + n_local)
            local = (pick - offset).clamp(0, max(n_local - 1, 0))
        else:
            assert code_score is not None and code_arg is not None
            scores = distributed.all_gather_cat(code_score[None])  # (world, K)
            mine = scores.argmax(dim=0) == me  # first rank wins ties: the same on every rank
            local = code_arg
        anchors = torch.where(mine[:, None], x[local], torch.zeros((), device=x.device))
        return distributed.all_reduce_sum(anchors)

    def _contrastive(self, x: Tensor, weight: Tensor) -> Tensor:
        """Mean over codes of ``−log softmax([pos, neg_1..neg_{N//2}] / T)[0]``.

        Similarities (the gradient reaches the codebook only) are formed per block of codes
        and recomputed in backward (activation checkpointing), so memory stays at one block
        of N×chunk entries instead of N×K.
        """
        n = x.shape[0]
        n_pos, n_neg = max(1, n // self.num_codes), n // 2
        if n_neg == 0:
            return weight.new_zeros(())
        xs = F.normalize(x, dim=-1) if self.distance == "cosine" else x
        codes = weight.clone()  # re-anchoring writes self.weight in place before backward
        block = max(1, self.chunk_size // n)
        total = weight.new_zeros(())
        for k0 in range(0, self.num_codes, block):
            part = codes[k0:k0 + block]
            if torch.is_grad_enabled():
                total = total + checkpoint(self._contrastive_block, xs, part, n_pos, n_neg, use_reentrant=False)
            else:
                total = total + self._contrastive_block(xs, part, n_pos, n_neg)
        return total / self.num_codes

    def _contrastive_block(self, xs: Tensor, codes: Tensor, n_pos: int, n_neg: int) -> Tensor:
        if self.distance == "cosine":
            sim = xs @ F.normalize(codes, dim=-1).T  # (N, k)
        else:
            sim = -(xs.pow(2).sum(1, keepdim=True) - 2 * xs @ codes.T + codes.pow(2).sum(1))
        pos = sim.topk(n_pos, dim=0).values.mean(0, keepdim=True)  # (1, k)
        neg = sim.topk(n_neg, dim=0, largest=False).values  # (n_neg, k)
        logits = torch.cat([pos, neg], dim=0).T / self.contrastive_temperature  # (k, 1 + n_neg)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target, reduction="sum")


@hookimpl
def register_quantizers(register):
    register("cvq", ClusteredVectorQuantizer)
