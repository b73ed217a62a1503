"""Figures for ``report.html``: PNG bytes made with matplotlib's Agg backend (no display),
embedded in the page as ``data:`` URIs so the report opens from disk with no network.

    uri = png_data_uri(loss_curves(read_jsonl("runs/x/logs/metrics.jsonl")))

The drawing functions return PNG bytes; :func:`png_data_uri` turns them into an ``<img src>``.
The last part computes what the figures show from a model (reconstructions, code counts,
word→code similarities).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.codebook import codebook_stats
from lgvq_plugins.evaluation.task import is_guided, model_device, tokenizer_of

#: training-log keys plotted as loss curves, in this order (those present in the log).
LOSS_KEYS: tuple[str, ...] = ("total", "rec", "perceptual", "quant", "g_gan", "disc_loss",
                              "lg_gsa", "lg_mtp", "lg_ras")
#: validation-log keys plotted next to them.
VAL_KEYS: tuple[str, ...] = ("psnr", "codebook_usage", "perplexity")


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported late: matplotlib is slow to import,
    and a report is the only user)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("report figures need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _to_uint8(images: Any) -> np.ndarray:
    """(N, 3, H, W) tensor/array in [-1, 1] → (N, H, W, 3) uint8."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=np.float32)
    arr = np.clip((arr + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


def reconstruction_grid(originals: Any, reconstructions: Any, *, min_side: int = 96) -> bytes:
    """Originals (top row) above their reconstructions (bottom row), as a PNG.

    Images in [-1, 1], (N, 3, H, W). Small images are enlarged with nearest-neighbour
    sampling (no smoothing hides or invents detail) so each is at least ``min_side`` pixels.
    """
    from PIL import Image

    top, bottom = _to_uint8(originals), _to_uint8(reconstructions)
    if top.shape != bottom.shape:
        raise ValueError(f"reconstruction_grid: originals {top.shape} and reconstructions {bottom.shape} differ")
    n, h, w, _ = top.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    pad = 2
    canvas = np.full((2 * h * scale + 3 * pad, n * (w * scale + pad) + pad, 3), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        for i, img in enumerate(images):
            big = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + row * (h * scale + pad), pad + i * (w * scale + pad)
            canvas[y:y + h * scale, x:x + w * scale] = big
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def usage_histogram(counts: Sequence[float], *, title: str | None = None) -> bytes:
    """Codes sorted by how often they were chosen (log scale), with the share used.

    ``counts[k]`` is how often code k was chosen over the whole evaluation set.
    """
    plt = _pyplot()
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"usage_histogram needs a 1-D list of per-code counts, got shape {c.shape}")
    order = np.sort(c)[::-1]
    used = int((c > 0).sum())
    perplexity = float(codebook_stats(torch.from_numpy(c)).perplexity) if used else 0.0
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(np.arange(c.size), np.maximum(order, 0.5), width=1.0, color="#3b6ea5")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, c.size - 0.5)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("times chosen")
    ax.set_title(title or f"{used}/{c.size} codes used ({100.0 * used / c.size:.1f} %), "
                          f"perplexity {perplexity:.1f}", fontsize=10)
    return _png(fig)


def loss_curves(records: Sequence[Mapping[str, Any]], *, keys: Sequence[str] = LOSS_KEYS,
                val_keys: Sequence[str] = VAL_KEYS) -> bytes:
    """Small multiples of the training losses and validation metrics of ``logs/metrics.jsonl``
    records (``{"step", "split", <name>: value}``); one panel per key present in the log."""
    plt = _pyplot()
    series: list[tuple[str, list[int], list[float]]] = []
    for split, wanted in (("train", keys), ("val", val_keys)):
        rows = [r for r in records if r.get("split") == split]
        for key in wanted:
            pts = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
            if pts and any(v != 0.0 for _, v in pts):  # an all-zero term (e.g. GAN before it starts) says nothing
                steps, values = zip(*pts)
                series.append((f"{split}/{key}", list(steps), list(values)))
    if not series:
        raise ValueError("loss_curves: the log has no train/val records with the plotted keys "
                         f"(train: {', '.join(keys)}; val: {', '.join(val_keys)})")
    cols = min(4, len(series))
    rows_n = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax, (name, steps, values) in zip(axes.flat, series):
        ax.plot(steps, values, lw=1.2, color="#c0504d" if name.startswith("val") else "#3b6ea5",
                marker="o" if len(steps) < 12 else None, ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def similarity_heatmaps(image: Any, words: Sequence[str], similarity: Any, *, caption: str | None = None) -> bytes:
    """The paper's Figure 6 for one caption: the image, then for each word the cosine
    similarity between the word's text feature and every code's visual token, as a map over
    the code grid laid on the image.

    Args:
        image: (3, H, W) in [-1, 1].
        words: the caption's tokens (special tokens already removed), one per row of ``similarity``.
        similarity: (L, h, w) similarities, L = len(words).
    """
    plt = _pyplot()
    sims = similarity.detach().float().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    if sims.ndim != 3 or sims.shape[0] != len(words):
        raise ValueError(f"similarity_heatmaps: need (len(words)={len(words)}, h, w) similarities, got {sims.shape}")
    img = _to_uint8(image[None] if getattr(image, "ndim", 0) == 3 else image)[0]
    h, w = img.shape[:2]
    n = len(words) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.5 * n, 1.8), squeeze=False)
    axes = axes[0]
    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    lo, hi = float(sims.min()), float(sims.max())
    for ax, word, sim in zip(axes[1:], words, sims):
        ax.imshow(img, interpolation="nearest")
        # one colour scale per caption, so the words' maps compare with each other
        ax.imshow(sim, cmap="jet", alpha=0.55, vmin=lo, vmax=hi, interpolation="nearest",
                  extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        ax.set_title(word, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if caption:
        fig.suptitle(caption, fontsize=9, y=1.04)
    return _png(fig)


def comparison_bars(table: Mapping[str, Mapping[str, tuple[float, float, int]]], metrics: Sequence[str]) -> bytes:
    """Bar chart (mean ± std over seeds) of ``metrics`` for each variant.

    ``table[metric][variant] = (mean, std, n)``.
    """
    plt = _pyplot()
    metrics = [m for m in metrics if m in table]
    if not metrics:
        raise ValueError("comparison_bars: none of the requested metrics is in the table")
    variants = sorted({v for m in metrics for v in table[m]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 2.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        cells = [table[metric].get(v, (float("nan"), 0.0, 0)) for v in variants]
        ax.bar(range(len(variants)), [c[0] for c in cells], yerr=[c[1] for c in cells], capsize=3,
               color="#3b6ea5")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------
# Figures from a model
# ---------------------------------------------------------------------------------------


def _first_images(data: Dataset, n: int) -> tuple[torch.Tensor, list[str | None]]:
    n = min(n, len(data))
    samples = [data[i] for i in range(n)]
    return torch.stack([s["image"] for s in samples]), [s.get("caption") for s in samples]


@torch.no_grad()
def reconstruction_png(model: nn.Module, data: Dataset, num_images: int = 8) -> bytes:
    """Originals above their reconstructions for the first ``num_images`` of ``data``."""
    tokenizer = tokenizer_of(model)
    x, _ = _first_images(data, num_images)
    rec, _ = tokenizer(x.to(model_device(tokenizer)))
    return reconstruction_grid(x, rec.float().clamp(-1, 1).cpu())


@torch.no_grad()
def usage_counts(model: nn.Module, data: Dataset, max_images: int = 256, batch_size: int = 32) -> list[int]:
    """How often each code is chosen over the first ``max_images`` images of ``data``."""
    tokenizer = tokenizer_of(model)
    num_codes = int(tokenizer.quantizer.num_codes)
    counts = torch.zeros(num_codes, dtype=torch.long)
    device = model_device(tokenizer)
    total = min(max_images, len(data))
    for start in range(0, total, batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(total, start + batch_size))])
        quantized = tokenizer.encode(x.to(device))
        counts += torch.bincount(quantized.indices.reshape(-1).cpu().long(), minlength=num_codes)
    return counts.tolist()


def _token_strings(encoder: Any, ids: Sequence[int]) -> list[str]:
    """Token ids as readable strings (HF: WordPiece pieces; open_clip: BPE pieces)."""
    tok = getattr(encoder, "_tokenizer", None)
    if hasattr(tok, "convert_ids_to_tokens"):
        return [str(t) for t in tok.convert_ids_to_tokens(list(ids))]
    decoder = getattr(tok, "decoder", None)
    if isinstance(decoder, Mapping):
        return [str(decoder.get(i, f"#{i}")).replace("</w>", "") for i in ids]
    return [f"#{i}" for i in ids]


@torch.no_grad()
def word_code_similarity(model: nn.Module, images: torch.Tensor, captions: Sequence[str]
                         ) -> list[tuple[list[str], torch.Tensor]]:
    """Per caption: its words (special tokens and padding removed) and the cosine similarity
    (L, h, w) of each word's text feature to the visual token of every code position — the
    similarity L_ras takes its argmax over."""
    if not is_guided(model):
        raise ValueError("word→code similarity needs a guided model (LanguageGuided with enabled=True)")
    device = model_device(model)
    quantized = model.tokenizer.encode(images.to(device))
    h, w = quantized.z_q.shape[-2:]
    visual = model.code_text.proj_out(model.code_text.hidden(quantized.z_q))[:, 1:]  # (B, h·w, Dt)
    text = model.text_cache(list(captions), device)
    sims = F.normalize(text.token_feats.float(), dim=-1, eps=1e-6) @ \
        F.normalize(visual.float(), dim=-1, eps=1e-6).transpose(1, 2)  # (B, L, h·w)
    keep = ~text.tokens.padding_mask & ~text.tokens.special_mask  # (B, L)
    out = []
    for b in range(images.shape[0]):
        idx = keep[b].nonzero().flatten()
        words = _token_strings(model.text_encoder, text.tokens.ids[b, idx].tolist())
        out.append((words, sims[b, idx].reshape(len(idx), h, w).cpu()))
    return out


def heatmap_pngs(model: nn.Module, data: Dataset, num_captions: int = 3) -> list[tuple[str, bytes]]:
    """(caption, PNG) of Figure-6 style heatmaps for the first ``num_captions`` samples."""
    images, captions = _first_images(data, num_captions)
    if any(c is None for c in captions):
        raise ValueError("the evaluation data has no 'caption' field; heatmaps need captions")
    return [(cap, similarity_heatmaps(img, words, sim, caption=cap))
            for img, cap, (words, sim) in zip(images, captions, word_code_similarity(model, images, captions))]


__all__ = [
    "LOSS_KEYS",
    "VAL_KEYS",
    "comparison_bars",
    "heatmap_pngs",
    "loss_curves",
    "png_data_uri",
    "reconstruction_grid",
    "reconstruction_png",
    "similarity_heatmaps",
    "usage_counts",
    "usage_histogram",
    "word_code_similarity",
]
