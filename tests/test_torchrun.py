"""The same command and config under a real 2-process torchrun (gloo on CPU): identical
codebooks and discriminators on both ranks, and a job killed by SIGKILL that resumes to
the weights of an uninterrupted 2-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp import torchrun

REPO = Path(__file__).resolve().parent.parent
DDP_RUN = str(REPO / "tests" / "scripts" / "ddp_run.py")
# The GAN term and the discriminator's own updates from step 0: its gradients differ per
# rank (different data), so only the all-reduce keeps the ranks' discriminators equal.
BINDINGS = ["--gin_bindings", "vqgan.disc_start = 0", "--gin_bindings", "Trainer.dump_codebooks = True"]
ENV = {"HF_HUB_OFFLINE": "1"}


def _launch(root: Path, *extra: str, env: dict[str, str] | None = None, check: bool = True):
    return torchrun([DDP_RUN, "--gin", "gin/tiny.gin", "--root", str(root), *BINDINGS, *extra],
                    cwd=REPO, env={**ENV, **(env or {})}, timeout=900, check=check)


def _ranks(run: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(run / f"state_rank{r}.safetensors")) for r in range(2)]


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ (weights and buffers, the discriminator's BatchNorm
    running statistics included: the trainer broadcasts rank 0's after every update)."""
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def _is_bn_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in {"running_mean", "running_var", "num_batches_tracked"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 2-process run of 3 steps, shared by the checks below."""
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    proc = _launch(root, "--gin_bindings", "MAX_STEPS = 3")
    return root / "tiny", proc


@pytest.mark.ddp
def test_two_process_run_keeps_codebooks_identical(uninterrupted):
    run, proc = uninterrupted
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    assert metrics["steps"] == 3 and metrics["images_seen"] == 24
    assert metrics["codebooks_identical"] is True and metrics["codebook_max_abs_diff"] == 0.0
    assert len(metrics["codebook_sha256"]) == 2
    # Independent check on the files each rank wrote itself.
    a = load_file(str(run / "codebook_rank0.safetensors"))["codebook"]
    b = load_file(str(run / "codebook_rank1.safetensors"))["codebook"]
    assert torch.equal(a, b)
    # Only rank 0 writes the run directory's files; a single checkpoint series exists.
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert proc.stdout.count('"world_size": 2') == 1  # metrics printed once (rank 0)


@pytest.mark.ddp
def test_two_process_discriminators_stay_identical(uninterrupted):
    run, _ = uninterrupted
    rank0, rank1 = _ranks(run)
    disc = [k for k in rank0 if "discriminator" in k and not _is_bn_stat(k)]  # its parameters
    assert disc, "the tiny vqgan has no discriminator parameters in its state_dict"
    # every weight and buffer, the discriminator's BatchNorm statistics included
    assert _differing(rank0, rank1) == []
    # ... and the discriminator does train: step 3 changed its weights
    before = load_file(str(run / "checkpoints" / "step_00000002" / "discriminator.safetensors"))
    assert sorted(before) == sorted(disc)
    assert any(not torch.equal(before[k], rank0[k]) for k in disc)


@pytest.mark.ddp
def test_two_process_kill_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL of both ranks after the step-2 checkpoint, then ``--resume`` under torchrun:
    every rank ends with the weights of the uninterrupted run (RNG states of both ranks,
    data position, optimizers and the CVQ anchor streams restored)."""
    reference, _ = uninterrupted
    killed = _launch(tmp_path, "--gin_bindings", "MAX_STEPS = 3", env={"LGVQ_TEST_KILL_AT_STEP": "2"},
                     check=False)
    assert killed.returncode != 0
    run = tmp_path / "tiny"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run / "metrics.json").exists()
    state = json.loads((run / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert all({"python", "numpy", "torch"} <= set(r) for r in state["rng"])

    _launch(tmp_path, "--resume", "--gin_bindings", "MAX_STEPS = 3")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["codebooks_identical"] is True
    (got0, got1), (expected0, expected1) = _ranks(run), _ranks(reference)
    assert _differing(got0, expected0) == []
    assert _differing(got1, expected1) == []
