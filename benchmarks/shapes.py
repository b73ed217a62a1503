"""Throughput of the ``shapes`` data set in one process on one core.

    OMP_NUM_THREADS=1 python benchmarks/shapes.py            # 64 and 128 px, 3000 samples each
    OMP_NUM_THREADS=1 python benchmarks/shapes.py --sizes 64 --num 10000

Rows:
* ``scene``   — sample a layout and render it (image + label maps + boxes): the pixel work.
* ``sample``  — a full ``dataset[i]`` (scene + captions, a question, a referring
                expression, tensors), per split (val/test also move lone objects into
                their split's share of positions).
* ``batch``   — ``DataLoader(batch_size=64, num_workers=0)`` including default collate.

Images/s is given from CPU time of this process (what one core delivers, robust to other
load on a shared machine) and from wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch
from torch.utils.data import DataLoader

import lgvq_plugins
from lgvq_plugins.data import shapes_scene


def measure(fn: Callable[[int], object], count: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to call ``fn(i)`` for i in range(count)."""
    fn(0)  # warm caches / lazy imports
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        fn(i)
    return time.process_time() - cpu, time.perf_counter() - wall


def rows_for(size: int, count: int) -> list[tuple[str, int, int, float, float]]:
    rows = []
    val = lgvq_plugins.create_dataset("shapes", split="val", size=size, num_samples=count)

    def scene(i: int) -> object:
        layout = shapes_scene.sample_layout(val._rng(i), size, val.min_objects, val.max_objects)
        return shapes_scene.render(layout, size, signed=True)

    rows.append(("scene", size, count, *measure(scene, count)))
    for split in ("train", "val", "test"):
        ds = lgvq_plugins.create_dataset("shapes", split=split, size=size, num_samples=count)
        rows.append((f"sample ({split})", size, count, *measure(ds.__getitem__, count)))

    train = lgvq_plugins.create_dataset("shapes", split="train", size=size, num_samples=count)
    loader = DataLoader(train, batch_size=64, num_workers=0)
    cpu, wall = time.process_time(), time.perf_counter()
    seen = sum(len(batch["index"]) for batch in loader)
    rows.append(("batch 64 (train)", size, seen, time.process_time() - cpu, time.perf_counter() - wall))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides in pixels")
    parser.add_argument("--num", type=int, default=3000, help="samples per row")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"| {'what':<18} | {'size':>4} | {'samples':>7} | {'images/s (CPU)':>14} | {'images/s (wall)':>15} | {'µs/image (CPU)':>14} |")
    print(f"|{'-' * 20}|{'-' * 6}|{'-' * 9}|{'-' * 16}|{'-' * 17}|{'-' * 16}|")
    for size in args.sizes:
        for what, sz, count, cpu, wall in rows_for(size, args.num):
            print(f"| {what:<18} | {sz:>4} | {count:>7} | {count / cpu:>14,.0f} | {count / wall:>15,.0f} "
                  f"| {cpu / count * 1e6:>14,.0f} |")


if __name__ == "__main__":
    main()
