"""Worker for the 2-process ``skip_bad_samples`` test (run by torchrun, gloo).

Rank 0 has one bad caption in its batch of 4, rank 1 has two. Every rank must keep the same
number of samples (the contrastive loss gathers equal-sized batches) — the minimum over
ranks of the good ones, 2 — only good samples, in order, and report the bad ones summed
over ranks (3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lgvq_plugins.training.batch_checks import drop_bad_samples


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    captions = [["a", None, "b", "c"], ["", "d", 3, "e"]][rank]
    batch = {"image": torch.arange(4.0).view(4, 1, 1, 1) + 10 * rank, "caption": captions,
             "index": torch.arange(4) + 4 * rank}
    kept, dropped = drop_bad_samples(batch)
    expected_caption = [["a", "b"], ["d", "e"]][rank]
    expected_index = [[0, 2], [5, 7]][rank]
    assert dropped == 3, dropped
    assert kept["caption"] == expected_caption, kept["caption"]
    assert kept["index"].tolist() == expected_index, kept["index"]
    assert kept["image"].flatten().tolist() == [float(i - 4 * rank + 10 * rank) for i in expected_index]
    print(f"rank {rank}: skip ddp ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
