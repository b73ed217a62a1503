"""The same command and config under a real 2-process torchrun (gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp import torchrun

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ddp
def test_two_process_run_keeps_codebooks_identical(tmp_path):
    proc = torchrun(["-m", "lgvq_plugins.run", "--gin", "gin/tiny.gin", "--root", str(tmp_path),
                     "--gin_bindings", "Trainer.dump_codebooks = True",
                     "--gin_bindings", "MAX_STEPS = 3"],
                    cwd=REPO, env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    run = tmp_path / "tiny"
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
def test_two_process_resume(tmp_path):
    """A 2-process run resumes under torchrun: every rank's RNG state is stored (gathered
    as JSON), and training continues from the checkpoint."""
    args = ["-m", "lgvq_plugins.run", "--gin", "gin/tiny.gin", "--root", str(tmp_path)]
    torchrun([*args, "--gin_bindings", "MAX_STEPS = 2"], cwd=REPO, env={"HF_HUB_OFFLINE": "1"})
    state = json.loads((tmp_path / "tiny" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert all({"python", "numpy", "torch"} <= set(r) for r in state["rng"])
    torchrun([*args, "--resume", "--gin_bindings", "MAX_STEPS = 3"], cwd=REPO, env={"HF_HUB_OFFLINE": "1"})
    metrics = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["codebooks_identical"] is True
