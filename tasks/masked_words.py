"""``masked_word_prediction``: Recall@1 of the guided model's text decoder (paper Table 3).

For every evaluated caption, ``k`` of its words (real, non-special tokens: the tokens the
mtp loss may mask) are hidden, for each ``k`` in ``num_masked`` (paper: 1 and 3). The
decoder reads the rest of the caption and cross-attends to the image's visual tokens; a
masked word counts as recalled when the top-scoring vocabulary entry is the original token.
``recall@1_k<k>`` is the fraction of masked words recalled over the whole set (a caption with
fewer than ``k`` maskable words is left out and counted in the protocol).

Which words are hidden depends only on ``seed`` and the sample's position in the data, so
every model and every process count sees the same masks. "Words" are the text encoder's
tokens (WordPiece for MiniLM; every ``shapes`` word is one token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lgvq_plugins.tasks.probe import guidance_heads, head_outputs
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.task import TaskResult, batches, shard
from lgvq_plugins.interfaces import TextTokens
from lgvq_plugins.training import distributed as D


def fixed_masks(tokens: TextTokens, indices: Sequence[int], k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``k`` maskable positions per caption, chosen by a generator seeded with
    (``seed``, sample index). Returns ``(mask (B, L) bool, valid (B,) bool)``; captions with
    fewer than ``k`` maskable tokens get no mask and ``valid`` False."""
    eligible = ~tokens.padding_mask & ~tokens.special_mask  # (B, L)
    B, L = eligible.shape
    # One random row per sample from its own stream: the masks do not depend on the batch
    # a sample lands in (nor on the number of processes).
    keys = torch.stack([torch.rand(L, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices]).to(eligible.device)
    keys = torch.where(eligible, keys, torch.full_like(keys, -1.0))
    valid = eligible.sum(1) >= k
    top = keys.topk(min(k, L), dim=1).indices  # (B, k)
    mask = torch.zeros(B, L, dtype=torch.bool, device=eligible.device).scatter_(1, top, True)
    return mask & eligible & valid[:, None], valid


class MaskedWordPrediction:
    """Masked-word Recall@1 (gin: ``masked_word_prediction.*``).

    Args:
        num_masked: how many words to hide per caption, one measurement each (paper: 1, 3).
        batch_size: images per forward pass.
        max_images: evaluate the first ``max_images`` samples (None: all).
        heads: ``"auto"`` (the model's own mtp head, else an alignment probe trained on the
            frozen codes: :mod:`lgvq_plugins.tasks.probe`), ``"own"`` or ``"probe"``.
        seed: seed of the masks.
        probe_data: data set the probe trains on (default: the ``train`` split of ``data``).
    """

    needs = "guided"
    supports_unguided = True  # through the alignment probe (docs/evaluation.md)

    def __init__(self, num_masked: Sequence[int] = (1, 3), batch_size: int = 32, max_images: int | None = None,
                 heads: str = "auto", seed: int = 0, probe_data: Dataset | None = None):
        self.num_masked = tuple(int(k) for k in num_masked)
        if not self.num_masked or min(self.num_masked) < 1:
            raise ValueError(f"masked_word_prediction.num_masked={num_masked!r}: need one or more counts >= 1")
        self.batch_size, self.max_images, self.heads, self.seed = int(batch_size), max_images, heads, int(seed)
        self.probe_data = probe_data

    def run(self, model: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        guide, head_protocol = guidance_heads(model, data, heads=self.heads, need="mtp", probe_data=self.probe_data)
        mtp = guide.alignment_losses["mtp"]
        device = next(guide.parameters()).device
        # per k: recalled words, masked words, captions used, captions left out
        sums = torch.zeros(len(self.num_masked), 4, dtype=torch.float64, device=device)
        _, total = shard(data, self.max_images)
        seen = 0  # this rank's samples so far: its j-th sample is data[rank + j·world]
        for batch in batches(data, self.batch_size, self.max_images):
            out = head_outputs(guide, batch)
            count = len(batch["caption"])
            indices = [D.rank() + (seen + j) * D.world_size() for j in range(count)]
            seen += count
            for row, k in enumerate(self.num_masked):
                mask, valid = fixed_masks(out.text.tokens, indices, k, self.seed)
                if not bool(mask.any()):
                    sums[row, 3] += (~valid).sum()
                    continue
                logits = mtp.predict(out.hidden, out.text, mask, visual_map=guide.code_text.proj_out)
                hits = logits.argmax(-1) == out.text.tokens.ids[mask]
                sums[row] += torch.stack([hits.sum(), mask.sum(), valid.sum(), (~valid).sum()]).double()
        D.all_reduce_sum(sums)
        metrics: dict[str, float | None] = {}
        unavailable: dict[str, str] = {}
        for row, k in enumerate(self.num_masked):
            name = f"recall@1_k{k}"
            if sums[row, 1] > 0:
                metrics[name] = float(sums[row, 0] / sums[row, 1])
            else:
                metrics[name] = None
                unavailable[name] = f"no caption has {k} maskable words"
        protocol = {"split": getattr(data, "split", None), "images_requested": total,
                    "masked_words": {str(k): int(sums[r, 1]) for r, k in enumerate(self.num_masked)},
                    "captions_used": {str(k): int(sums[r, 2]) for r, k in enumerate(self.num_masked)},
                    "captions_left_out": {str(k): int(sums[r, 3]) for r, k in enumerate(self.num_masked)},
                    "masks": f"k random maskable tokens per caption, seeded by (seed={self.seed}, sample index)",
                    "text_encoder": getattr(guide.text_encoder, "identity", None), **head_protocol}
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable)


__all__ = ["MaskedWordPrediction", "fixed_masks"]
