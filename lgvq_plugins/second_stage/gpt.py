"""``CodeGPT``: a GPT-style transformer over a frozen tokenizer's code indices.

The image's codes are read in raster order (row by row of the ``h×w`` grid) as a sequence
of ``N = h·w`` tokens. An optional *conditioning prefix* — any sequence of feature vectors
(B, P, C): a caption's per-token text features, another image's codes embedded, a semantic
map's codes — is projected to the model width and placed before a learned start token, as
in taming-transformers' Net2Net. Every position attends causally (prefix included) and
prefix padding is masked out as keys, so a caption of 3 tokens and one of 12 condition
alike. Attention is ``F.scaled_dot_product_attention``.

Shapes: codes (B, N) int64 in ``[0, K)``; logits (B, N, K), logits[:, i] predicting code i
from the prefix and codes ``< i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gin
from lgvq_plugins.second_stage.sampling import sample_next


class _Block(nn.Module):
    """Pre-LN transformer block (attention + GELU MLP) with SDPA."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"CodeGPT.width ({width}) must be divisible by CodeGPT.heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


@gin.configurable("CodeGPT")
class CodeGPT(nn.Module):
    """Autoregressive prior over code indices, optionally conditioned on a prefix.

    Args:
        num_codes: codebook size K of the tokenizer.
        seq_len: codes per image N (``h·w``).
        cond_dim: feature width C of the conditioning prefix (None: unconditional).
        max_prefix: longest prefix (learned positional embeddings for the prefix).
        width, depth, heads: transformer size.
        dropout: attention / MLP dropout while training.
        pad_id: a token that is never a target (variable-length sequences such as captions);
            None: every position is a target.
    """

    def __init__(self, num_codes: int, seq_len: int, cond_dim: int | None = None, max_prefix: int = 64,
                 width: int = 128, depth: int = 4, heads: int = 4, dropout: float = 0.0, pad_id: int | None = None):
        super().__init__()
        self.pad_id = pad_id
        self.num_codes, self.seq_len = int(num_codes), int(seq_len)
        self.cond_dim, self.max_prefix = (int(cond_dim) if cond_dim else None), int(max_prefix)
        self.tok = nn.Embedding(self.num_codes, width)
        self.pos = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.sos = nn.Parameter(torch.zeros(1, 1, width))
        if self.cond_dim:
            self.cond_proj = nn.Sequential(nn.LayerNorm(self.cond_dim), nn.Linear(self.cond_dim, width))
            self.cond_pos = nn.Parameter(torch.zeros(1, self.max_prefix, width))
        self.blocks = nn.ModuleList(_Block(width, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.num_codes, bias=False)
        for p in (self.pos, self.sos, *([self.cond_pos] if self.cond_dim else [])):
            nn.init.normal_(p, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _prefix(self, prefix: Tensor | None, prefix_mask: Tensor | None, batch: int
                ) -> tuple[Tensor | None, Tensor | None]:
        if self.cond_dim is None:
            if prefix is not None:
                raise ValueError("this CodeGPT is unconditional (cond_dim=None) but got a prefix")
            return None, None
        if prefix is None:
            raise ValueError(f"this CodeGPT is conditioned (cond_dim={self.cond_dim}); pass a prefix (B, P, C)")
        if prefix.shape[-1] != self.cond_dim or prefix.shape[0] != batch:
            raise ValueError(f"prefix has shape {tuple(prefix.shape)}; expected ({batch}, P, {self.cond_dim})")
        if prefix.shape[1] > self.max_prefix:
            raise ValueError(f"prefix of {prefix.shape[1]} vectors exceeds CodeGPT.max_prefix={self.max_prefix}; "
                             "raise it (gin: CodeGPT.max_prefix)")
        p = self.cond_proj(prefix.float()) + self.cond_pos[:, : prefix.shape[1]]
        if prefix_mask is None:
            prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        return p, prefix_mask.bool()

    def forward(self, codes: Tensor, prefix: Tensor | None = None, prefix_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, K) for codes[:, :T] given the prefix; ``codes`` (B, T) with T ≤ N
        (the last code is only a target: the input is start token + codes[:, :T-1])."""
        b, t = codes.shape
        if t > self.seq_len or t < 1:
            raise ValueError(f"codes of length {t}; this CodeGPT models 1..{self.seq_len} codes")
        x = torch.cat([self.sos.expand(b, -1, -1), self.tok(codes[:, : t - 1])], 1) + self.pos[:, :t]
        p, pmask = self._prefix(prefix, prefix_mask, b)
        if p is not None:
            x = torch.cat([p, x], 1)
        total, n_pre = x.shape[1], x.shape[1] - t
        mask = torch.ones(total, total, dtype=torch.bool, device=x.device).tril()[None, None]  # causal
        if pmask is not None:
            keys = torch.cat([pmask, pmask.new_ones(b, t)], 1)  # (B, total): padding keys off
            mask = mask & keys[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x[:, n_pre:]))

    def loss(self, codes: Tensor, prefix: Tensor | None = None, prefix_mask: Tensor | None = None) -> Tensor:
        """Mean next-code cross-entropy (nats per code; ``pad_id`` targets left out)."""
        logits = self(codes, prefix, prefix_mask)
        return F.cross_entropy(logits.reshape(-1, self.num_codes).float(), codes.reshape(-1),
                               ignore_index=-100 if self.pad_id is None else self.pad_id)

    @torch.no_grad()
    def sample(self, batch: int, *, prefix: Tensor | None = None, prefix_mask: Tensor | None = None,
               given: Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Codes (B, N): the first ``given.shape[1]`` copied from ``given`` (completion), the
        rest drawn one at a time (each step re-runs the model on the sequence so far)."""
        device = self.sos.device
        codes = torch.zeros(batch, 0, dtype=torch.long, device=device)
        if given is not None:
            codes = given.to(device).long().reshape(batch, -1)
        for _ in range(codes.shape[1], self.seq_len):
            # a dummy last code makes the sequence one longer; its logits are the next code's
            step = torch.cat([codes, codes.new_zeros(batch, 1)], 1)
            logits = self(step, prefix, prefix_mask)[:, -1]
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            codes = torch.cat([codes, nxt[:, None]], 1)
        return codes


__all__ = ["CodeGPT"]
