"""Worker for the 2-process gsa test (run by torchrun, gloo).

Each rank holds its slice of one global batch. L_gsa with negatives gathered across ranks,
averaged over ranks, must equal the single-process loss over the concatenated batch
(computed here independently, with F.cross_entropy on the full cosine matrix), and each
rank's gradient must be world_size × the single-process gradient of its slice (DDP then
averages gradients over ranks, giving exactly the single-process gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lgvq_plugins.guidance.losses import info_nce


def single_process(v: torch.Tensor, g: torch.Tensor, temperature: float, symmetric: bool) -> torch.Tensor:
    logits = F.cosine_similarity(v[:, None], g[None], dim=-1) / temperature  # (N, N)
    labels = torch.arange(v.shape[0])
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = 3
    gen = torch.Generator().manual_seed(0)  # same full batch on every rank
    v_full = torch.randn(world * per_rank, 6, generator=gen, dtype=torch.float64)
    g_full = torch.randn(world * per_rank, 6, generator=gen, dtype=torch.float64)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for symmetric in (False, True):
        for temperature in (1.0, 0.2):
            v = v_full[mine].clone().requires_grad_(True)
            loss = info_nce(v, g_full[mine], temperature=temperature, symmetric=symmetric)
            loss.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean /= world

            v_ref = v_full.clone().requires_grad_(True)
            ref = single_process(v_ref, g_full, temperature, symmetric)
            ref.backward()
            assert torch.allclose(mean, ref.detach(), rtol=1e-10, atol=1e-12), \
                f"rank {rank} symmetric={symmetric} T={temperature}: {mean.item()} != {ref.item()}"
            assert torch.allclose(v.grad / world, v_ref.grad[mine], rtol=1e-8, atol=1e-12), \
                f"rank {rank} symmetric={symmetric} T={temperature}: gradients differ"
            # the gathered negatives matter: the rank-local loss alone is different
            local = single_process(v_full[mine], g_full[mine], temperature, symmetric)
            assert not torch.allclose(loss.detach(), local)
    print(f"rank {rank}: gsa ddp ok", flush=True)
    dist.barrier()  # no rank tears gloo down while a peer is still talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
