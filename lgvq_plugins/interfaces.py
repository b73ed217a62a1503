"""The contracts between components: plain dataclasses and ``typing.Protocol`` classes.

Anything that meets a protocol can be used where it is expected — a third-party model
behind a thin adapter included. Shapes use ``B`` batch, ``D`` latent width, ``h×w`` the
latent grid, ``K`` codebook size, ``L`` caption tokens, ``Dt`` text width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """What a quantizer returns.

    Attributes:
        z_q: (B, D, h, w) quantized latents; in training the straight-through output, so
            gradients flow to the encoder. In eval mode exactly ``embed(indices)``.
        indices: (B, h, w) int64 code indices.
        loss: scalar quantizer objective (codebook + β·commitment, plus any extra terms);
            already included in the tokenizer's generator loss.
        stats: detached scalars for logging: at least ``perplexity`` and ``usage`` (the
            fraction of the codebook used in this batch).
    """

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Quantizer(Protocol):
    """Maps continuous latents (B, D, h, w) to the nearest of K codes.

    Registered factories are called as ``factory(dim=D, **settings)``.

    Attributes:
        num_codes: K, the codebook size (codebook-usage metrics count over it).
        dim: D, the code width (equals the tokenizer's ``embed_dim``).
    """

    num_codes: int
    dim: int

    @property
    def codebook(self) -> Tensor:
        """(K, D) the codes as used for lookup (after any projection/normalisation)."""

    def __call__(self, z: Tensor) -> Quantized:
        """(B, D, h, w) continuous latents → :class:`Quantized` (codes, indices, loss, stats)."""

    def embed(self, indices: Tensor) -> Tensor:
        """(B, h, w) indices → (B, D, h, w) codes."""


# ---------------------------------------------------------------------------------------
# Tokenizers (backbones)
# ---------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """A scalar objective plus the detached numbers to log (name → float or 0-d tensor)."""

    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class GuidableTokenizer(Protocol):
    """What :class:`~lgvq_plugins.guidance.LanguageGuided` needs of a tokenizer: one forward
    that returns the quantized grid, and the grid's width and size.

    Enough to guide a model in your own training loop; the project's ``Trainer`` and
    ``save_pretrained`` need the full :class:`Tokenizer`.

    Attributes:
        embed_dim: D, the channel width of ``Quantized.z_q`` (sizes the code–text transformer).
    """

    embed_dim: int

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid (h, w) for an input of ``image_size`` (sizes the positional embeddings)."""

    def __call__(self, x: Tensor) -> tuple[Tensor, Quantized]:
        """(B, 3, H, W) → ``(reconstruction, Quantized)``: the one forward of a batch."""


@runtime_checkable
class Tokenizer(GuidableTokenizer, Protocol):
    """Encoder → quantizer → decoder, with its own training objectives.

    ``forward(x)`` returns ``(reconstruction, quantized)``. The generator objective is
    computed from the *one* forward of a batch; the discriminator (if any) sees the
    detached reconstruction, so no batch is run through the generator twice.
    A foreign model (say taming-transformers' ``VQModel``) meets it through a thin adapter;
    :mod:`lgvq_plugins.adapters` holds the boilerplate (docs/architecture.md shows one).

    Attributes:
        quantizer: the :class:`Quantizer` (the trainer's codebook-usage metrics and
            fingerprints read its ``num_codes`` and ``codebook``).
        config: the constructor arguments (JSON-serialisable), so that
            ``create_backbone(name, **config)`` rebuilds the same architecture.
    """

    quantizer: Quantizer
    config: dict[str, Any]

    def encode(self, x: Tensor) -> Quantized:
        """(B, 3, H, W) in [-1, 1] → :class:`Quantized` with ``z_q`` (B, D, h, w)."""

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) → (B, 3, H, W)."""

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, h, w) → (B, 3, H, W); equals ``decode(quantizer.embed(indices))``."""

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized,
                       step: int) -> LossOutput:
        """Reconstruction (+ perceptual) + quantizer loss (+ adaptive-weight GAN term once
        ``step >= disc_start``)."""

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor, step: int) -> LossOutput | None:
        """Discriminator objective on real ``x`` and the *detached* reconstruction;
        ``None`` for tokenizers with no discriminator."""

    def discriminator_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the discriminator (empty list when there is none); everything else
        is trained by the generator optimizer."""


@runtime_checkable
class SavableTokenizer(Tokenizer, Protocol):
    """A :class:`Tokenizer` that :func:`~lgvq_plugins.pretrained.save_pretrained` can write and
    ``from_pretrained`` rebuild from data alone (registry name + JSON ``config``).

    Attributes:
        lgvq_registry_name: the backbone registry name that rebuilds it; set by
            ``create_backbone`` (register the class with ``@register_backbone("name")`` and
            build it by name).
    """

    lgvq_registry_name: str


# ---------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------


@dataclass
class TextTokens:
    """Tokenized captions, padded to the encoder's ``max_length``.

    Attributes:
        ids: (B, L) int64 token ids. Padding is *not* recognised by its id (id 0 is a real
            token for some vocabularies); use ``lengths``.
        lengths: (B,) int64 number of real tokens, start/end tokens included.
        special_mask: (B, L) bool, True at start/end/CLS/SEP tokens (never masked for L_mtp).
    """

    ids: Tensor
    lengths: Tensor
    special_mask: Tensor

    @property
    def padding_mask(self) -> Tensor:
        """(B, L) bool, True at padding positions."""
        L = self.ids.shape[1]
        return torch.arange(L, device=self.ids.device)[None, :] >= self.lengths[:, None]

    def to(self, device: torch.device | str) -> "TextTokens":
        return TextTokens(self.ids.to(device), self.lengths.to(device), self.special_mask.to(device))


@dataclass
class TextFeatures:
    """Frozen text features of a batch of captions.

    Attributes:
        token_feats: (B, L, Dt) per-token features (padding positions are arbitrary).
        global_feat: (B, Dg) one feature per caption (CLIP: the end-of-text token after
            the text projection; BERT-style: mean-pooled or CLS).
        tokens: the :class:`TextTokens` they were computed from.
    """

    token_feats: Tensor
    global_feat: Tensor
    tokens: TextTokens

    @property
    def lengths(self) -> Tensor:
        return self.tokens.lengths

    def to(self, device: torch.device | str) -> "TextFeatures":
        return TextFeatures(self.token_feats.to(device), self.global_feat.to(device), self.tokens.to(device))


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen pretrained text encoder.

    Attributes:
        identity: a string naming the model and weights (the feature-cache key prefix).
        max_length: caption length L in tokens (start/end included).
        width: Dt, the width of ``token_feats``.
        global_width: Dg, the width of ``global_feat``.
        special_token_ids: ids of start/end/CLS/SEP/pad tokens.
    """

    identity: str
    max_length: int
    width: int
    global_width: int
    special_token_ids: frozenset[int]

    @property
    def vocab_embeddings(self) -> Tensor:
        """(V, De) the frozen token-embedding matrix (tied MLM output layer of L_mtp)."""

    def tokenize(self, captions: list[str]) -> TextTokens:
        """B caption strings → :class:`TextTokens` padded to ``max_length``, with lengths."""

    def encode(self, tokens: TextTokens) -> TextFeatures:
        """Frozen features of ``tokens`` (the feature cache calls it once per unique caption)."""


# ---------------------------------------------------------------------------------------
# Language guidance
# ---------------------------------------------------------------------------------------


@dataclass
class GuidedOutput:
    """What ``LanguageGuided.forward`` gives the alignment losses and the trainer.

    Attributes:
        reconstruction: (B, 3, H, W).
        quantized: the tokenizer's :class:`Quantized`.
        text: frozen features of the batch's captions (None when guidance is off).
        visual_tokens: (B, 1 + h·w, Dt) code–text transformer output, global token first.
        visual_states: (B, 1 + h·w, W) the code–text transformer's states before its output
            projection, with ``visual_tokens == visual_proj(visual_states)``. A loss that
            attends to the visual tokens may attend to these instead and fold ``visual_proj``
            into its own key/value projection — the same result, cheaper when W < Dt (L_mtp
            does). None when the producer has no such factorisation.
        visual_proj: the linear map (W → Dt) above, or None.
        extras: what each alignment loss computed on the way, for logging, tasks and tests,
            under the loss's registry name (``extras["mtp"]`` holds the mask, ratio, logits
            and targets; ``extras["ras"]`` the chosen visual positions). A loss writes only
            its own key — ``LanguageGuided`` rejects any other — and never reads another
            loss's key: losses can be switched off or reordered. What several losses share
            is a documented field of this class instead.
        losses: weighted alignment terms (name → scalar), summed into the objective.
        raw_losses: the same terms before weighting (for logging).
        z_e: (B, D, h, w) the quantizer's input (the encoder output), kept in training only
            when the alignment terms are balanced against the tokenizer's objective
            (``LanguageGuided.balance = 'adaptive'``, lgvq_plugins/guidance/balance.py); else None.
    """

    reconstruction: Tensor
    quantized: Quantized
    text: TextFeatures | None = None
    visual_tokens: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)
    raw_losses: dict[str, Tensor] = field(default_factory=dict)
    visual_states: Tensor | None = None
    visual_proj: torch.nn.Module | None = None
    z_e: Tensor | None = None


@runtime_checkable
class AlignmentLoss(Protocol):
    """One alignment objective. Modules (it may own parameters, e.g. an MLM head).

    ``setup(guide)`` is called once by :class:`LanguageGuided` with itself, so a loss can
    size its layers from the tokenizer and text encoder; then ``loss(guided, batch)``
    returns an unweighted scalar each step.
    """

    def setup(self, guide: Any) -> None:
        """Called once by ``LanguageGuided`` with itself: build the layers (sized from
        ``guide.text_encoder``, ``guide.visual_width``, ``guide.code_dim``)."""

    def __call__(self, guided: GuidedOutput, batch: Mapping[str, Any]) -> Tensor:
        """The unweighted scalar loss of one batch; by-products go to ``guided.extras[name]``."""


# ---------------------------------------------------------------------------------------
# Downstream tasks
# ---------------------------------------------------------------------------------------
# The task contract (``Task``: ``needs`` and ``run(model, data, out_dir) -> TaskResult``) lives
# with the runner whose result type it returns, in lgvq_plugins/evaluation/task.py; one
# definition, not a second copy here.
