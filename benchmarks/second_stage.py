"""Second-stage training throughput (codes/s): cached codes vs re-encoding every batch.

Both paths train the same ``CodeGPT`` through the project's ``Trainer`` (``train_rows``:
same sampler, AdamW step, logging, one checkpoint at the end) on the same images:

* **cached** — the frozen tokenizer encodes the images once (``cached_codes``; its one-off
  cost is reported separately), and the prior trains on rows of the code tensor;
* **re-encoding** — the rows are the images themselves (rendered once beforehand, so data
  generation is not counted on either side), and every step encodes its batch with the
  frozen tokenizer (``no_grad``, eval mode) before the prior's step.

    OMP_NUM_THREADS=1 python benchmarks/second_stage.py
    OMP_NUM_THREADS=1 python benchmarks/second_stage.py --pretrained runs/shapes_compare/runs/vqgan_s0/pretrained

Without ``--pretrained`` the quick start's tokenizer architecture (gin/cvq_lg.gin: VQ-GAN
32×32 → 16×16 codes, K=256, D=32) is built with random weights — the cost per image is the
same. Rounds alternate the two paths so that other load on the machine hits both alike;
the load average before and after each round is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from lgvq_plugins import api
from lgvq_plugins.second_stage.code_cache import cached_codes
from lgvq_plugins.second_stage.gpt import CodeGPT
from lgvq_plugins.second_stage.train import (
    TensorRows,
    TrainSettings,
    gpt_loss,
    train_rows,
)

#: the quick start's tokenizer (gin/sizes/quick_start_size.gin; cvq_lg.gin uses the CVQ quantizer)
QUICK_START = {"resolution": 32, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (),
               "z_channels": 32, "embed_dim": 32, "quantizer_config": {"num_codes": 256}, "disc_ndf": 32,
               "disc_n_layers": 2}


def tokenizer(pretrained: str | None):
    if pretrained:
        model = api.from_pretrained(pretrained)
        return getattr(model, "tokenizer", model).eval()
    torch.manual_seed(0)
    return api.create_backbone("vqgan", **QUICK_START).eval()


def one_round(tok, images: torch.Tensor, codes: torch.Tensor, settings: TrainSettings, width: int,
              depth: int) -> dict[str, float]:
    seq = codes[0].numel()
    out: dict[str, float] = {}
    for path in ("cached", "re-encoding"):
        torch.manual_seed(0)
        gpt = CodeGPT(num_codes=int(tok.quantizer.num_codes), seq_len=seq, width=width, depth=depth, heads=4)
        encode_s = [0.0]

        def reencode_loss(m, batch, encode_s=encode_s):
            t0 = time.perf_counter()
            with torch.no_grad():
                c = tok.encode(batch["image"]).indices.reshape(batch["image"].shape[0], -1)
            encode_s[0] += time.perf_counter() - t0
            return m.loss(c)

        rows = (TensorRows(codes=codes.reshape(codes.shape[0], -1)) if path == "cached"
                else TensorRows(image=images))
        with tempfile.TemporaryDirectory() as run_dir:
            t0 = time.perf_counter()
            stats = train_rows(gpt, gpt_loss if path == "cached" else reencode_loss, rows, settings, run_dir=run_dir)
            wall = time.perf_counter() - t0
        out[f"{path} codes/s"] = stats["rows_per_s"] * seq
        out[f"{path} ms/step"] = 1000 * wall / settings.steps
        if path == "re-encoding":
            out["encoding ms/step"] = 1000 * encode_s[0] / settings.steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None, help="a saved tokenizer (default: quick-start architecture)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()

    tok = tokenizer(args.pretrained)
    size = tok.config.get("resolution", 32)
    data = api.create_dataset("shapes", split="train", size=size, num_samples=args.images)
    images = torch.stack([data[i]["image"] for i in range(len(data))]).float()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        codes = cached_codes(tok, data, cache_dir=cache)
        extract = time.perf_counter() - t0
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, progress=False, checkpoint_every=10 ** 9,
                             log_every=10 ** 9)
    # one untimed warm-up of each path (allocator, first-call costs)
    one_round(tok, images, codes, TrainSettings(steps=2, batch_size=args.batch, progress=False), args.width, 1)
    rounds, loads = [], []
    for _ in range(args.rounds):
        before = os.getloadavg()[0]
        rounds.append(one_round(tok, images, codes, settings, args.width, args.depth))
        loads.append((before, os.getloadavg()[0]))
    print(f"tokenizer: {'pretrained ' + args.pretrained if args.pretrained else 'quick-start architecture'}, "
          f"{size}×{size} → {tuple(codes.shape[1:])} codes, K={tok.quantizer.num_codes}; CodeGPT width "
          f"{args.width}, depth {args.depth}; batch {args.batch}; {args.steps} steps × {args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(f"one-off extraction of {args.images} images: {extract:.2f} s ({args.images / extract:.0f} images/s)")
    print("load average (1 min) before → after each round: "
          + ", ".join(f"{a:.1f} → {b:.1f}" for a, b in loads))
    keys = list(rounds[0])
    print("| " + " | ".join(["measure", *[f"round {i + 1}" for i in range(len(rounds))], "median"]) + " |")
    print("|" + "---|" * (len(rounds) + 2))
    for k in keys:
        values = [r[k] for r in rounds]
        print(f"| {k} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
