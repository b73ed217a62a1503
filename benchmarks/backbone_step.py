"""Training-step time of the built-in tokenizer backbones at their gin block sizes.

One step = forward of a batch, generator loss, backward, Adam step; with the GAN on, also
the discriminator loss on the detached reconstruction, backward and its Adam step.

    OMP_NUM_THREADS=2 python benchmarks/backbone_step.py --batch 16 --steps 10

Prints a markdown table: FLOPs of one step (torch's ``FlopCounterMode``: convolutions and
matrix products, forward and backward; independent of machine load), median wall-clock
seconds per step and median CPU seconds per step (process time, all threads). On a shared,
loaded machine both times are inflated; the FLOP count is the load-free figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import gin
import torch
from torch.utils.flop_counter import FlopCounterMode

import lgvq_plugins
from lgvq_plugins.config import bundled_gin_dir, resolve_gin_file

# (label, gin block, backbone, extra bindings)
CASES: list[tuple[str, str, str, list[str]]] = [
    ("vqvae (vq)", "backbones/vqvae_backbone.gin", "vqvae", []),
    ("vqgan (vq), before disc_start", "backbones/vqgan_backbone.gin", "vqgan", []),
    ("vqgan (vq), GAN on", "backbones/vqgan_backbone.gin", "vqgan", ["vqgan.disc_start = 0"]),
    ("cvq, GAN on", "backbones/cvq_backbone.gin", "vqgan", ["vqgan.disc_start = 0"]),
]


def time_case(gin_file: str, backbone: str, bindings: list[str], batch: int, size: int,
              warmup: int, steps: int) -> tuple[list[float], list[float], int]:
    gin.clear_config()
    lgvq_plugins.list_backbones()  # load plugins so their configurables exist before parsing
    gin.add_config_file_search_path(str(bundled_gin_dir()))
    gin.parse_config_files_and_bindings([str(resolve_gin_file(gin_file))], bindings)
    model = lgvq_plugins.create_backbone(backbone)
    gin.clear_config()
    disc = {id(p) for p in model.discriminator_parameters()}
    gen_params = [p for p in model.parameters() if p.requires_grad and id(p) not in disc]
    opt_g = torch.optim.Adam(gen_params, lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=1e-4, betas=(0.5, 0.9)) if disc else None
    x = torch.rand(batch, 3, size, size) * 2 - 1
    times, cpu, flops = [], [], 0.0
    for i in range(warmup + steps):
        counter = FlopCounterMode(display=False) if i == 0 else contextlib.nullcontext()
        t0, c0 = time.perf_counter(), time.process_time()
        with counter:  # the (untimed) warm-up step counts FLOPs
            rec, quantized = model(x)
            g = model.generator_loss(x, rec, quantized, step=i)
            opt_g.zero_grad(set_to_none=True)
            g.loss.backward()
            opt_g.step()
            d = model.discriminator_loss(x, rec.detach(), step=i)
            if d is not None and d.loss.requires_grad and opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
                d.loss.backward()
                opt_d.step()
        if i == 0:
            flops = counter.get_total_flops()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    n_params = sum(p.numel() for p in gen_params)
    return times, cpu, flops, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side (pixels)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.size}x{args.size} images, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up, torch {torch.__version__}\n")
    print(f"load average at start: {os.getloadavg()[0]:.1f}\n")
    print("| case | gin block | generator params | GFLOP/step | median wall s/step | median CPU s/step |")
    print("|---|---|---:|---:|---:|---:|")
    for label, gin_file, backbone, bindings in CASES:
        times, cpu, flops, n_params = time_case(gin_file, backbone, bindings, args.batch, args.size,
                                    args.warmup, args.steps)
        print(f"| {label} | `{gin_file}`{' + ' + '; '.join(bindings) if bindings else ''} | "
              f"{n_params / 1e6:.2f} M | {flops / 1e9:.1f} | {statistics.median(times):.3f} | {statistics.median(cpu):.3f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
