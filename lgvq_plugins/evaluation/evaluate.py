"""Evaluate a saved model alone: ``lgvq eval --pretrained runs/<name>/pretrained --gin ...``.

Loads the model with :func:`lgvq_plugins.pretrained.from_pretrained` (no gin needed for the
model itself), builds the evaluation split from gin, runs the tasks and writes an evaluation
folder::

    <out>/                    default: runs/<name>/eval/
      metrics.json            {"name", "pretrained", "backbone", "dataset", "guidance",
                               "tasks": {<task>: {"metrics", "protocol", "unavailable", ...}}}
      <task>/                 each task's files (result.json, figures)
      report.html             metrics with protocols, reconstructions, usage, heatmaps,
                              the run's loss curves when its logs/ are beside pretrained/

gin (the settings of the run — e.g. ``runs/<name>/config.gin``, read by default — size the
data; ``Evaluation.*`` choose what is measured)::

    Evaluation.tasks = ['reconstruction', 'retrieval']
    Evaluation.split = 'test'
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.report import find_twin, write_run_report
from lgvq_plugins.evaluation.task import run_tasks
from lgvq_plugins.training.checkpoint import write_json_atomic
from lgvq_plugins.training.distributed import is_main_process


def _run_dir_of(pretrained: Path) -> Path | None:
    """The run folder a ``pretrained/`` folder was saved in (it holds ``metrics.json`` or
    ``logs/``), if any."""
    parent = pretrained.resolve().parent
    return parent if (parent / "metrics.json").is_file() or (parent / "logs").is_dir() else None


@gin.configurable("Evaluation", denylist=["pretrained", "out_dir", "model"])
def evaluate_pretrained(pretrained: str | Path, out_dir: str | Path | None = None, *,
                        tasks: Sequence[str] = ("reconstruction",), dataset: str | None = None,
                        split: str = "test", report: bool = True, twin: bool = True,
                        model: Any = None, load_options: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Run ``tasks`` on the model saved in ``pretrained`` and write ``out_dir``.

    Args:
        pretrained: a folder written by ``save_pretrained`` (a run's ``pretrained/``).
        out_dir: the evaluation folder (default: ``eval/`` beside ``pretrained/``).
        tasks: registered task names (``lgvq list task``).
        dataset: registered data set (default: the run's ``Experiment.dataset`` from gin, else
            ``shapes``); built as ``create_dataset(dataset, split=split)`` with gin's settings.
        split: the split evaluated.
        report: also write ``report.html``.
        twin: put an unguided/guided twin run's numbers beside these in the report (a finished
            run under the same root; see :func:`~lgvq_plugins.evaluation.report.find_twin`).
        model: an already loaded model (skips loading; for callers that hold one).
        load_options: keyword arguments for :func:`~lgvq_plugins.pretrained.from_pretrained`:
            the machine-local settings a saved folder leaves out, e.g.
            ``{'text_encoder_options': {'checkpoint': '/weights/clip.pt'}, 'cache_dir': ...}``
            (gin: ``Evaluation.load_options = {...}``).

    Returns:
        the metrics written to ``out_dir/metrics.json``.
    """
    from lgvq_plugins.pretrained import from_pretrained

    pretrained = Path(pretrained)
    if model is None and not (pretrained / "config.json").is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: not a pretrained model folder (no config.json). "
                                "Point it at a run's pretrained/ folder, e.g. runs/cvq_lg/pretrained")
    run_dir = _run_dir_of(pretrained)
    out_dir = Path(out_dir) if out_dir is not None else pretrained.resolve().parent / "eval"
    if dataset is None:
        try:
            dataset = gin.query_parameter("Experiment.dataset")
        except ValueError:
            dataset = "shapes"
    start = time.time()
    model = model if model is not None else from_pretrained(pretrained, **dict(load_options or {}))
    data = api.create_dataset(dataset, split=split)
    results = run_tasks(model, data, list(tasks), out_dir)
    run_metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")) \
        if run_dir and (run_dir / "metrics.json").is_file() else {}
    guided = bool(getattr(model, "enabled", False))
    metrics: dict[str, Any] = {
        "name": run_metrics.get("name", pretrained.resolve().parent.name), "pretrained": str(pretrained),
        "backbone": getattr(getattr(model, "tokenizer", model), "lgvq_registry_name", run_metrics.get("backbone")),
        "dataset": dataset, "split": split, "guidance": guided,
        "tasks": {name: r.to_json() for name, r in results.items()},
        "eval_time_s": time.time() - start,
    }
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "metrics.json", metrics)
        if report:
            twin_dir = find_twin(run_dir, {**run_metrics, "guidance": guided}) if twin and run_dir else None
            write_run_report(out_dir, model=model, data=data, metrics=metrics, twin=twin_dir or False,
                             log=run_dir / "logs" / "metrics.jsonl" if run_dir else None,
                             title=f"lgvq evaluation: {metrics['name']} ({split} split)")
    return metrics


__all__ = ["evaluate_pretrained"]
