"""Worker for the 2-process quantizer test (run by torchrun, gloo).

Every rank trains the same small model (1×1 conv encoder → quantizer) under DDP on
*different* data: rank 0 sees latents around +4 on the first channel, rank 1 around −4.
After each run the rank saves its codebook, its usage average (CVQ) and the last step's
stats to ``<out>/<case>_rank<r>.pt``; the test compares the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lgvq_plugins

CASES = {
    "cvq_probrandom": ("cvq", {"anchor": "probrandom", "distance": "cosine", "contrastive": True}),
    "cvq_closest": ("cvq", {"anchor": "closest", "distance": "l2"}),
    "cvq_random": ("cvq", {"anchor": "random", "distance": "l2"}),
    "vq_ema": ("vq", {"ema": True, "ema_decay": 0.8}),
}
DIM, CODES, STEPS = 8, 32, 6


class Net(nn.Module):
    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.encoder = nn.Conv2d(DIM, DIM, 1)
        with torch.no_grad():  # start at the identity, so the ranks' features stay apart
            self.encoder.weight.copy_(torch.eye(DIM)[:, :, None, None])
            self.encoder.bias.zero_()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor):
        out = self.quantizer(self.encoder(x))
        return out.z_q, out.loss, out.stats


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case, (name, options) in CASES.items():
        torch.manual_seed(0)  # same initial model everywhere (DDP broadcasts rank 0's anyway)
        quantizer = lgvq_plugins.create_quantizer(name, dim=DIM, num_codes=CODES, **options)
        if name == "cvq":  # spread the codes, so their closest features lie on both ranks
            with torch.no_grad():
                quantizer.weight.normal_(0.0, 3.0)
        initial = quantizer.codebook.detach().clone()
        model = DDP(Net(quantizer))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        # different data per rank (and per step); different batch sizes too
        gen = torch.Generator().manual_seed(100 + rank)
        sign = 1.0 if rank == 0 else -1.0
        for _ in range(STEPS):
            x = torch.randn(2 + rank, DIM, 4, 4, generator=gen)
            x[:, 0] += 4.0 * sign
            z_q, loss, stats = model(x)
            opt.zero_grad()
            (loss + (z_q - x).square().mean()).backward()
            opt.step()
        torch.save({"initial": initial, "codebook": quantizer.codebook.detach().clone(),
                    "usage_ema": getattr(quantizer, "usage_ema", torch.zeros(0)).clone(),
                    "stats": {k: v.clone() for k, v in stats.items()},
                    "histogram": quantizer.usage_histogram.clone()},
                   out_dir / f"{case}_rank{rank}.pt")
    print(f"rank {rank}: quantizer ddp done", flush=True)
    dist.barrier()  # no rank tears gloo down while a peer is still talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
