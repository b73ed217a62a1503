"""Base classes that put a foreign VQ model behind the ``Quantizer`` / ``Tokenizer`` contracts.

A third-party model has its own call signatures (taming's ``VQModel.encode`` returns
``(quant, emb_loss, info)``). Subclass :class:`QuantizerAdapter` and
:class:`TokenizerAdapter`, translate those signatures in ``forward`` / ``encode`` /
``decode``, and the rest of the contract comes from here: ``num_codes``/``dim``/``embed``
from the codebook, ``embed_dim``, ``grid`` (measured by one probe forward), ``forward``,
``decode_indices``, an L1 + quantizer generator objective and no discriminator.
docs/architecture.md ("A foreign tokenizer") shows the whole adapter for taming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq_plugins.interfaces import LossOutput, Quantized

__all__ = ["QuantizerAdapter", "TokenizerAdapter"]


class QuantizerAdapter(nn.Module):
    """A foreign quantizer ``module`` as a ``Quantizer``.

    Subclasses define ``codebook`` (the (K, D) lookup table) and ``forward(z) -> Quantized``.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @property
    def codebook(self) -> Tensor:
        """(K, D) the codes as used for lookup."""
        raise NotImplementedError(f"{type(self).__name__} must define the codebook property")

    @property
    def num_codes(self) -> int:
        """K, read from the codebook."""
        return int(self.codebook.shape[0])

    @property
    def dim(self) -> int:
        """D, read from the codebook."""
        return int(self.codebook.shape[1])

    def embed(self, indices: Tensor) -> Tensor:
        """(B, h, w) indices → (B, D, h, w) codes by codebook lookup."""
        return self.codebook[indices].permute(0, 3, 1, 2)


class TokenizerAdapter(nn.Module):
    """A foreign encoder–quantizer–decoder ``module`` as a ``Tokenizer``.

    Subclasses define ``encode(x) -> Quantized`` and ``decode(z_q)``, and pass the wrapped
    model and its quantizer (a ``Quantizer``, e.g. a :class:`QuantizerAdapter`). Override
    :meth:`generator_loss` (and the discriminator methods) for another objective.

    Args:
        module: the foreign model (its weights become this module's ``module.*``).
        quantizer: its quantizer behind the ``Quantizer`` contract.
        config: JSON constructor arguments, for ``save_pretrained`` (default ``{}``).
    """

    def __init__(self, module: nn.Module, quantizer: nn.Module, config: dict[str, Any] | None = None):
        super().__init__()
        self.module, self.quantizer = module, quantizer
        self.config: dict[str, Any] = dict(config or {})
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def embed_dim(self) -> int:
        """D, the quantizer's code width."""
        return int(self.quantizer.dim)

    # encode(x) -> Quantized and decode(z_q) are the subclass's: left undefined here, so a
    # subclass that forgets one is named by the contract check where it is used.

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the index grid for ``image_size``, measured once per size by encoding a
        blank image in eval mode (so no batch-norm or EMA statistics move)."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if size not in self._grids:
            was_training = self.training
            param = next(self.parameters(), None)
            probe = torch.zeros(1, 3, *size, device=param.device if param is not None else "cpu")
            try:
                self.eval()
                with torch.no_grad():
                    self._grids[size] = tuple(int(n) for n in self.encode(probe).indices.shape[1:])
            finally:
                self.train(was_training)
        return self._grids[size]

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        quantized = self.encode(x)
        return self.decode(quantized.z_q), quantized

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.embed(indices))

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized,
                       step: int) -> LossOutput:
        """L1 reconstruction + the quantizer's own loss (no perceptual or GAN term)."""
        rec = F.l1_loss(reconstruction, x)
        return LossOutput(rec + quantized.loss, {"rec_loss": rec.detach(), "q_loss": quantized.loss.detach()})

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor, step: int) -> LossOutput | None:
        return None

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return []
