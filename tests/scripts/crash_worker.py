"""Kill a small training job with SIGKILL after every filesystem step of its checkpoint
saves, and resume each time in a fresh process (driven by ``tests/test_checkpoint.py``).

    python tests/scripts/crash_worker.py OUT_DIR [POINT ...]

A POINT is a step number (from 1) or ``PREFIX#k``: the k-th step whose label starts with
PREFIX (k from 1; negative counts from the end; ``#k`` may be left out for the first).

The job (tests' fake tokenizer with a discriminator, guidance with dropout from the global
RNG and noise from a module-private generator) trains 4 steps with a checkpoint every 2
steps and ``keep_last=1`` (so a save prunes), then saves step 4 a second time (the repeat
save of a resumed, finished run). Torch is imported once here; each run is a forked child,
so a "fresh process" costs a fork, not an import.

1. Reference: the job uninterrupted, recording the label of every filesystem step
   (``atomic_io.fs_trace``) and the final weights.
2. For every step n (or only the given points): a child runs the job with
   ``LGVQ_CRASH_AT=n`` and dies by SIGKILL right after step n. What it leaves on disk is
   checked (every ``step_*`` folder complete; ``latest`` names a complete one). A second,
   fresh child builds the job as ``Experiment`` would (seed, build, resume if there is a
   checkpoint), finishes it, repeats the final save, and reports its weights and folder.

Prints one JSON object: ``{"labels": [...], "points": [{...}, ...]}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the fakes

from fakes_trainer import FakeGuided, FakeShapes, FakeTokenizer  # noqa: E402

from lgvq_plugins.training import atomic_io  # noqa: E402
from lgvq_plugins.training import checkpoint as C  # noqa: E402
from lgvq_plugins.training.distributed import seed_everything  # noqa: E402
from lgvq_plugins.training.trainer import Trainer  # noqa: E402

MAX_STEPS = 4


def build(run_dir: Path) -> Trainer:
    """The job, built the way Experiment builds it: seed first, then the model."""
    seed_everything(0)
    model = FakeGuided(FakeTokenizer(disc=True, disc_start=0), dropout=0.3, noise=0.2)
    return Trainer(model, FakeShapes("train", size=24), None, out_dir=run_dir, max_steps=MAX_STEPS,
                   batch_size=8, base_lr=3e-3, scale_lr=False, ckpt_every=2, keep_last=1, log_every=0,
                   val_every=0, progress=False, tensorboard=False)


def job(run_dir: Path, resume: bool) -> dict[str, torch.Tensor]:
    trainer = build(run_dir)
    if resume:
        trainer.resume()  # 0 when the kill came before any checkpoint: start afresh
    trainer.fit()
    trainer.save_checkpoint()  # the same step again
    trainer.close()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def in_child(fn, *args, crash_at: int | None = None) -> int:
    """Run ``fn(*args)`` in a forked child; return its wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            atomic_io.fs_steps = 0
            if crash_at is not None:
                os.environ[atomic_io.CRASH_ENV] = str(crash_at)
            fn(*args)
        except BaseException as exc:  # report, never fall back into the parent's code
            print(f"child failed: {exc!r}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def reference(out: Path) -> None:
    atomic_io.fs_trace = []
    weights = job(out / "reference", resume=False)
    from safetensors.torch import save_file

    save_file(weights, str(out / "reference.safetensors"))
    (out / "labels.json").write_text(json.dumps(atomic_io.fs_trace))


def resumed(run_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(job(run_dir, resume=True), str(run_dir / "resumed.safetensors"))


def on_disk(ckpt_dir: Path) -> dict:
    """What a kill left: visible checkpoint folders (each must be complete) and the pointer."""
    if not ckpt_dir.is_dir():
        return {"entries": [], "incomplete": [], "pointer": None, "pointer_ok": True}
    entries = sorted(p.name for p in ckpt_dir.iterdir())
    incomplete = []
    for name in entries:
        if name.startswith("step_"):
            try:
                C.check_complete(ckpt_dir / name)
            except C.CheckpointError as exc:
                incomplete.append(f"{name}: {exc}")
    pointer = (ckpt_dir / C.LATEST).read_text().strip() if (ckpt_dir / C.LATEST).is_file() else None
    return {"entries": entries, "incomplete": incomplete, "pointer": pointer,
            "pointer_ok": pointer is None or C.is_complete(ckpt_dir / pointer)}


def select(labels: list[str], point: str) -> int:
    """A step number from a POINT argument (see the module doc)."""
    if point.isdigit():
        return int(point)
    prefix, _, k = point.partition("#")
    matches = [i + 1 for i, label in enumerate(labels) if label.startswith(prefix)]
    if not matches:
        raise SystemExit(f"no filesystem step starts with {prefix!r}; the steps are {labels}")
    k = int(k or 1)
    return matches[k - 1 if k > 0 else k]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forking stays safe
    status = in_child(reference, out)
    assert status == 0, f"the reference run failed (wait status {status})"
    from safetensors.torch import load_file

    labels = json.loads((out / "labels.json").read_text())
    expected = load_file(str(out / "reference.safetensors"))
    ref_ckpt = out / "reference" / "checkpoints"
    ref_entries = sorted(p.name for p in ref_ckpt.iterdir())
    points = [select(labels, a) for a in sys.argv[2:]] or list(range(1, len(labels) + 1))
    report = []
    for n in points:
        run_dir = out / f"crash{n:03d}"
        status = in_child(job, run_dir, False, crash_at=n)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        left = on_disk(run_dir / "checkpoints")
        resume_status = in_child(resumed, run_dir)
        point = {"n": n, "label": labels[n - 1] if n <= len(labels) else None, "killed": killed,
                 "after_kill": left, "resume_exit": resume_status}
        if resume_status == 0:
            got = load_file(str(run_dir / "resumed.safetensors"))
            point["mismatched"] = sorted(k for k in expected if k not in got or not torch.equal(expected[k], got[k]))
            ckpt_dir = run_dir / "checkpoints"
            point["final_entries"] = sorted(p.name for p in ckpt_dir.iterdir())
            final = C.load_checkpoint(ckpt_dir)
            saved = {**final.model, **final.discriminator}
            point["checkpoint_mismatched"] = sorted(k for k in expected if not torch.equal(expected[k], saved[k]))
        report.append(point)
    print(json.dumps({"labels": labels, "reference_entries": ref_entries, "points": report}))


if __name__ == "__main__":
    main()
