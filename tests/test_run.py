"""The run command end to end with the real components (tiny config), exact resume, config
checks, bad input, save/from_pretrained, and a dry build of every bundled run file."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest
import torch

import lgvq_plugins
from lgvq_plugins.config import bundled_configs, bundled_gin_dir, parse_gin
from lgvq_plugins.training.experiment import Experiment, RunDirectoryError, config_identity
from lgvq_plugins.pretrained import from_pretrained, save_pretrained
from lgvq_plugins.run import main
from lgvq_plugins.training.trainer import ConfigMismatchError, Trainer

TINY = str(bundled_gin_dir() / "tiny.gin")
RUN_FILES = [c for c in bundled_configs() if "/" not in c]  # building blocks live in folders


def run(tmp_path: Path, *extra: str) -> dict:
    gin.clear_config()
    return main(["--gin", TINY, "--root", str(tmp_path), *extra])


def test_every_run_file_builds(tmp_path):
    assert {"cvq_lg.gin", "cvq.gin", "vqgan_lg.gin", "vqgan.gin", "vqvae_lg.gin", "vqvae.gin",
            "tiny.gin"} <= set(RUN_FILES)
    for name in RUN_FILES:
        gin.clear_config()
        parse_gin([name], ["Trainer.max_steps = 1", f"Experiment.root = '{tmp_path}'"])
        exp = Experiment().build()
        guided = name.endswith("_lg.gin") or name == "tiny.gin"
        assert getattr(exp.model, "enabled") is guided, name
        assert exp.model.tokenizer.lgvq_registry_name == exp.backbone
        assert exp.trainer.config_hash and exp.trainer.max_steps == 1
        exp.trainer.close()


def test_tiny_run_writes_the_run_directory(tmp_path):
    metrics = run(tmp_path)
    d = tmp_path / "tiny"
    for rel in ("config.gin", "operative_config.gin", "metrics.json", "logs/metrics.jsonl",
                "checkpoints/latest", "samples/step_000004.png", "pretrained/config.json",
                "pretrained/model.safetensors"):
        assert (d / rel).is_file(), rel
    operative = (d / "operative_config.gin").read_text()
    assert "Trainer.batch_size = %BATCH_SIZE" in operative and "BATCH_SIZE = 4" in operative
    assert "include 'quantizers/cvq_quantizer.gin'" in (d / "config.gin").read_text()
    saved = json.loads((d / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["codebooks_identical"] is True
    for key in ("val_psnr", "val_codebook_usage", "val_perplexity", "val_rec_loss", "train_images_per_sec"):
        assert isinstance(saved[key], float) and saved[key] == pytest.approx(metrics[key])
    assert 0 < saved["val_codebook_usage"] <= 1 and saved["val_perplexity"] >= 1
    assert list((d / "logs").glob("events.out.tfevents.*"))


def test_fresh_run_refuses_existing_checkpoints(tmp_path):
    run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    with pytest.raises(RunDirectoryError, match="--resume"):
        run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    with pytest.raises(RunDirectoryError, match="no checkpoint"):
        run(tmp_path, "--name", "other", "--resume")


def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    """Real tokenizer + guidance (random masking, CVQ re-anchoring): RNG states matter."""
    run(tmp_path / "a")
    reference = from_pretrained(tmp_path / "a" / "tiny" / "pretrained", guidance=True)

    original = Trainer.train_step

    def killed(self, micro):
        if self.step == 3:  # the step-2 checkpoint exists; die in step 3
            raise KeyboardInterrupt("simulated kill")
        return original(self, micro)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.undo()
    run(tmp_path / "b", "--resume")
    resumed = from_pretrained(tmp_path / "b" / "tiny" / "pretrained", guidance=True)
    a, b = reference.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "b" / "tiny" / "config.resume.gin").is_file()


def test_resume_with_other_config_fails_but_run_only_changes_are_fine(tmp_path):
    run(tmp_path, "--gin_bindings", "MAX_STEPS = 2")
    with pytest.raises(ConfigMismatchError, match=r"- NUM_CODES = 32\n  \+ NUM_CODES = 16"):
        run(tmp_path, "--resume", "--gin_bindings", "MAX_STEPS = 2", "--gin_bindings", "NUM_CODES = 16")
    # longer training and other logging are run-only settings
    metrics = run(tmp_path, "--resume", "--gin_bindings", "MAX_STEPS = 3", "--gin_bindings", "Trainer.log_every = 2")
    assert metrics["steps"] == 3


def test_config_identity_ignores_run_only_settings_and_their_macros():
    base = "Trainer.max_steps = %MAX_STEPS\nMAX_STEPS = 10\nTrainer.batch_size = 4\nvq.num_codes = 8\n"
    h1, lines = config_identity(base)
    h2, _ = config_identity(base.replace("MAX_STEPS = 10", "MAX_STEPS = 99").replace("= 4", "= 4\nTrainer.log_every = 3"))
    h3, _ = config_identity(base.replace("num_codes = 8", "num_codes = 9"))
    assert h1 == h2 != h3
    assert lines == ["Trainer.batch_size = 4", "vq.num_codes = 8"]


# ---------------------------------------------------------------------------------------
# Bad input fails before training, naming the file/line or the valid choices
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(self):
        raise AssertionError("training started despite a bad configuration")

    monkeypatch.setattr(Trainer, "fit", refuse)


def test_unknown_backbone_lists_valid_names(tmp_path, no_training):
    with pytest.raises(lgvq_plugins.UnknownComponentError) as err:
        run(tmp_path, "--gin_bindings", "Experiment.backbone = 'vqgam'")
    assert "Did you mean 'vqgan'" in str(err.value) and "vqvae" in str(err.value)
    assert not (tmp_path / "tiny").exists()


def test_unknown_quantizer_in_a_gin_file_names_file_and_line(tmp_path, no_training):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{TINY}'\n\nvqgan.quantizer = 'cvqq'\n")
    gin.clear_config()
    with pytest.raises(lgvq_plugins.UnknownComponentError) as err:
        main(["--gin", str(bad), "--root", str(tmp_path)])
    assert "cvq" in str(err.value)
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert f"{bad}:3" in notes


def test_wrong_typed_value_names_setting_and_line(tmp_path, no_training):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{TINY}'\nTrainer.max_steps = 'ten'\n")
    gin.clear_config()
    with pytest.raises(ValueError, match="Trainer.max_steps") as err:
        main(["--gin", str(bad), "--root", str(tmp_path)])
    assert f"{bad}:2" in "\n".join(getattr(err.value, "__notes__", []))


def test_gin_parse_error_carries_file_and_line(tmp_path, no_training):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{TINY}'\nTrainer.max_stepz = 3\n")
    gin.clear_config()
    with pytest.raises(ValueError) as err:
        main(["--gin", str(bad), "--root", str(tmp_path)])
    assert "max_stepz" in str(err.value) and "bad.gin" in str(err.value) and "2" in str(err.value)


# ---------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------


def test_from_pretrained_reproduces_codes(tmp_path):
    gin.clear_config()
    parse_gin([TINY], [f"Experiment.root = '{tmp_path}'"])
    exp = Experiment().build()
    model = exp.model.eval()
    x = torch.stack([exp.trainer.val_data[i]["image"] for i in range(4)])
    save_pretrained(model, tmp_path / "p")
    gin.clear_config()  # rebuilding must not depend on gin
    guided = from_pretrained(tmp_path / "p")
    tokenizer = from_pretrained(tmp_path / "p", guidance=False)
    assert not guided.training and guided.enabled
    with torch.no_grad():
        codes = model.tokenizer.encode(x).indices
        assert torch.equal(guided.tokenizer.encode(x).indices, codes)
        assert torch.equal(tokenizer.encode(x).indices, codes)
        assert torch.equal(tokenizer.decode_indices(codes), model.tokenizer.decode_indices(codes))
    assert set(guided.state_dict()) == set(model.state_dict())
    # a bare tokenizer round-trips too
    save_pretrained(tokenizer, tmp_path / "t")
    again = from_pretrained(tmp_path / "t")
    assert type(again) is type(tokenizer)
    with torch.no_grad():
        assert torch.equal(again.encode(x).indices, codes)
    exp.trainer.close()
