"""Real-data loading throughput on one core: JPEG decode + the paper's transforms at 256²,
and WebDataset streaming.

    OMP_NUM_THREADS=1 python benchmarks/data_decode.py                 # 300 COCO-sized JPEGs
    OMP_NUM_THREADS=1 python benchmarks/data_decode.py --num 1000 --width 640 --height 480

Rows:
* ``decode tv``    — ``torchvision.io.decode_image`` (the readers' path) of a JPEG file.
* ``decode pil``   — PIL ``open + convert('RGB')`` of the same files, for comparison.
* ``train sample`` — ``image_text[i]`` for training: read, decode, resize (antialiased),
                     random crop 256², flip, to float in [-1, 1], caption choice.
* ``eval sample``  — the same with the center crop and first caption.
* ``webdataset``   — the ``webdataset`` reader streaming the same images from tar shards
                     (training transforms).

Images/s is given from the CPU time of this process (what one core delivers, robust to
other load on a shared machine) and from wall-clock time. Target: >= 250 images/s per core
for the training sample, so one DataLoader worker per core keeps a GPU fed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lgvq_plugins import api
from lgvq_plugins.data.images import load_rgb


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus fine noise: compresses like a photo (~50-100 KB at 640×480),
    unlike pure noise (which JPEG cannot compress) or flat colour (which it compresses away)."""
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_tree(root: Path, num: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i in range(num):
        path = root / "imgs" / f"{i:06d}.jpg"
        photo_like(rng, width, height).save(path, quality=90)
        paths.append(path)
        lines.append(json.dumps({"image": f"imgs/{i:06d}.jpg", "captions": [f"photo {i}", "on the left"],
                                 "split": "train"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def make_shards(folder: Path, paths: list[Path], per_shard: int = 100) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for start in range(0, len(paths), per_shard):
        with tarfile.open(folder / f"shard-{count:06d}.tar", "w") as tar:
            for p in paths[start:start + per_shard]:
                for ext, data in (("jpg", p.read_bytes()), ("txt", f"caption {p.stem}".encode())):
                    info = tarfile.TarInfo(f"{p.stem}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count += 1
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


def measure(fn: Callable[[int], object], count: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to call ``fn(i)`` for i in range(count)."""
    fn(0)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        fn(i)
    return time.process_time() - cpu, time.perf_counter() - wall


def measure_stream(stream: Iterable, count: int) -> tuple[float, float, int]:
    cpu, wall, n = time.process_time(), time.perf_counter(), 0
    for _ in stream:
        n += 1
        if n >= count:
            break
    return time.process_time() - cpu, time.perf_counter() - wall, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=300, help="images")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--size", type=int, default=256, help="output side")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        paths = make_tree(root, args.num, args.width, args.height)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        train = api.create_dataset("image_text", root=str(root), split="train", size=args.size)
        evals = api.create_dataset("image_text", root=str(root), split="train", size=args.size)
        evals.transform.train, evals.train = False, False
        cases = {
            "decode tv": lambda i: load_rgb(paths[i % len(paths)], "bench"),
            "decode pil": lambda i: Image.open(paths[i % len(paths)]).convert("RGB").load(),
            "train sample": lambda i: train[i % len(train)],
            "eval sample": lambda i: evals[i % len(evals)],
        }
        for name, fn in cases.items():
            cpu, wall = measure(fn, args.num)
            rows.append((name, args.num, cpu, wall))
        pattern = make_shards(Path(tmp) / "shards", paths)
        stream = api.create_dataset("webdataset", urls=pattern, split="train", size=args.size, rank=0,
                                    world_size=1)
        cpu, wall, n = measure_stream(stream, args.num)
        rows.append(("webdataset", n, cpu, wall))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{args.num} JPEGs {args.width}x{args.height} (~{kb:.0f} KB) -> {args.size}x{args.size}")
    print("| step | images | images/s per core (CPU time) | images/s (wall) |")
    print("|---|---:|---:|---:|")
    for name, n, cpu, wall in rows:
        print(f"| {name} | {n} | {n / max(cpu, 1e-9):.0f} | {n / max(wall, 1e-9):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("step", "images", "cpu_s", "wall_s"), r)) for r in rows],
                                              indent=2))


if __name__ == "__main__":
    main()
