"""``code_word_alignment``: do codes relate to each other as their words do? (paper Table 4)

As L_ras computes it: for each real word l of a caption, the visual position
n*(l) = argmax_n cos(t_l, v_n); the code there, projected by the ras head, is c_l. The task
reports the mean squared difference between word–word cosine similarities cos(t_l, t_m)
and code–code similarities cos(c_l, c_m) over pairs l ≠ m of real (non-special) words of
the same caption, summed over the whole evaluated set and divided by the number of pairs.

Reference points reported with it, to read the MSE against (``docs/evaluation.md``):
``constant_baseline_mse`` — the variance of the word–word similarities over the same pairs,
the MSE of code similarities all set to their mean (an arrangement with no word structure
at all reaches it); ``same_code_pair_rate`` / ``same_position_pair_rate`` — the fraction of
word pairs whose aligned codes are the same code / the same visual position (such a pair's
code similarity is 1, whatever the head learns).

``tables["heatmaps"]`` holds, for the first ``heatmaps`` samples, each word's cosine
similarity to every visual position (h × w): the paper's Figure 6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from lgvq_plugins.tasks.probe import (
    HeadOutputs,
    guidance_heads,
    head_outputs,
    token_strings,
)
from torch import nn
from torch.utils.data import Dataset, default_collate

from lgvq_plugins.evaluation.scores import similarity_mse_sums
from lgvq_plugins.evaluation.task import TaskResult, batches, shard
from lgvq_plugins.training import distributed as D


def aligned_codes(out: HeadOutputs, project: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, Dt) projected codes aligned to each word, and (B, L, h·w) word→position
    cosine similarities."""
    t = F.normalize(out.text.token_feats.float(), dim=-1, eps=1e-6)
    v = F.normalize(out.visual_tokens[:, 1:].float(), dim=-1, eps=1e-6)
    sim = torch.einsum("bld,bnd->bln", t, v)
    n_star = sim.argmax(dim=-1)  # (B, L)
    codes = rearrange(out.z_q, "b d h w -> b (h w) d")
    codes = torch.gather(codes, 1, n_star[..., None].expand(-1, -1, codes.shape[-1]))
    return project(codes), sim


class CodeWordAlignment:
    """Code–word similarity MSE (gin: ``code_word_alignment.*``).

    Args:
        batch_size: images per forward pass.
        max_images: evaluate the first ``max_images`` samples (None: all).
        heads: ``"auto"`` (the model's own ras head and code–text transformer; an alignment
            probe for an unguided tokenizer), ``"own"`` or ``"probe"``.
        heatmaps: samples whose word→position similarities go to ``tables["heatmaps"]``.
        probe_data: data set the probe trains on (default: the ``train`` split of ``data``).
    """

    needs = "guided"
    supports_unguided = True  # through the alignment probe (docs/evaluation.md)

    def __init__(self, batch_size: int = 32, max_images: int | None = None, heads: str = "auto",
                 heatmaps: int = 4, probe_data: Dataset | None = None):
        self.batch_size, self.max_images, self.heads = int(batch_size), max_images, heads
        self.heatmaps, self.probe_data = int(heatmaps), probe_data

    def run(self, model: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        guide, head_protocol = guidance_heads(model, data, heads=self.heads, need="ras", probe_data=self.probe_data)
        ras = guide.alignment_losses["ras"]
        device = next(guide.parameters()).device
        # squared error, pairs, captions, same-code pairs, same-position pairs, Σ s, Σ s² (s: word–word cosine)
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        _, total = shard(data, self.max_images)
        for batch in batches(data, self.batch_size, self.max_images):
            out = head_outputs(guide, batch)
            real = ~out.text.tokens.padding_mask
            if not getattr(ras, "include_special", False):
                real = real & ~out.text.tokens.special_mask
            codes, sim = aligned_codes(out, ras.project)
            err, pairs = similarity_mse_sums(out.text.token_feats, codes, real)
            sums += torch.stack([err, pairs, torch.tensor(float(real.shape[0]), device=device).double(),
                                 *pair_reference_sums(out, sim.argmax(dim=-1), real)])
        D.all_reduce_sum(sums)
        n = float(sums[1])
        keys = ("code_word_mse", "constant_baseline_mse", "same_code_pair_rate", "same_position_pair_rate")
        if n > 0:
            mean_s = float(sums[5]) / n
            values = (float(sums[0]) / n, float(sums[6]) / n - mean_s ** 2, float(sums[3]) / n, float(sums[4]) / n)
            metrics: dict[str, float | None] = dict(zip(keys, values))
            unavailable: dict[str, str] = {}
        else:
            metrics = dict.fromkeys(keys)
            unavailable = dict.fromkeys(keys, "no caption has two real words")
        tables: dict[str, Any] = {"heatmaps": self._heatmaps(guide, data)} if self.heatmaps else {}
        protocol = {"split": getattr(data, "split", None), "images": int(sums[2]), "images_requested": total,
                    "word_pairs": int(sums[1]), "pairs": "l != m, real non-special words of one caption",
                    "alignment": "n*(l) = argmax_n cos(t_l, v_n) over the h*w visual tokens; c_l = ras.project(z_q[n*])",
                    "text_encoder": getattr(guide.text_encoder, "identity", None), **head_protocol}
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable, tables=tables)

    def _heatmaps(self, guide: nn.Module, data: Dataset) -> list[dict[str, Any]]:
        """Word → position similarities of the first samples (computed identically on every
        rank, so every rank returns the same result)."""
        n = min(self.heatmaps, len(data))
        if n == 0:
            return []
        batch = _collate([data[i] for i in range(n)])
        out = head_outputs(guide, batch)
        _, sim = aligned_codes(out, guide.alignment_losses["ras"].project)
        h, w = out.z_q.shape[-2:]
        maps = []
        for b in range(n):
            length = int(out.text.tokens.lengths[b])
            ids = out.text.tokens.ids[b, :length].tolist()
            maps.append({"index": int(batch["index"][b]) if "index" in batch else b,
                         "caption": batch["caption"][b], "grid": [h, w],
                         "words": token_strings(guide.text_encoder, ids),
                         "special": out.text.tokens.special_mask[b, :length].tolist(),
                         "similarity": rearrange(sim[b, :length], "l (h w) -> l h w", h=h, w=w)
                         .round(decimals=4).cpu().tolist()})
        return maps


def pair_reference_sums(out: HeadOutputs, n_star: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
    """Over the counted word pairs (l ≠ m, both real): how many share their aligned code
    (identical z_q vectors), how many share the visual position, Σ s and Σ s² of their
    word–word cosines s (all float64 0-d tensors)."""
    length = real.shape[1]
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=real.device)
    codes = rearrange(out.z_q, "b d h w -> b (h w) d")
    codes = torch.gather(codes, 1, n_star[..., None].expand(-1, -1, codes.shape[-1]))  # (B, L, D)
    same_code = (codes[:, :, None, :] == codes[:, None, :, :]).all(-1)
    same_position = n_star[:, :, None] == n_star[:, None, :]
    t = F.normalize(out.text.token_feats.double(), dim=-1, eps=1e-6)
    s = (t @ t.transpose(1, 2))[pairs]
    return [(same_code & pairs).sum().double(), (same_position & pairs).sum().double(), s.sum(), s.square().sum()]


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return default_collate(samples)


__all__ = ["CodeWordAlignment", "aligned_codes", "pair_reference_sums"]
