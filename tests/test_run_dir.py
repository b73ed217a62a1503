"""The run folder through the run command (tiny config): a previous run is never started
over by accident (with or without checkpoints), a failed build leaves no folder, and
``--resume`` of a finished run succeeds and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest
import torch
from safetensors.torch import load_file

from lgvq_plugins.config import bundled_gin_dir
from lgvq_plugins.run import main
from lgvq_plugins.training.run_dir import RunDirectoryError, check_run_dir
from lgvq_plugins.training.trainer import Trainer

TINY = str(bundled_gin_dir() / "tiny.gin")


def run(tmp_path: Path, *extra: str) -> dict:
    gin.clear_config()
    return main(["--gin", TINY, "--root", str(tmp_path), *extra])


def test_run_stopped_before_its_first_checkpoint_is_refused_unless_overwritten(tmp_path, monkeypatch):
    original = Trainer.train_step

    def killed(self, micro):
        if self.step == 1:  # the first checkpoint comes at step 2
            raise KeyboardInterrupt("simulated kill")
        return original(self, micro)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    monkeypatch.undo()
    d = tmp_path / "tiny"
    assert (d / "logs" / "metrics.jsonl").is_file() and not (d / "checkpoints").exists()
    stale = (d / "logs" / "metrics.jsonl").read_text()
    assert '"step": 1' in stale

    with pytest.raises(RunDirectoryError, match=r"without a checkpoint \(.*logs.*overwrite = True"):
        run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    with pytest.raises(RunDirectoryError, match="no checkpoint to resume from; it holds .*logs"):
        run(tmp_path, "--resume", "--gin_bindings", "MAX_STEPS = 2")
    assert (d / "logs" / "metrics.jsonl").read_text() == stale  # refused: nothing touched

    (d / "notes-from-the-old-run.txt").write_text("old")
    metrics = run(tmp_path, "--gin_bindings", "MAX_STEPS = 2", "--gin_bindings", "Experiment.overwrite = True")
    assert metrics["steps"] == 2
    assert not (d / "notes-from-the-old-run.txt").exists()  # overwrite starts from an empty folder
    records = [json.loads(line) for line in (d / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2]  # one run's history, not two


def test_failed_build_leaves_no_run_folder(tmp_path):
    with pytest.raises(Exception, match="cvqq"):
        run(tmp_path, "--gin_bindings", "vqgan.quantizer = 'cvqq'")
    assert not (tmp_path / "tiny").exists()
    assert list(tmp_path.iterdir()) == []


def test_run_name_must_stay_inside_the_root(tmp_path):
    for name in (".", ".."):
        with pytest.raises(RunDirectoryError, match="inside Experiment.root"):
            check_run_dir(tmp_path / name, tmp_path, resume=False, overwrite=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_succeeds_and_changes_nothing(tmp_path):
    first = run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    d = tmp_path / "tiny"
    checkpoints = _snapshot(d / "checkpoints")
    weights = load_file(str(d / "pretrained" / "model.safetensors"))
    again = run(tmp_path, "--resume", "--gin_bindings", "MAX_STEPS = 2")
    # The final save repeats (same step): the checkpoint folder is byte-for-byte the same.
    assert _snapshot(d / "checkpoints") == checkpoints
    after = load_file(str(d / "pretrained" / "model.safetensors"))
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert again["steps"] == first["steps"] == 2
    for key in ("val_psnr", "val_rec_loss", "val_codebook_usage", "images_seen"):
        assert again[key] == first[key], key
