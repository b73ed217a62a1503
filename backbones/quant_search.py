"""Chunked nearest-code search shared by the built-in quantizers.

The squared distance ``‖x‖² − 2 x·e + ‖e‖²`` is computed tile by tile with one fused
``addmm`` per tile, so at most ``chunk_size`` entries of the N×K distance matrix exist at a
time (K = 65,536 codes × N = 16,384 vectors would be 4 GiB in fp32 if materialised).

Besides the nearest code of every vector (a running argmin over code tiles), the same pass
can reduce over *vectors* for every code, which CVQ needs to pick re-anchoring features:

* ``per_code="closest"``: for each code, the vector nearest to it;
* ``per_code="sample"``: for each code, one vector drawn with probability
  ``softmax_n(-logit_scale · ‖x_n − e_k‖²)``, by the Gumbel-max trick (``argmax_n`` of the
  logits plus independent Gumbel noise), which needs no normalisation over all N and so
  works tile by tile. The per-code maxima of several processes can be compared to draw
  from the union of their vectors (see :mod:`lgvq_plugins.backbones.cvq`).

Everything here runs without autograd; callers gather the chosen codes themselves.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

#: default number of distance entries held at once (4 Mi entries = 16 MiB in fp32).
DEFAULT_CHUNK_SIZE = 2**22
#: fewest vector rows per tile when the budget allows: a matmul with only a handful of rows
#: runs far below peak, so for very large K the codes are split instead of the rows.
MIN_TILE_ROWS = 256

PerCode = Literal["closest", "sample"]


class SearchResult(NamedTuple):
    """What :func:`nearest_codes` returns.

    Attributes:
        indices: (N,) int64 index of the nearest code of every vector (first on ties).
        distances: (N,) fp32 squared distance to that code.
        code_score: (K,) per-code best score over the vectors (``-distance`` for
            ``closest``; ``-logit_scale·distance + Gumbel`` for ``sample``), or None.
        code_arg: (K,) int64 index of the vector achieving ``code_score``, or None.
    """

    indices: Tensor
    distances: Tensor
    code_score: Tensor | None = None
    code_arg: Tensor | None = None


def tile_shape(num_vectors: int, num_codes: int, chunk_size: int) -> tuple[int, int]:
    """(rows, codes) of one distance tile holding at most ``chunk_size`` entries.

    All codes go in one tile while that leaves room for ``MIN_TILE_ROWS`` rows (the common
    case: a plain row-blocked search with no merging across code tiles); beyond that the
    tile keeps ``MIN_TILE_ROWS`` rows and splits the codes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of distance entries, got {chunk_size}")
    if chunk_size // num_codes >= min(MIN_TILE_ROWS, num_vectors):
        return max(1, min(num_vectors, chunk_size // num_codes)), num_codes
    rows = max(1, min(num_vectors, MIN_TILE_ROWS, chunk_size))
    return rows, max(1, min(num_codes, chunk_size // rows))


@torch.no_grad()
def nearest_codes(
    x: Tensor,
    codes: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    per_code: PerCode | None = None,
    logit_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> SearchResult:
    """Nearest code (squared L2) of every row of ``x``, computed in bounded memory.

    Args:
        x: (N, C) vectors; converted to fp32.
        codes: (K, C) codebook; converted to fp32.
        chunk_size: the most distance entries computed at once (one tile).
        per_code: also reduce over vectors for every code (see the module docstring).
        logit_scale: temperature of ``per_code="sample"``: logits are
            ``-logit_scale · distance``.
        generator: random source of the Gumbel noise for ``per_code="sample"``.
    """
    if x.dim() != 2 or codes.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_codes expects x (N, C) and codes (K, C); got {tuple(x.shape)} "
                         f"and {tuple(codes.shape)}")
    x = x.float().contiguous()
    codes = codes.float().contiguous()
    n_vec, n_codes = x.shape[0], codes.shape[0]
    device = x.device
    rows, cols = tile_shape(n_vec, n_codes, chunk_size)

    codes_sq = codes.pow(2).sum(1)  # (K,)
    x_sq = x.pow(2).sum(1)  # (N,)
    indices = torch.empty(n_vec, dtype=torch.long, device=device)
    best = torch.empty(n_vec, dtype=torch.float32, device=device)
    if per_code is not None:
        code_score = torch.full((n_codes,), float("-inf"), device=device)
        code_arg = torch.zeros(n_codes, dtype=torch.long, device=device)
    # One flat buffer reused by every tile: a contiguous view of its head is a valid `out=`,
    # which spares a large allocation (and its page faults) per tile.
    buffer = torch.empty(rows * cols, dtype=torch.float32, device=device)
    noise_buffer = torch.empty_like(buffer) if per_code == "sample" else None

    for n0 in range(0, n_vec, rows):
        n1 = min(n0 + rows, n_vec)
        xb = x[n0:n1]
        for k0 in range(0, n_codes, cols):
            k1 = min(k0 + cols, n_codes)
            tile = buffer[: (n1 - n0) * (k1 - k0)].view(n1 - n0, k1 - k0)
            # ‖e‖² − 2 x·e: ‖x‖² is constant along a row, so the row argmin does not need it.
            torch.addmm(codes_sq[k0:k1], xb, codes[k0:k1].T, beta=1.0, alpha=-2.0, out=tile)
            vals, args = tile.min(dim=1)
            if k0 == 0:
                best[n0:n1], indices[n0:n1] = vals, args
            else:  # strict < keeps the earlier tile on ties, as one global argmin would
                better = vals < best[n0:n1]
                best[n0:n1] = torch.where(better, vals, best[n0:n1])
                indices[n0:n1] = torch.where(better, args + k0, indices[n0:n1])
            if per_code is not None:
                tile.add_(x_sq[n0:n1, None])  # now the full squared distance
                if per_code == "closest":
                    tile.neg_()
                elif per_code == "sample":
                    tile.mul_(-logit_scale)
                    # −log U ~ Exp(1) and −log Exp(1) ~ Gumbel(0, 1); uniform_ plus two logs is
                    # several times faster on the CPU than exponential_
                    noise = noise_buffer[: tile.numel()].view_as(tile).uniform_(generator=generator)
                    tile.sub_(noise.log_().neg_().log_())
                else:
                    raise ValueError(f"per_code must be 'closest', 'sample' or None, got {per_code!r}")
                # max over dim 0 with indices is several times slower on CPU than amax plus
                # a masked amin over row numbers (which also keeps the first row on ties)
                cvals = tile.amax(dim=0)
                row_ids = torch.arange(n1 - n0, device=device, dtype=torch.int32)[:, None]
                cargs = torch.where(tile == cvals, row_ids, n1 - n0).amin(dim=0).long()
                better = cvals > code_score[k0:k1]
                code_score[k0:k1] = torch.where(better, cvals, code_score[k0:k1])
                code_arg[k0:k1] = torch.where(better, cargs + n0, code_arg[k0:k1])

    distances = (best + x_sq).clamp_min_(0.0)
    if per_code is None:
        return SearchResult(indices, distances)
    return SearchResult(indices, distances, code_score, code_arg)
