"""``retrieval``: image→text and text→image Recall@1/5 with the global visual token (Figure 4).

Each evaluated image's global visual token v_0 (through the gsa head's projection, so it
lives in the caption-feature space) is compared by cosine similarity with every evaluated
caption's global feature g. Image i's right answers are the captions *equal as strings* to
its own (procedural captions repeat: "there is a red circle"), and caption j's right answers
are the images whose caption equals it. Recall@k is the fraction of queries with a right
answer among the k most similar candidates; the candidate pool is the whole evaluated set,
gathered from all ranks in sample order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lgvq_plugins.tasks.probe import guidance_heads, head_outputs
from torch import nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.scores import recall_at_k
from lgvq_plugins.evaluation.task import TaskResult, batches, gather_rows, shard
from lgvq_plugins.training import distributed as D


class Retrieval:
    """Image↔text Recall@k (gin: ``retrieval.*``).

    Args:
        ks: recall cut-offs (paper: 1 and 5).
        batch_size: images per forward pass.
        max_images: evaluate the first ``max_images`` samples (None: all).
        heads: ``"auto"`` (the model's own gsa head; an alignment probe for an unguided
            tokenizer), ``"own"`` or ``"probe"``.
        probe_data: data set the probe trains on (default: the ``train`` split of ``data``).
    """

    needs = "guided"
    supports_unguided = True  # through the alignment probe (docs/evaluation.md)

    def __init__(self, ks: Sequence[int] = (1, 5), batch_size: int = 32, max_images: int | None = None,
                 heads: str = "auto", probe_data: Dataset | None = None):
        self.ks = tuple(int(k) for k in ks)
        self.batch_size, self.max_images, self.heads, self.probe_data = int(batch_size), max_images, heads, probe_data

    def run(self, model: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        guide, head_protocol = guidance_heads(model, data, heads=self.heads, need="gsa", probe_data=self.probe_data)
        gsa = guide.alignment_losses["gsa"]
        device = next(guide.parameters()).device
        visual, text, captions = [], [], []
        _, total = shard(data, self.max_images)
        for batch in batches(data, self.batch_size, self.max_images):
            out = head_outputs(guide, batch)
            visual.append(F.normalize(gsa.proj(out.visual_tokens[:, 0]).double(), dim=-1))
            text.append(F.normalize(out.text.global_feat.double(), dim=-1))
            captions.extend(batch["caption"])
        width = guide.text_encoder.global_width
        empty = torch.zeros(0, width, dtype=torch.float64, device=device)
        v = gather_rows(torch.cat(visual) if visual else empty)
        g = gather_rows(torch.cat(text) if text else empty)
        # captions in sample order: rank r's j-th caption is sample r + j·world
        per_rank = D.all_gather_json(captions)
        world = len(per_rank)
        ordered = [per_rank[i % world][i // world] for i in range(sum(len(c) for c in per_rank))]
        n = v.shape[0]
        metrics: dict[str, float | None] = {}
        unavailable: dict[str, str] = {}
        if n < 2:
            for d in ("i2t", "t2i"):
                for k in self.ks:
                    metrics[f"{d}_r@{k}"] = None
                    unavailable[f"{d}_r@{k}"] = f"retrieval needs at least 2 images, got {n}"
        else:
            ids = {c: i for i, c in enumerate(dict.fromkeys(ordered))}
            caption_id = torch.tensor([ids[c] for c in ordered], device=v.device)
            positives = caption_id[:, None] == caption_id[None, :]  # (images, captions)
            sim = v @ g.T
            for k, r in recall_at_k(sim, positives, self.ks).items():
                metrics[f"i2t_r@{k}"] = r
            for k, r in recall_at_k(sim.T, positives.T, self.ks).items():
                metrics[f"t2i_r@{k}"] = r
        distinct = len(set(ordered))
        protocol = {"split": getattr(data, "split", None), "images": n, "captions": n,
                    "distinct_captions": distinct, "images_requested": total,
                    "chance_i2t_r@1": (sum(ordered.count(c) for c in ordered) / n / n) if n else None,
                    "positives": "candidates whose caption string equals the query's",
                    "visual": "gsa.proj(v_0), cosine similarity", "text": "caption global feature",
                    "text_encoder": getattr(guide.text_encoder, "identity", None), **head_protocol}
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable)


__all__ = ["Retrieval"]
