"""The three LG-VQ alignment losses, registered as ``gsa``, ``mtp`` and ``ras``.

Each is an ``nn.Module`` meeting :class:`~lgvq_plugins.interfaces.AlignmentLoss`:
:class:`~lgvq_plugins.guidance.LanguageGuided` builds it by name (so gin bindings such as
``gsa.temperature = 0.07`` apply), calls ``setup(guide)`` once so it can size its layers
from the tokenizer and the text encoder, then calls it every step with the
:class:`~lgvq_plugins.interfaces.GuidedOutput` and the batch. Losses return *unweighted*
scalars; the weights live on ``LanguageGuided.losses``.

What ``setup`` may read from the guide: ``guide.text_encoder`` (frozen, outside the module
tree), ``guide.visual_width`` (Dt of the visual tokens), ``guide.code_dim`` (D of ``z_q``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lgvq_plugins.guidance.code_text import LN_EPS, MLMHead, TextDecoder
from lgvq_plugins.guidance.masking import MaskingRule, sample_mlm_mask
from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import GuidedOutput, TextFeatures
from lgvq_plugins.training.distributed import (
    all_gather_cat,
    all_gather_cat_with_grad,
    rank,
)

#: epsilon of every L2 normalisation (the reference divides by bare norms: trap §2.3).
NORM_EPS = 1e-6


def _fp32(x: Tensor) -> Tensor:
    """``x`` in at least fp32 (half precision is upcast; float64 is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _common_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute a loss in: at least fp32, and wide enough for every input."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(x: Tensor) -> torch.autocast:
    """A context computing similarities in the inputs' (>= fp32) precision even under
    autocast: bf16 cosine similarities are too coarse for these losses."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _require_text(guided: GuidedOutput, loss: str) -> TextFeatures:
    if guided.text is None or guided.visual_tokens is None:
        raise ValueError(f"alignment loss {loss!r} needs caption features and visual tokens; "
                         "call LanguageGuided with captions (guidance enabled)")
    return guided.text


class _NeedsSetup:
    """Mixin: a clear error when a loss is called before ``setup(guide)``."""

    _is_set_up = False

    def _check_setup(self) -> None:
        if not self._is_set_up:
            raise RuntimeError(f"{type(self).__name__} was called before setup(guide); build it "
                               "through LanguageGuided(losses={...}) or call loss.setup(guide) first")


# ---------------------------------------------------------------------------------------
# L_gsa — global semantic alignment
# ---------------------------------------------------------------------------------------


def info_nce(visual: Tensor, text: Tensor, *, temperature: float = 1.0, symmetric: bool = False,
             eps: float = NORM_EPS) -> Tensor:
    """InfoNCE between global visual features (B, C) and caption features (B, C).

    Cosine similarities divided by ``temperature``; row i's positive is caption i. Under
    DDP the captions of every rank are the negatives (labels offset by rank·B); every rank
    must hold the same B. The text side is detached; with ``symmetric`` the text→image
    direction is averaged in, with every rank's visual features (gradients flow back to
    the rank that owns them).

    Computed in fp32 with ``cross_entropy`` (never ``log(exp/sum)``).
    """
    dtype = _common_dtype(visual, text)
    with _no_autocast(visual):
        v = F.normalize(visual.to(dtype), dim=-1, eps=eps)
        g = F.normalize(text.detach().to(dtype), dim=-1, eps=eps)
        labels = torch.arange(v.shape[0], device=v.device) + rank() * v.shape[0]
        loss = F.cross_entropy(v @ all_gather_cat(g).T / temperature, labels)
        if symmetric:
            text_to_image = F.cross_entropy(g @ all_gather_cat_with_grad(v).T / temperature, labels)
            loss = 0.5 * (loss + text_to_image)
    return loss


class GlobalSemanticAlignment(_NeedsSetup, nn.Module):
    """L_gsa: pull the global visual token ``v_0`` towards its caption's feature ``g``.

    Args:
        temperature: divides the cosine similarities (reference: 1).
        symmetric: also average in the text→image direction (reference: image→text only).
    """

    def __init__(self, temperature: float = 1.0, symmetric: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"gsa.temperature must be > 0, got {temperature}")
        self.temperature, self.symmetric = float(temperature), bool(symmetric)
        self.proj: nn.Module = nn.Identity()

    def setup(self, guide: Any) -> None:
        """Add a linear map when v_0's width differs from the caption feature's."""
        visual, text = guide.visual_width, guide.text_encoder.global_width
        self.proj = nn.Linear(visual, text) if visual != text else nn.Identity()
        self._is_set_up = True

    def forward(self, guided: GuidedOutput, batch: Mapping[str, Any] | None = None) -> Tensor:
        self._check_setup()
        text = _require_text(guided, "gsa")
        v0 = self.proj(guided.visual_tokens[:, 0])
        return info_nce(v0, text.global_feat, temperature=self.temperature, symmetric=self.symmetric)


# ---------------------------------------------------------------------------------------
# L_mtp — masked text prediction
# ---------------------------------------------------------------------------------------


class MaskedTextPrediction(_NeedsSetup, nn.Module):
    """L_mtp: hide some caption tokens and predict them from the rest plus the visual tokens.

    The cached (frozen) token features are masked — the hidden positions get the decoder's
    per-position mask embedding — and a :class:`~lgvq_plugins.guidance.code_text.TextDecoder` reads
    them while cross-attending to the visual tokens. An :class:`~lgvq_plugins.guidance.code_text.MLMHead`
    tied to the text encoder's frozen token embeddings gives logits *only at masked
    positions*; the loss is label-smoothed cross-entropy against the original ids, a mean
    over masked tokens. Special tokens and padding are never masked.

    Note: the unmasked positions' features are contextual (computed from the full caption),
    as they must be when features are cached; neighbouring features may carry some
    information about a hidden word.

    Args:
        depth: decoder layers (reference: 2).
        heads: decoder attention heads (must divide the text width; reference: 1).
        mlp_ratio: decoder feed-forward width as a multiple of the text width.
        dropout: decoder dropout (reference: 0.1).
        label_smoothing: cross-entropy label smoothing (reference: 0.1).
        mask_ratio_mean, mask_ratio_std, mask_ratio_low, mask_ratio_high: the per-batch
            masking ratio ~ N(mean, std) *truncated* to [low, high] (reference: 0.5, 0.1,
            0.1, 0.3, giving a mean ratio ≈ 0.263; see :class:`MaskingRule`).
        mask_min_one: hide at least one token per batch (the reference does not).
        seed: seed of a private generator for the masks; ``None`` uses torch's global RNG
            (so ``torch.manual_seed`` makes the masks reproducible).
        mlp_hidden: decoder feed-forward width, overriding ``mlp_ratio`` (reference: 512).
        activation: decoder feed-forward activation, ``"gelu"`` or ``"relu"`` (reference).
        norm_eps: decoder LayerNorm epsilon (reference: 1e-12).
        attn_dropout: dropout on the decoder's attention weights (reference: none).
    """

    def __init__(self, depth: int = 2, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 label_smoothing: float = 0.1, mask_ratio_mean: float = 0.5, mask_ratio_std: float = 0.1,
                 mask_ratio_low: float = 0.1, mask_ratio_high: float = 0.3, seed: int | None = None,
                 mask_min_one: bool = True, mlp_hidden: int | None = None, activation: str = "gelu",
                 norm_eps: float = LN_EPS, attn_dropout: float = 0.0):
        super().__init__()
        self.depth, self.heads, self.mlp_ratio, self.dropout = depth, heads, mlp_ratio, dropout
        self.mlp_hidden, self.activation, self.norm_eps = mlp_hidden, activation, float(norm_eps)
        self.attn_dropout = float(attn_dropout)
        self.label_smoothing = float(label_smoothing)
        self.rule = MaskingRule(mask_ratio_mean, mask_ratio_std, mask_ratio_low, mask_ratio_high,
                                min_one=bool(mask_min_one))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def setup(self, guide: Any) -> None:
        """Build the decoder (text width, one mask embedding per caption position) and the
        MLM head (tied to the frozen vocabulary embeddings)."""
        encoder = guide.text_encoder
        if guide.visual_width != encoder.width:
            raise ValueError(f"mtp needs visual tokens of the text width {encoder.width}, got "
                             f"{guide.visual_width}")
        vocab = encoder.vocab_embeddings
        self.decoder = TextDecoder(encoder.width, encoder.max_length, depth=self.depth,
                                   heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                                   mlp_hidden=self.mlp_hidden, activation=self.activation,
                                   norm_eps=self.norm_eps, attn_dropout=self.attn_dropout)
        self.head = MLMHead(encoder.width, vocab.shape[1], vocab.shape[0])
        # The encoder stays outside this module (frozen weights must not reach state_dict);
        # LanguageGuided moves it with .to().
        object.__setattr__(self, "_text_encoder", encoder)
        self._is_set_up = True

    def predict(self, visual_tokens: Tensor, text: TextFeatures, mask: Tensor,
                visual_map: nn.Linear | None = None) -> Tensor:
        """Vocabulary logits (N, V) at the N positions where ``mask`` (B, L) is True, in
        row-major order (those of ``text.tokens.ids[mask]``). With ``visual_map``,
        ``visual_tokens`` are the states that linear map turns into the visual tokens."""
        self._check_setup()
        # Positions past the longest caption are padding in every row: attention ignores
        # them as keys and no loss reads them as queries, so drop them (exactly the same
        # result, at a fraction of the cost when captions are shorter than max_length).
        length = max(1, int(text.tokens.lengths.max()))
        feats, padding = text.token_feats[:, :length], text.tokens.padding_mask[:, :length]
        if bool(mask[:, length:].any()):
            raise ValueError("mtp: a mask selects padding positions; masks must come from eligible tokens")
        states = self.decoder(feats, mask[:, :length], padding, visual_tokens, visual_map)
        return self.head(states[mask[:, :length]], self._text_encoder.vocab_embeddings)

    def forward(self, guided: GuidedOutput, batch: Mapping[str, Any] | None = None) -> Tensor:
        self._check_setup()
        text = _require_text(guided, "mtp")
        mask, ratio = sample_mlm_mask(text.tokens, self.rule, self.generator)
        if guided.visual_states is not None and guided.visual_proj is not None:
            # same result, cheaper: cross-attend through the factored form (GuidedOutput docs)
            logits = self.predict(guided.visual_states, text, mask, visual_map=guided.visual_proj)
        else:
            logits = self.predict(guided.visual_tokens, text, mask)
        targets = text.tokens.ids[mask]
        guided.extras["mtp"] = {"mask": mask, "ratio": ratio, "logits": logits, "targets": targets}
        if targets.numel() == 0:  # no caption has a maskable token: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(_fp32(logits), targets, label_smoothing=self.label_smoothing)


# ---------------------------------------------------------------------------------------
# L_ras — relationship alignment
# ---------------------------------------------------------------------------------------

RasReduction = Literal["real_words", "reference"]


def relationship_alignment(token_feats: Tensor, visual_tokens: Tensor, z_q: Tensor, project: nn.Module,
                           real: Tensor, *, reduction: RasReduction = "real_words",
                           weight_by_similarity: bool = False, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """L_ras on one batch.

    For each word l: n*(l) = argmax_n cos(t_l, v_n) over the h·w visual tokens (value a_l);
    c_l = project(z_q at n*(l)); Q = t̂ t̂ᵀ (detached) and P = ĉ ĉᵀ; loss = mean (P − Q)².
    Only the pairs of words in ``real`` enter the sum; the others get no gradient.

    Args:
        token_feats: (B, L, Dt) frozen word features t.
        visual_tokens: (B, h·w, Dt) visual tokens v_1..v_hw (global token excluded).
        z_q: (B, Dq, h, w) quantized latents (straight-through: gradients reach the encoder).
        project: Dq → Dt map applied to the gathered codes.
        real: (B, L) bool, the words that count (padding is never one).
        reduction: ``"real_words"`` — mean over the pairs (l, m), l ≠ m, of real words of the
            same caption (the diagonal is identically 0); ``"reference"`` — as the reference:
            the rows and columns of P and Q outside ``real`` are zeroed and the sum is
            divided by all B·L·L entries (padding and diagonal count in the divisor, not in
            the sum). At the same weight ``"real_words"`` is therefore
            B·L² / #pairs times as strong (see :class:`RelationshipAlignment`).
        weight_by_similarity: the reference's c_l ← a_l·c_l before normalising (it only flips
            the sign of c_l where a_l < 0); off by default.

    Returns:
        ``(loss, n_star)`` with ``n_star`` (B, L) the chosen visual position of each word.
    """
    if reduction not in ("real_words", "reference"):
        raise ValueError(f"ras.reduction must be 'real_words' or 'reference', got {reduction!r}")
    dtype = _common_dtype(token_feats, visual_tokens)
    with _no_autocast(token_feats):
        t = F.normalize(token_feats.to(dtype), dim=-1, eps=eps)
        v = F.normalize(visual_tokens.to(dtype), dim=-1, eps=eps)
        a, n_star = torch.einsum("bld,bnd->bln", t, v).max(dim=-1)  # (B, L) each
    codes = rearrange(z_q, "b d h w -> b (h w) d")
    codes = torch.gather(codes, 1, n_star[..., None].expand(-1, -1, codes.shape[-1]))  # (B, L, Dq)
    c = project(codes)  # under autocast if the caller uses it
    with _no_autocast(token_feats):
        c = c.to(_common_dtype(c, t))
        if weight_by_similarity:
            c = c * a[..., None]
        c = F.normalize(c, dim=-1, eps=eps)
        p = c @ c.transpose(1, 2)
        q = (t @ t.transpose(1, 2)).detach()
        err = (p - q).square()  # (B, L, L)
    pairs = real[:, :, None] & real[:, None, :]  # (B, L, L)
    if reduction == "real_words":
        pairs = pairs & ~torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    # where(), not a product: entries outside ``pairs`` get exactly zero gradient, even when
    # their error is not finite (e.g. a zero feature at padding)
    total = torch.where(pairs, err, torch.zeros_like(err)).sum()
    if reduction == "reference":
        return total / err.numel(), n_star
    return total / pairs.sum().clamp_min(1), n_star


def ras_strength_factor(real: Tensor) -> float:
    """How many times stronger ``reduction="real_words"`` is than ``"reference"`` at the same
    weight on a batch whose counted words are ``real`` (B, L): B·L² / #off-diagonal real pairs
    (0 pairs: the loss is 0 under both, and the factor is reported as 1)."""
    n = real.sum(dim=1).double()
    pairs = float((n * (n - 1)).sum())
    return real.numel() * real.shape[1] / pairs if pairs > 0 else 1.0


def _project_codes(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (init std 0.01, as the reference) → GELU → LayerNorm."""
    linear = nn.Linear(in_dim, out_dim)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(linear, nn.GELU(), nn.LayerNorm(out_dim, eps=LN_EPS))


class RelationshipAlignment(_NeedsSetup, nn.Module):
    """L_ras: the similarity between two words' codes should match that between the words.

    Args:
        reduction: ``"real_words"`` (default: mean over off-diagonal pairs of real words) or
            ``"reference"`` (the reference's sum over real pairs divided by B·L·L, with L the
            padded caption length).
        weight_by_similarity: the reference's a_l weighting of c_l (see
            :func:`relationship_alignment`).
        include_special: count start/end tokens as words (the reference does: it finds
            padding as token id 0, so only padding is left out).

    **Weights.** The two reductions share the sum and differ in the divisor, so at the same
    ``w_ras`` the default is ``B·L² / #pairs`` times as strong as the reference, #pairs being
    Σ_b n_b(n_b − 1) over the n_b real words of each caption: ≈ L²/(n² − n) for captions of
    n words — ≈ 4.3× for 15-word captions at L = 30, ≈ 20× for 7-word ones. The paper's
    weights (``w_ras = 1e-4``) were tuned for ``"reference"``; to keep their strength with
    ``"real_words"``, divide ``w_ras`` by that factor (:func:`ras_strength_factor` computes it
    for a batch of captions), or set ``ras.reduction = 'reference'``.
    """

    def __init__(self, reduction: RasReduction = "real_words", weight_by_similarity: bool = False,
                 include_special: bool = False):
        super().__init__()
        if reduction not in ("real_words", "reference"):
            raise ValueError(f"ras.reduction must be 'real_words' or 'reference', got {reduction!r}")
        self.reduction, self.weight_by_similarity = reduction, bool(weight_by_similarity)
        self.include_special = bool(include_special)

    def setup(self, guide: Any) -> None:
        """Build the code projection D → Dt (text width)."""
        self.project = _project_codes(guide.code_dim, guide.text_encoder.width)
        self._is_set_up = True

    def forward(self, guided: GuidedOutput, batch: Mapping[str, Any] | None = None) -> Tensor:
        self._check_setup()
        text = _require_text(guided, "ras")
        real = ~text.tokens.padding_mask
        if not self.include_special:
            real = real & ~text.tokens.special_mask
        loss, n_star = relationship_alignment(
            text.token_feats, guided.visual_tokens[:, 1:], guided.quantized.z_q, self.project, real,
            reduction=self.reduction, weight_by_similarity=self.weight_by_similarity)
        guided.extras["ras"] = {"positions": n_star.detach()}
        return loss


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


@hookimpl
def register_alignment_losses(register):
    register("gsa", GlobalSemanticAlignment)
    register("mtp", MaskedTextPrediction)
    register("ras", RelationshipAlignment)


__all__ = [
    "NORM_EPS",
    "GlobalSemanticAlignment",
    "MaskedTextPrediction",
    "RelationshipAlignment",
    "info_nce",
    "ras_strength_factor",
    "relationship_alignment",
]
