"""Benchmark: our ``vq`` (EMA) vs ``vector_quantize_pytorch.VectorQuantize`` vs a bare bound.

For each size (K codes, N vectors, D dims) it measures

* ``ours``: ``lgvq_plugins`` ``vq`` with ``ema=True, ema_decay=0.99, beta=0.25`` —
  forward + backward of ``loss + z_q.mean()`` in training mode (EMA update included);
* ``vqpt``: ``VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25,
  kmeans_init=False, rotation_trick=False, accept_image_fmap=True)`` (EMA codebook),
  the same forward + backward;
* ``bound``: the least any exact nearest-code quantizer must do: one fused distance matmul
  ``addmm(‖e‖², x, eᵀ, α=−2)`` over the whole N×K, ``argmin``, and the gather of the codes
  (forward only, nothing else).

Time: median of several runs (``--repeats``; by default 15 for the smallest case down to
2 for the largest) after one warm-up, the three interleaved in one process
so that the ratios see the same load. Memory: the peak resident-set growth of one call, each
implementation in a fresh subprocess: build the inputs and the module, run one warm-up call,
return freed heap pages to the OS (``malloc_trim``), note the RSS, reset the kernel's
high-water mark (``/proc/self/clear_refs``), run one call, and report ``VmHWM`` minus the
noted RSS. This sees every allocation torch makes on the CPU (``tracemalloc`` does not),
and excludes one-time start-up costs (imports, thread pools).

Run: ``python benchmarks/quantizer.py`` (``--sizes`` to pick, ``--threads`` for torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

#: name → (K, N, D, implementations, timed repeats); N = B·32·32 latents. Small cases get
#: more repeats: under other load their medians need them.
SIZES: dict[str, tuple[int, int, int, tuple[str, ...], int]] = {
    "K1k": (1024, 4096, 64, ("ours", "vqpt", "bound"), 15),
    "K4k": (4096, 8192, 128, ("ours", "vqpt", "bound"), 5),
    "K16k": (16384, 8192, 128, ("ours", "vqpt", "bound"), 3),
    "K64k": (65536, 4096, 128, ("ours", "vqpt", "bound"), 3),
    # the issue's large case; VectorQuantize would hold several dense N×K (4 GiB) tensors
    "K64k_large": (65536, 16384, 256, ("ours", "bound"), 2),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(step: Callable[[], None]) -> int:
    """Bytes by which the resident set peaks above its level before ``step()`` (Linux)."""
    import ctypes
    import gc

    step()  # warm-up: lazy initialisation is not the call's memory
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return hwm_kib * 1024 - before


def build(impl: str, k: int, n: int, d: int) -> Callable[[], None]:
    """A closure running one forward + backward (or the bound's forward) of ``impl``."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n // 1024, d, 32, 32, generator=gen)
    if impl == "ours":
        import lgvq_plugins

        q = lgvq_plugins.create_quantizer("vq", dim=d, num_codes=k, ema=True, ema_decay=0.99, beta=0.25)
        with torch.no_grad():
            q.weight.normal_(generator=gen)
            q.embed_sum.copy_(q.weight)
        z.requires_grad_(True)

        def step() -> None:
            out = q(z)
            (out.loss + out.z_q.mean()).backward()
            z.grad = None
        return step
    if impl == "vqpt":
        from vector_quantize_pytorch import VectorQuantize

        q = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25, kmeans_init=False,
                           rotation_trick=False, accept_image_fmap=True)
        q.train()
        z.requires_grad_(True)

        def step() -> None:
            quantized, _, loss = q(z)
            (loss.sum() + quantized.mean()).backward()
            z.grad = None
        return step
    if impl == "bound":
        x = z.movedim(1, -1).reshape(-1, d).contiguous()
        codes = torch.randn(k, d, generator=gen)

        def step() -> None:
            dist = torch.addmm(codes.pow(2).sum(1), x, codes.T, alpha=-2.0)
            codes[dist.argmin(1)]
        return step
    raise ValueError(f"unknown implementation {impl!r}")


def measure_memory(impl: str, k: int, n: int, d: int, threads: int) -> int:
    """Peak RSS growth (bytes) of one call of ``impl``, in a fresh subprocess."""
    code = (f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); torch.set_num_threads({threads});"
            f"import quantizer as b; print(b.peak_growth(b.build({impl!r}, {k}, {n}, {d})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure_time(impls: tuple[str, ...], k: int, n: int, d: int, repeats: int) -> dict[str, float]:
    steps = {impl: build(impl, k, n, d) for impl in impls}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: per case)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    header = (f"{'case':<11} {'K':>6} {'N':>6} {'D':>4} | {'ours s':>8} {'vqpt s':>8} {'bound s':>8} | "
              f"{'vqpt/ours':>9} {'ours/bound':>10} | {'ours MiB':>8} {'vqpt MiB':>8} {'bound MiB':>9}")
    print(header)
    print("-" * len(header))
    for name in args.sizes:
        k, n, d, impls, default_repeats = SIZES[name]
        repeats = args.repeats or default_repeats
        t = measure_time(impls, k, n, d, repeats)
        mem = {impl: measure_memory(impl, k, n, d, args.threads) / 2**20 for impl in impls}
        row = {"case": name, "K": k, "N": n, "D": d, "time_s": t, "peak_mib": mem}
        rows.append(row)

        def fmt(v: float | None, spec: str) -> str:
            return format(v, spec) if v is not None else "—".rjust(len(format(0.0, spec)))

        vq, ours, bound = t.get("vqpt"), t["ours"], t["bound"]
        print(f"{name:<11} {k:>6} {n:>6} {d:>4} | {fmt(ours, '8.3f')} {fmt(vq, '8.3f')} {fmt(bound, '8.3f')} | "
              f"{fmt(vq / ours if vq else None, '9.2f')} {fmt(ours / bound, '10.2f')} | "
              f"{fmt(mem['ours'], '8.0f')} {fmt(mem.get('vqpt'), '8.0f')} {fmt(mem['bound'], '9.0f')}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
