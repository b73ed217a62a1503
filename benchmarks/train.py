"""Training benchmarks: the quick start's wall time and peak memory, and training throughput
(images/s) with and without language guidance.

    python benchmarks/train.py throughput                       # cvq_lg.gin vs LG off
    python benchmarks/train.py throughput --steps 10 --gin gin/vqgan_lg.gin
    python benchmarks/train.py quickstart                       # the full quick-start run
    python benchmarks/train.py quickstart --bindings "Trainer.max_steps = 20"

``throughput`` builds the run file's model and trainer in-process and times ``--steps``
optimizer updates after ``--warmup`` (data loading included; no validation or checkpoints).
``quickstart`` runs ``python -m lgvq_plugins.run`` as a child process and reports its wall
time and peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "| " + " | ".join(k.ljust(width[k]) for k in keys) + " |"
    sep = "|" + "|".join("-" * (width[k] + 2) for k in keys) + "|"
    body = ["| " + " | ".join(str(r[k]).ljust(width[k]) for k in keys) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def throughput(gin_file: str, guidance: bool, steps: int, warmup: int, extra: list[str]) -> dict[str, object]:
    """Images/s of ``Trainer.train_step`` for ``gin_file`` with guidance on or off."""
    import gin
    import torch

    from lgvq_plugins.config import parse_gin
    from lgvq_plugins.training.experiment import Experiment

    gin.clear_config()
    with tempfile.TemporaryDirectory() as tmp:
        parse_gin([gin_file], [*extra, f"LanguageGuided.enabled = {guidance}", "Trainer.progress = False",
                               f"Experiment.root = '{tmp}'", "Trainer.tensorboard = False"])
        exp = Experiment().build()
        trainer = exp.trainer
        assert trainer is not None
        params = sum(p.numel() for p in exp.model.parameters())
        loader = iter(trainer._train_loader(0, 0))
        for _ in range(warmup):
            trainer.train_step([next(loader) for _ in range(trainer.grad_accum_steps)])
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            trainer.train_step([next(loader) for _ in range(trainer.grad_accum_steps)])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        trainer.close()
    images = steps * trainer.global_batch_size * trainer.grad_accum_steps
    return {"config": Path(gin_file).name, "guidance": "on" if guidance else "off",
            "params (M)": f"{params / 1e6:.2f}", "batch": trainer.global_batch_size,
            "threads": torch.get_num_threads(), "s/step": f"{wall / steps:.3f}",
            "cpu s/step": f"{cpu / steps:.3f}", "images/s": f"{images / wall:.1f}"}


def quickstart(gin_file: str, bindings: list[str], root: str) -> dict[str, object]:
    """Wall time and peak RSS of ``python -m lgvq_plugins.run --gin gin_file``."""
    cmd = [sys.executable, "-m", "lgvq_plugins.run", "--gin", gin_file, "--root", root,
           "--gin_bindings", "Experiment.overwrite = True", "--gin_bindings", "Trainer.progress = False"]
    for b in bindings:
        cmd += ["--gin_bindings", b]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    import json

    name = Path(gin_file).stem
    metrics = json.loads((Path(root) / name / "metrics.json").read_text())
    return {"command": " ".join(["python -m lgvq_plugins.run --gin", gin_file, *(f'--gin_bindings "{b}"' for b in bindings)]),
            "wall (s)": f"{wall:.0f}", "peak RSS (MiB)": f"{peak_kib / 1024:.0f}",
            "steps": int(metrics["steps"]), "train images/s": f"{metrics['train_images_per_sec']:.1f}",
            "val PSNR": f"{metrics['val_psnr']:.2f}", "val usage": f"{metrics['val_codebook_usage']:.3f}",
            "val rec L1": f"{metrics['val_rec_loss']:.4f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["throughput", "quickstart"])
    parser.add_argument("--gin", default="gin/cvq_lg.gin")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bindings", action="append", default=[])
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "lgvq_bench_runs"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode == "throughput":
        rows = [throughput(args.gin, g, args.steps, args.warmup, args.bindings) for g in (True, False)]
    else:
        rows = [quickstart(args.gin, args.bindings, args.root)]
    print(_table(rows))


if __name__ == "__main__":
    main()
