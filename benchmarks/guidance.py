"""Training-step cost of language guidance: a tokenizer with and without ``LanguageGuided``.

One step = forward of a batch, generator loss (+ the weighted alignment losses when
guided), backward, Adam step over every trained parameter; with the GAN on, also the
discriminator's loss on the detached reconstruction, backward and Adam step. "GAN off"
(before ``disc_start``) is the strictest comparison: the base step is as cheap as it gets. The text
cache is warmed first (MiniLM), so the frozen encoder is not run during the timed steps;
base and guided steps alternate (which of the two goes first alternates too) so that other
load on the machine hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/guidance.py --cases quick quick-gan cvq_lg cvq_lg-gan
    OMP_NUM_THREADS=1 python benchmarks/guidance.py --cases paper --paper-steps 10   # ~1 h on 2 CPUs

Prints a markdown table: medians over the timed steps (after warm-up) of wall-clock and this
process's CPU time, which is steadier when other jobs share the cores; the guided / base
ratio is the median of the per-pair ratios (each pair timed back to back) with their min and
max. A ratio from fewer than 10 pairs is marked "indicative": it cannot decide a target.
Also the text-encoder calls of a cold and a warm "epoch" over the benchmark's captions.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import gin
import torch

import lgvq_plugins
from lgvq_plugins.config import parse_gin
from lgvq_plugins.guidance import LanguageGuided


@dataclass
class Case:
    label: str
    gin_file: str
    backbone: str
    size: int
    batch: int
    bindings: list[str] = field(default_factory=list)


# The quick-start geometry of the backbone block (gin/backbones/cvq_backbone.gin: 64×64 → 16×16,
# D=64), the quick start as shipped (gin/cvq_lg.gin: 32×32 → 16×16, D=32, with its own
# LanguageGuided bindings), and the paper's first stage (256×256 → 16×16, D=256, batch 8;
# no LPIPS: its weights are not available offline).
PAPER = ["vqgan.ch = 128", "vqgan.ch_mult = (1, 1, 2, 2, 4)", "vqgan.num_res_blocks = 2",
         "vqgan.resolution = 256", "vqgan.z_channels = 256", "vqgan.embed_dim = 256",
         "vqgan.disc_ndf = 64", "vqgan.disc_n_layers = 3"]
CASES = {
    "quick": Case("quick start: cvq, 64×64 → 16×16, GAN off", "backbones/cvq_backbone.gin", "vqgan", 64, 16),
    "quick-gan": Case("quick start: cvq, 64×64 → 16×16, GAN on", "backbones/cvq_backbone.gin", "vqgan", 64, 16,
                      ["vqgan.disc_start = 0"]),
    "cvq_lg": Case("quick start as shipped (cvq_lg.gin): 32×32 → 16×16, GAN off", "cvq_lg.gin",
                   "vqgan", 32, 16),
    "cvq_lg-gan": Case("quick start as shipped (cvq_lg.gin): 32×32 → 16×16, GAN on", "cvq_lg.gin",
                       "vqgan", 32, 16, ["vqgan.disc_start = 0"]),
    "paper": Case("paper: cvq, 256×256 → 16×16, GAN off", "backbones/cvq_backbone.gin", "vqgan", 256, 8, PAPER),
}

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]
RELATIONS = ["left of", "right of", "above", "below"]


def captions(n: int) -> list[str]:
    """``n`` distinct captions of the shapes kind (length ~10 tokens)."""
    combos = itertools.product(COLORS, SHAPES, RELATIONS, COLORS, SHAPES)
    return [f"a {c1} {s1} {r} a {c2} {s2}" for c1, s1, r, c2, s2 in itertools.islice(combos, n)]


def build(case: Case, enabled: bool, encoder) -> LanguageGuided:
    """Tokenizer and guidance as the case's gin file binds them (defaults otherwise)."""
    gin.clear_config()
    parse_gin([case.gin_file], case.bindings)
    torch.manual_seed(0)
    tokenizer = lgvq_plugins.create_backbone(case.backbone)
    model = LanguageGuided(tokenizer, encoder, enabled=enabled, image_size=case.size)
    gin.clear_config()
    return model


def make_step(model: LanguageGuided):
    disc_params = model.tokenizer.discriminator_parameters()
    disc = {id(p) for p in disc_params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in disc]
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc_params, lr=1e-4, betas=(0.5, 0.9)) if disc_params else None

    def step(x: torch.Tensor, caps: list[str], i: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(x, caps)
        loss = model.tokenizer.generator_loss(x, out.reconstruction, out.quantized, step=i).loss
        loss = loss + sum(out.losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        d = model.tokenizer.discriminator_loss(x, out.reconstruction.detach(), step=i)
        if opt_d is not None and d is not None and d.loss.requires_grad:
            opt_d.zero_grad(set_to_none=True)
            d.loss.backward()
            opt_d.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return step, sum(p.numel() for p in params)


def run_case(case: Case, encoder, warmup: int, steps: int) -> dict:
    base, guided = build(case, False, encoder), build(case, True, encoder)
    base.train(), guided.train()
    pool = captions(case.batch * (warmup + steps))
    cache = guided.text_cache
    # an "epoch" over the captions the steps will use: cold (encodes), then warm (must not)
    before = cache.stats
    for i in range(0, len(pool), case.batch):
        cache(pool[i:i + case.batch], "cpu")
    cold = cache.stats
    step_base, n_base = make_step(base)
    step_guided, n_guided = make_step(guided)
    x = torch.rand(case.batch, 3, case.size, case.size) * 2 - 1
    times_base, times_guided = [], []
    for i in range(warmup + steps):
        caps = pool[i * case.batch:(i + 1) * case.batch]
        if i % 2 == 0:
            tb, tg = step_base(x, caps, i), step_guided(x, caps, i)
        else:
            tg, tb = step_guided(x, caps, i), step_base(x, caps, i)
        if i >= warmup:
            times_base.append(tb)
            times_guided.append(tg)
    warm = cache.stats
    wall_ratios = [g[0] / b[0] for b, g in zip(times_base, times_guided)]
    cpu_ratios = [g[1] / b[1] for b, g in zip(times_base, times_guided)]
    return {
        "base": statistics.median(t for t, _ in times_base),
        "guided": statistics.median(t for t, _ in times_guided),
        "base_cpu": statistics.median(c for _, c in times_base),
        "guided_cpu": statistics.median(c for _, c in times_guided),
        "ratio": (statistics.median(wall_ratios), min(wall_ratios), max(wall_ratios)),
        "ratio_cpu": (statistics.median(cpu_ratios), min(cpu_ratios), max(cpu_ratios)),
        "params_base": n_base, "params_guided": n_guided,
        "cold_calls": cold.encoder_calls - before.encoder_calls,
        "cold_captions": cold.captions_encoded - before.captions_encoded,
        "warm_calls": warm.encoder_calls - cold.encoder_calls,
        "captions": len(pool),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["quick", "quick-gan", "cvq_lg", "cvq_lg-gan", "paper"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (pairs)")
    parser.add_argument("--paper-steps", type=int, default=2,
                        help="timed steps for the paper geometry (~2 min each on a CPU; <10 is indicative)")
    parser.add_argument("--bindings", nargs="*", default=[],
                        help="extra gin bindings for every case, e.g. 'LanguageGuided.width = 64'")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is steadiest when other jobs share the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = lgvq_plugins.create_text_encoder("minilm")
    print(f"{args.threads} threads, torch {torch.__version__}, text encoder {encoder.identity}; "
          f"base and guided steps alternate; medians over timed steps after {args.warmup} warm-up; "
          f"ratios: median [min–max] of the per-pair ratios\n")
    if args.bindings:
        print(f"extra gin bindings: {'; '.join(args.bindings)}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}\n")
    print("| geometry | batch | timed pairs | base s/step (CPU s) | guided s/step (CPU s) | "
          "guided / base, wall: median [min–max] | CPU: median [min–max] | trained params base → guided | "
          "encoder calls: cold epoch (captions) / warm epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in args.cases:
        case = CASES[name]
        case = Case(case.label, case.gin_file, case.backbone, case.size, case.batch,
                    [*case.bindings, *args.bindings])
        steps = args.paper_steps if name == "paper" else args.steps
        r = run_case(case, encoder, args.warmup, steps)
        note = "" if steps >= 10 else " (indicative)"
        (w, w0, w1), (c, c0, c1) = r["ratio"], r["ratio_cpu"]
        print(f"| {case.label} | {case.batch} | {steps}{note} | {r['base']:.2f} ({r['base_cpu']:.2f}) | "
              f"{r['guided']:.2f} ({r['guided_cpu']:.2f}) | {w:.2f}× [{w0:.2f}–{w1:.2f}] | "
              f"{c:.2f}× [{c0:.2f}–{c1:.2f}] | "
              f"{r['params_base'] / 1e6:.2f} M → {r['params_guided'] / 1e6:.2f} M | "
              f"{r['cold_calls']} ({r['cold_captions']} of {r['captions']}) / {r['warm_calls']} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
