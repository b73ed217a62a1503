"""Registers vector-quantize-pytorch's quantizers with lgvq-plugins."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lgvq_plugins.evaluation.codebook import code_histogram, codebook_stats
from lgvq_plugins.hookspecs import hookimpl
from lgvq_plugins.interfaces import Quantized


def _usage_stats(indices: Tensor, num_codes: int) -> dict[str, Tensor]:
    # the host's one implementation, so these numbers compare with the built-in quantizers'
    stats = codebook_stats(code_histogram(indices, num_codes, validate=False))
    return {"perplexity": stats.perplexity, "usage": stats.usage}


class VectorQuantizeAdapter(nn.Module):
    """``vector_quantize_pytorch.VectorQuantize`` behind the ``Quantizer`` contract."""

    def __init__(self, dim: int, num_codes: int = 1024, decay: float = 0.8,
                 commitment_weight: float = 0.25, use_cosine_sim: bool = False,
                 kmeans_init: bool = False):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.dim, self.num_codes = dim, num_codes
        self._config = {"dim": dim, "num_codes": num_codes, "decay": decay,
                        "commitment_weight": commitment_weight, "use_cosine_sim": use_cosine_sim,
                        "kmeans_init": kmeans_init}
        self.vq = VectorQuantize(dim=dim, codebook_size=num_codes, decay=decay,
                                 commitment_weight=commitment_weight, use_cosine_sim=use_cosine_sim,
                                 kmeans_init=kmeans_init, accept_image_fmap=True,
                                 rotation_trick=False)

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable): ``create_quantizer(name, **config)`` rebuilds it."""
        return dict(self._config)

    @property
    def codebook(self) -> Tensor:
        return self.vq.codebook

    def forward(self, z: Tensor) -> Quantized:
        z_q, indices, loss = self.vq(z)
        return Quantized(z_q, indices, loss.sum(), _usage_stats(indices, self.num_codes))

    def embed(self, indices: Tensor) -> Tensor:
        # with accept_image_fmap=True the library already returns (B, D, h, w)
        return self.vq.get_output_from_indices(indices)


class FSQAdapter(nn.Module):
    """Finite scalar quantization (no codebook to learn) behind the ``Quantizer`` contract.

    A 1×1 projection maps the tokenizer's ``dim`` to ``len(levels)`` and back, so any
    tokenizer width works.
    """

    def __init__(self, dim: int, levels: tuple[int, ...] = (8, 5, 5, 5)):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.dim = dim
        self.levels = [int(level) for level in levels]
        self.fsq = FSQ(levels=list(levels), dim=dim)
        self.num_codes = self.fsq.codebook_size

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable): ``create_quantizer(name, **config)`` rebuilds it."""
        return {"dim": self.dim, "levels": list(self.levels)}

    @property
    def codebook(self) -> Tensor:
        all_idx = torch.arange(self.num_codes, device=self.fsq.project_in.weight.device
                               if hasattr(self.fsq.project_in, "weight") else "cpu")
        return self.fsq.indices_to_codes(all_idx)

    def forward(self, z: Tensor) -> Quantized:
        z_q, indices = self.fsq(z)
        indices = indices.long()  # the contract's int64 (FSQ returns int32)
        return Quantized(z_q, indices, z.new_zeros(()), _usage_stats(indices, self.num_codes))

    def embed(self, indices: Tensor) -> Tensor:
        return self.fsq.indices_to_codes(indices)  # (B, D, h, w) for 3-D indices


@hookimpl
def register_quantizers(register):
    register("vqtorch_vq", VectorQuantizeAdapter)
    register("vqtorch_fsq", FSQAdapter)
