"""Evaluation after training (``Experiment.tasks``) and of a saved model (``lgvq eval``)."""

from __future__ import annotations

import json

import fake_tasks
import pytest

import gin
from lgvq_plugins.cli import main as cli_main
from lgvq_plugins.config import bundled_gin_dir
from lgvq_plugins.run import main as run_main

TINY = str(bundled_gin_dir() / "tiny.gin")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run that evaluated ``count_codes`` on the test split after training."""
    with fake_tasks.registered():
        root = tmp_path_factory.mktemp("runs")
        gin.clear_config()
        metrics = run_main(["--gin", TINY, "--root", str(root), "--gin_bindings", "MAX_STEPS = 2",
                            "--gin_bindings", "Experiment.tasks = ['count_codes']",
                            "--gin_bindings", "Experiment.task_split = 'test'",
                            "--gin_bindings", "Experiment.report = False"])
        gin.clear_config()
        yield root / "tiny", metrics


def test_run_adds_the_task_numbers_to_metrics_json(trained):
    run_dir, returned = trained
    saved = json.loads((run_dir / "metrics.json").read_text())
    result = saved["tasks"]["count_codes"]
    assert result == returned["tasks"]["count_codes"]
    assert 0 < result["metrics"]["usage"] <= 1
    assert result["metrics"]["lpips"] is None and result["unavailable"]["lpips"] == "no LPIPS weights here"
    assert result["protocol"] == {"images": 8, "split": "test"}
    assert result["tables"]["usage_histogram"] and sum(result["tables"]["usage_histogram"]) == 8 * 16 * 16
    assert (run_dir / "eval" / "count_codes" / "result.json").is_file()
    assert (run_dir / "eval" / "count_codes" / "counts.txt").is_file()
    assert len(saved["gin_config_hash"]) == 64 and len(saved["config_hash"]) == 64
    assert not (run_dir / "report.html").exists()  # Experiment.report = False


def test_lgvq_eval_evaluates_the_saved_model_alone(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "eval"
    with fake_tasks.registered():
        assert cli_main(["eval", "--pretrained", str(run_dir / "pretrained"), "--tasks", "count_codes",
                         "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the run's config.gin sized the data as in training: the same model on the same images
    # gives exactly the numbers measured after training
    trained_result = json.loads((run_dir / "metrics.json").read_text())["tasks"]["count_codes"]
    assert metrics["tasks"]["count_codes"]["metrics"] == trained_result["metrics"]
    assert metrics["tasks"]["count_codes"]["tables"] == trained_result["tables"]
    assert metrics["name"] == "tiny" and metrics["split"] == "test" and metrics["guidance"] is True
    html = (out / "report.html").read_text()
    assert "count_codes/usage" in html and "no LPIPS weights here" in html
    assert "no training log" not in html  # the run's logs/ beside pretrained/ give the loss curves
    assert "the evaluation task&#x27;s histogram" in html  # usage drawn from the task's table


def test_lgvq_eval_names_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a pretrained model folder .*runs/cvq_lg/pretrained"):
        cli_main(["eval", "--pretrained", str(tmp_path), "--tasks", ""])


def test_lgvq_eval_unknown_task_lists_the_registered_ones(trained, tmp_path):
    run_dir, _ = trained
    import lgvq_plugins

    with pytest.raises(lgvq_plugins.UnknownComponentError, match="count_codez"), fake_tasks.registered():
        cli_main(["eval", "--pretrained", str(run_dir / "pretrained"), "--tasks", "count_codez",
                 "--out", str(tmp_path / "e")])
