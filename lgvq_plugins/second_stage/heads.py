"""``CodeReader``: a small bidirectional transformer reading an image's codes together with
a question or referring expression, for the understanding tasks (VQA, grounding).

Input: the codes' frozen codebook vectors (B, N, D) (what the tokenizer kept of the image)
and word ids (B, L) (0 = padding); a learned summary token reads both. Output: the summary
token's state through a linear head (B, out) — answer logits for VQA, a box for grounding.
Attention is ``F.scaled_dot_product_attention`` (through ``nn.TransformerEncoderLayer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

import gin
from lgvq_plugins.second_stage.train import TensorRows, TrainSettings, train_rows


@gin.configurable("CodeReader")
class CodeReader(nn.Module):
    """Transformer over [summary; codes; words] → (B, ``out_dim``).

    Args:
        code_dim: codebook vector width D; num_codes_max: longest code sequence.
        vocab_size, max_words: word vocabulary (id 0 = padding) and longest text.
        out_dim: head outputs.
        width, depth, heads: transformer size.
    """

    def __init__(self, code_dim: int, num_codes_max: int, vocab_size: int, max_words: int, out_dim: int,
                 width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        # no LayerNorm on the codebook vectors: their norm and mean carry information
        self.code_proj = nn.Linear(code_dim, width)
        self.code_pos = nn.Parameter(torch.randn(1, num_codes_max, width) * 0.02)
        self.words = nn.Embedding(vocab_size, width, padding_idx=0)
        self.word_pos = nn.Parameter(torch.randn(1, max_words, width) * 0.02)
        self.summary = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, code_vectors: Tensor, words: Tensor) -> Tensor:
        b, n, _ = code_vectors.shape
        x = torch.cat([self.summary.expand(b, -1, -1), self.code_proj(code_vectors.float()) + self.code_pos[:, :n],
                       self.words(words) + self.word_pos[:, : words.shape[1]]], 1)
        pad = torch.cat([words.new_zeros(b, 1 + n, dtype=torch.bool), words == 0], 1)  # True: ignore
        return self.head(self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0]))


def train_reader(model: nn.Module, inputs: tuple[Tensor, ...], targets: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], settings: TrainSettings, *,
                 run_dir: str | Path | None = None) -> float:
    """Train ``model`` on rows of ``inputs`` (each (N, ...)) and ``targets`` (N, ...) with the
    project's trainer (:func:`~lgvq_plugins.second_stage.train.train_rows`: checkpoints and
    logs in ``run_dir``, resume, DDP); returns the last loss.

    AdamW with torch's default betas (0.9, 0.999), as these heads were tuned with. The inputs
    are cached tensors (code vectors, word ids): nothing is re-encoded."""
    rows = TensorRows(target=targets, **{f"input{i}": t for i, t in enumerate(inputs)})
    count = len(inputs)

    def reader_loss(m: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return loss_fn(m(*(batch[f"input{i}"] for i in range(count))), batch["target"])

    return train_rows(model, reader_loss, rows, settings, run_dir=run_dir, betas=(0.9, 0.999))["loss"]


__all__ = ["CodeReader", "train_reader"]


def code_vectors(tokenizer: nn.Module, codes: Tensor) -> Tensor:
    """(N, h·w, D) float32 CPU: the frozen codebook vectors of codes (N, h, w)."""
    device = next(tokenizer.parameters()).device
    with torch.no_grad():
        return tokenizer.quantizer.embed(codes.to(device)).flatten(2).transpose(1, 2).float().cpu()


__all__ += ["code_vectors"]
