"""The layers language guidance adds on top of a tokenizer's codes.

* :class:`CodeTextTransformer` — reads the quantized grid ``z_q`` (B, D, h, w) and gives the
  visual tokens ``v`` (B, 1 + h·w, Dt): a learnable global token first, then one token per
  code, in the text encoder's width so they can be compared with word features.
* :class:`TextDecoder` — reads (masked) caption token features and cross-attends to ``v``
  (the masked-text-prediction branch).
* :class:`MLMHead` — turns decoder states into vocabulary logits, tied to the text
  encoder's frozen token-embedding matrix.

Every LayerNorm uses ``eps >= 1e-5`` by default and every attention mask is boolean, so the
layers are safe under fp16/bf16 autocast (trap §2.3 of the design). The text decoder's eps is
settable (``mtp.norm_eps``): the reference's 1e-12 is still safe under autocast (LayerNorm
runs in fp32 there) but not in a model cast to half precision with ``.half()``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

#: LayerNorm epsilon of the layers here (default): 1e-12 (the reference) underflows in fp16.
LN_EPS = 1e-5

#: feed-forward activations of the text decoder (reference: ReLU; ours: GELU, as BERT).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _grid_tuple(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


class CodeTextTransformer(nn.Module):
    """Quantized grid → visual tokens ``v`` (B, 1 + h·w, out_dim), global token first.

    Flatten ``z_q`` to h·w tokens, project D → ``width``, prepend a learnable global token,
    add learnable positional embeddings (sized from ``grid``), run ``depth`` pre-LN
    transformer blocks, then LayerNorm and project to ``out_dim`` (the text width Dt).

    A grid other than the one the positional embeddings were built for (evaluation at
    another resolution) is served by bicubic interpolation of the grid part, as ViTs do.

    Args:
        in_dim: D, the channel width of ``z_q``.
        out_dim: Dt, the width of the text encoder's token features.
        grid: (h, w) latent grid the positional embeddings are sized for.
        width: transformer width.
        depth: number of transformer blocks (reference: 2).
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of each block's MLP as a multiple of ``width``.
        dropout: dropout on attention weights and block outputs.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int | tuple[int, int], *, width: int = 256,
                 depth: int = 2, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"code-text transformer width {width} is not divisible by heads {heads}; "
                             "set LanguageGuided.width / LanguageGuided.heads so that it is")
        self.grid = _grid_tuple(grid)
        h, w = self.grid
        self.in_dim, self.out_dim, self.width = in_dim, out_dim, width
        self.proj_in = nn.Linear(in_dim, width)
        self.global_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + h * w, width))
        norm = partial(nn.LayerNorm, eps=LN_EPS)
        # imported here: timm is slow to import
        from timm.models.vision_transformer import Block

        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                  attn_drop=dropout, norm_layer=norm)
            for _ in range(depth)
        )
        self.norm = norm(width)
        self.proj_out = nn.Linear(width, out_dim)
        head_init_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.global_token, std=0.02)

    def positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + h·w, width) embeddings for ``grid``, interpolated if it is not the built one."""
        if grid == self.grid:
            return self.pos_embed
        h0, w0 = self.grid
        glob, spatial = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        spatial = rearrange(spatial, "1 (h w) c -> 1 c h w", h=h0, w=w0)
        spatial = F.interpolate(spatial.float(), size=grid, mode="bicubic", align_corners=False)
        spatial = rearrange(spatial, "1 c h w -> 1 (h w) c").to(self.pos_embed.dtype)
        return torch.cat([glob, spatial], dim=1)

    def hidden(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) → (B, 1 + h·w, width): the normalised states before the output
        projection, so ``forward(z_q) == proj_out(hidden(z_q))``."""
        if z_q.dim() != 4 or z_q.shape[1] != self.in_dim:
            raise ValueError(f"code-text transformer expects z_q of shape (B, {self.in_dim}, h, w), "
                             f"got {tuple(z_q.shape)}")
        b, _, h, w = z_q.shape
        x = self.proj_in(rearrange(z_q, "b d h w -> b (h w) d"))
        x = torch.cat([self.global_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding((h, w)).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, z_q: Tensor) -> Tensor:
        """(B, D, h, w) → (B, 1 + h·w, out_dim)."""
        return self.proj_out(self.hidden(z_q))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value projections (self- or
    cross-attention), through ``scaled_dot_product_attention`` with a *boolean* mask."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None,
                context_map: nn.Linear | None = None) -> Tensor:
        """(B, L, C) queries attend to (B, N, C) ``context``; ``key_padding_mask`` (B, N) is
        True at keys to ignore.

        With ``context_map``, ``context`` is given *before* that linear map (B, N, C') and
        keys/values are computed as ``kv(context_map(context))`` by composing the two weight
        matrices first: the same function and gradients, at C'/C of the cost when C' < C
        (the code–text transformer's states are narrower than the text width).
        """
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        if context_map is None:
            kv = self.kv(context)
        else:
            weight = self.kv.weight @ context_map.weight
            bias = self.kv.bias + (self.kv.weight @ context_map.bias if context_map.bias is not None else 0)
            kv = F.linear(context, weight.to(context.dtype), bias.to(context.dtype))
        k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=self.heads)
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(o, "b h l d -> b l (h d)"))


class DecoderLayer(nn.Module):
    """Post-LN transformer decoder layer: self-attention, cross-attention, feed-forward, each
    followed by dropout, residual add and LayerNorm (as BERT and the reference).

    Args:
        width: model width.
        heads: attention heads.
        mlp_ratio: feed-forward hidden width as a multiple of ``width`` (if ``mlp_hidden`` is None).
        dropout: on each sub-layer's output and after the feed-forward activation (the
            reference's places).
        mlp_hidden: feed-forward hidden width, overriding ``mlp_ratio`` (reference: 512).
        activation: ``"gelu"`` or ``"relu"`` (reference).
        norm_eps: LayerNorm epsilon (reference: 1e-12).
        attn_dropout: dropout on the attention weights (the reference has none).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, *,
                 mlp_hidden: int | None = None, activation: str = "gelu", norm_eps: float = LN_EPS,
                 attn_dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"text decoder activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r} (mtp.activation)")
        self.self_attn = Attention(width, heads, attn_dropout)
        self.cross_attn = Attention(width, heads, attn_dropout)
        hidden = int(mlp_hidden) if mlp_hidden is not None else int(width * mlp_ratio)
        # activation and its dropout share one slot, so the parameter names (mlp.0, mlp.2)
        # do not depend on whether there is dropout
        self.mlp = nn.Sequential(nn.Linear(width, hidden),
                                 nn.Sequential(ACTIVATIONS[activation](), nn.Dropout(dropout)),
                                 nn.Linear(hidden, width))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width, eps=norm_eps) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, padding_mask: Tensor,
                context_map: nn.Linear | None = None) -> Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, x, padding_mask)))
        x = self.norm2(x + self.drop(self.cross_attn(x, context, context_map=context_map)))
        return self.norm3(x + self.drop(self.mlp(x)))


class TextDecoder(nn.Module):
    """Masked caption features + visual tokens → per-token states (B, L, width).

    Post-LN layers (as the reference): self-attention over the real (non-padding) tokens
    of each caption, cross-attention to every visual token, then a feed-forward block. No
    positional encoding (as the reference): masked positions are replaced by a learned mask
    embedding *per position*, so the decoder knows where a word is missing without seeing
    it, and the unmasked features are contextual already.

    The reference's padding mask has the wrong shape ((B, 1, 1), holding the caption
    lengths) and masks nothing, so its real tokens attend to zeroed padding slots; here
    padding keys are masked — the one deliberate difference from ``guidance/reference.gin``.

    Args:
        width: Dt, the width of the token features (and of the visual tokens).
        max_length: L, caption length of the text encoder (one mask embedding per position).
        depth: decoder layers (reference: 2).
        heads: attention heads (must divide ``width``).
        mlp_ratio: feed-forward hidden width as a multiple of ``width``.
        dropout: dropout inside the layers (see :class:`DecoderLayer`).
        mlp_hidden, activation, norm_eps, attn_dropout: see :class:`DecoderLayer`.
    """

    def __init__(self, width: int, max_length: int, *, depth: int = 2, heads: int = 8,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, mlp_hidden: int | None = None,
                 activation: str = "gelu", norm_eps: float = LN_EPS, attn_dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"text decoder width {width} (the text encoder's width) is not divisible "
                             f"by heads {heads}; set mtp.heads to a divisor of {width}")
        self.width, self.max_length = width, max_length
        self.mask_embed = nn.Parameter(torch.zeros(max_length, width))
        nn.init.trunc_normal_(self.mask_embed, std=0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(width, heads, mlp_ratio, dropout, mlp_hidden=mlp_hidden, activation=activation,
                         norm_eps=norm_eps, attn_dropout=attn_dropout)
            for _ in range(depth))
        head_init_(self.layers)

    def forward(self, token_feats: Tensor, mask: Tensor, padding_mask: Tensor, visual_tokens: Tensor,
                visual_map: nn.Linear | None = None) -> Tensor:
        """
        Args:
            token_feats: (B, L, width) frozen text features of the *unmasked* caption.
            mask: (B, L) bool, True where the token is hidden (replaced by the mask embedding).
            padding_mask: (B, L) bool, True at padding (ignored as attention keys).
            visual_tokens: (B, 1 + h·w, width); or, with ``visual_map``, the states that map
                gives them from (see :meth:`CodeTextTransformer.hidden`), which is cheaper.
            visual_map: the linear map from ``visual_tokens`` as passed to the real ones.

        Returns:
            (B, L, width) decoder states; rows at padding positions are meaningless.
        """
        length = token_feats.shape[1]
        if length > self.max_length:
            raise ValueError(f"captions have {length} tokens but the text decoder was built for "
                             f"{self.max_length} (the text encoder's max_length)")
        # Cached features are fp32; follow the decoder's own dtype (autocast still applies).
        dtype = self.mask_embed.dtype
        x = torch.where(mask[..., None], self.mask_embed[:length], token_feats.to(dtype))
        # A caption with no real token at all would leave a query row with every key masked
        # (NaN softmax); keep its first position visible instead.
        padding_mask = padding_mask.clone()
        padding_mask[:, 0] &= ~padding_mask.all(dim=1)
        for layer in self.layers:
            x = layer(x, visual_tokens.to(dtype), padding_mask, visual_map)
        return x


class MLMHead(nn.Module):
    """Decoder states → vocabulary logits, tied to the frozen token embeddings ``E`` (V, De).

    Linear(width → De) → GELU → LayerNorm, then ``logits = h · Eᵀ + b``. Only the Linear,
    the LayerNorm and the bias ``b`` (V,) are trained; ``E`` is passed in at call time so it
    stays with the frozen text encoder (never in this module's state).
    """

    def __init__(self, width: int, embed_dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: Tensor, embeddings: Tensor) -> Tensor:
        """(..., width) states and (V, De) embeddings → (..., V) logits."""
        if embeddings.shape[0] != self.bias.shape[0] or embeddings.shape[1] != self.dense.out_features:
            raise ValueError(f"MLM head was built for a vocabulary of shape "
                             f"({self.bias.shape[0]}, {self.dense.out_features}); got embeddings of "
                             f"shape {tuple(embeddings.shape)}")
        h = self.norm(F.gelu(self.dense(states)))
        return F.linear(h, embeddings.detach().to(h.dtype), self.bias.to(h.dtype))


def head_init_(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal init for Linear weights, zeros for biases (BERT-style heads)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "ACTIVATIONS",
    "LN_EPS",
    "Attention",
    "CodeTextTransformer",
    "DecoderLayer",
    "MLMHead",
    "TextDecoder",
    "head_init_",
]
