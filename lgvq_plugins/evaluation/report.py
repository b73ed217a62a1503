"""``report.html``: one self-contained page per run, evaluation or comparison.

It opens from disk with no network: no scripts, no external style sheets or fonts, every
figure a PNG embedded as a ``data:`` URI (see :mod:`lgvq_plugins.evaluation.plots`).

A run's report has these sections (each an ``<section id=...>``):

* ``summary`` — run name, backbone, data set, guidance, steps, time;
* ``metrics`` — every number in ``metrics.json`` with the protocol it was measured under
  (split, image count, ...) and, when an unguided/guided twin run is found beside it, the
  twin's number in the next column;
* ``reconstructions`` — originals above reconstructions;
* ``usage`` — the codebook-usage histogram over the evaluation set;
* ``losses`` — training losses and validation metrics from ``logs/metrics.jsonl``;
* ``heatmaps`` — word→code similarity maps for a few test captions (the paper's Figure 6),
  when the model is guided;
* ``task-<name>`` — for each downstream task that ran, what it produced (generated samples,
  captions, answers, boxes on images; :mod:`~lgvq_plugins.evaluation.task_views`).

    write_run_report("runs/cvq_lg", model=model, data=test_split)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation import plots, task_views
from lgvq_plugins.evaluation.page import e as _e
from lgvq_plugins.evaluation.page import (
    fmt,
    guarded,
    img_tag,
    missing,
    page,
    protocol_text,
    section,
    table,
)
from lgvq_plugins.evaluation.plots import (
    heatmap_pngs,
    reconstruction_png,
    usage_counts,
    word_code_similarity,
)
from lgvq_plugins.evaluation.task import is_guided
from lgvq_plugins.training.logs import read_jsonl

#: sections of a run report, in page order: (id, heading)
RUN_SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Run"), ("metrics", "Metrics"), ("reconstructions", "Reconstructions"),
    ("usage", "Codebook usage"), ("losses", "Loss curves"), ("heatmaps", "Word → code similarity"),
)

# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


#: protocol entries shown beside every number of a task (the rest: once per task)
COMMON_PROTOCOL = ("split", "images")


def short_protocol(protocol: Mapping[str, Any] | None, metric: str) -> str:
    """The split and image count, plus the protocol entry named after the metric (``fid``
    for ``fid``/``kid_*``, ``ssim`` for ``ssim``, ...) — what a reader needs beside a number."""
    protocol = protocol or {}
    picked = {k: protocol[k] for k in COMMON_PROTOCOL if k in protocol}
    for key in (metric, metric.split("_")[0], "fid" if metric.startswith("kid") else ""):
        if key and key in protocol and key not in picked:
            value = protocol[key]
            picked[key] = {k: v for k, v in value.items() if not isinstance(v, Mapping)} \
                if isinstance(value, Mapping) else value
            break
    return protocol_text(picked)


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every reported number of a ``metrics.json`` as ``{"key", "value", "protocol", "note"}``.

    Task numbers come first (``<task>/<metric>``, with the short protocol of
    :func:`short_protocol`; an unavailable metric has value None and the reason as note), then
    the final validation numbers.
    """
    rows: list[dict[str, Any]] = []
    for task, result in (metrics.get("tasks") or {}).items():
        protocol = result.get("protocol")
        unavailable = result.get("unavailable") or {}
        for key, value in (result.get("metrics") or {}).items():
            rows.append({"key": f"{task}/{key}", "value": value, "protocol": short_protocol(protocol, key),
                         "note": unavailable.get(key, "")})
        for key, why in unavailable.items():
            if key not in (result.get("metrics") or {}):
                rows.append({"key": f"{task}/{key}", "value": None, "protocol": short_protocol(protocol, key),
                             "note": why})
    vp = metrics.get("val_protocol") or {}
    order = ("split", "batches", "batch_size_per_rank")  # JSON on disk has its keys sorted
    val_proto = protocol_text({**{k: vp[k] for k in order if k in vp}, **vp}) or "validation split"
    for key, value in metrics.items():
        if key.startswith("val_") and key != "val_protocol" and isinstance(value, (int, float)):
            rows.append({"key": key, "value": value, "protocol": val_proto, "note": ""})
    return rows


def metrics_table(metrics: Mapping[str, Any], twin: Mapping[str, Any] | None = None,
                  twin_label: str = "twin") -> str:
    rows = metric_rows(metrics)
    if not rows:
        return missing("metrics.json holds no task or validation numbers")
    twin_values = {r["key"]: r["value"] for r in metric_rows(twin)} if twin else {}
    header = ["metric", metrics.get("name", "this run")] + ([twin_label] if twin else []) + ["protocol", "note"]
    body = []
    for r in rows:
        cells = [("key", _e(r["key"])), ("num", _e(fmt(r["value"])))]
        if twin:
            cells.append(("num", _e(fmt(twin_values.get(r["key"])))))
        cells += [("proto", _e(r["protocol"])), ("proto", _e(r["note"]))]
        body.append(cells)
    protocols = "\n".join(f'<p class="proto"><b>{_e(task)}</b>: {_e(protocol_text(result.get("protocol")))}</p>'
                          for task, result in (metrics.get("tasks") or {}).items() if result.get("protocol"))
    return table(header, body) + ("\n<h3>Protocols</h3>\n" + protocols if protocols else "")


# ---------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def find_twin(run_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> Path | None:
    """The unguided twin of a guided run (or the guided twin of an unguided one) under the
    same root: a finished sibling run (``metrics.json``) with the same backbone and data set
    and the other guidance setting. A sibling named like the run without / with ``_lg``
    (``cvq_lg`` ↔ ``cvq``) is preferred; otherwise the most recently finished one."""
    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else read_metrics(run_dir)
    if not metrics or not run_dir.parent.is_dir():
        return None
    name = run_dir.name
    preferred = {name.replace("_lg", ""), f"{name}_lg"} - {name}
    candidates = []
    for sibling in run_dir.parent.iterdir():
        other = read_metrics(sibling) if sibling.is_dir() and sibling != run_dir else None
        if (other and other.get("backbone") == metrics.get("backbone")
                and other.get("dataset") == metrics.get("dataset")
                and bool(other.get("guidance")) != bool(metrics.get("guidance"))):
            candidates.append((sibling.name in preferred, (sibling / "metrics.json").stat().st_mtime, sibling))
    return max(candidates)[2] if candidates else None


def _usage_from_tasks(metrics: Mapping[str, Any]) -> list[float] | None:
    """Per-code counts from a task's tables (e.g. ``reconstruction`` → ``usage_histogram``)."""
    for result in (metrics.get("tasks") or {}).values():
        for key, value in (result.get("tables") or {}).items():
            if ("hist" in key or "count" in key) and isinstance(value, list) and value \
                    and all(isinstance(v, (int, float)) for v in value):
                return value
    return None


def _latest_sample(run_dir: Path) -> Path | None:
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    return samples[-1] if samples else None


def write_run_report(run_dir: str | Path, *, model: nn.Module | None = None, data: Dataset | None = None,
                     metrics: Mapping[str, Any] | None = None, twin: str | Path | None | bool = True,
                     out: str | Path | None = None, log: str | Path | None = None, num_images: int = 8,
                     num_captions: int = 3, title: str | None = None) -> Path:
    """Write ``report.html`` for a run (or evaluation) folder; returns its path.

    Args:
        run_dir: folder with ``metrics.json`` and, for a trained run, ``logs/`` and ``samples/``.
        model / data: the trained model and the evaluation split; give both for
            reconstructions computed now, the usage histogram when no task recorded one, and
            the heatmaps. Without them the newest ``samples/`` grid is shown.
        metrics: the metrics (default: ``run_dir/metrics.json``).
        twin: True — look for a twin run beside ``run_dir`` (:func:`find_twin`); a path — that
            run; False/None — no twin column.
        out: the HTML file (default ``run_dir/report.html``).
        log: the training log for the loss curves (default ``run_dir/logs/metrics.jsonl``).
    """
    run_dir = Path(run_dir)
    metrics = dict(metrics if metrics is not None else (read_metrics(run_dir) or {}))
    twin_dir = find_twin(run_dir, metrics) if twin is True else (Path(twin) if twin else None)
    twin_metrics = read_metrics(twin_dir) if twin_dir else None
    have_model = model is not None and data is not None and len(data) > 0
    bodies: dict[str, str] = {}

    summary = [(k, metrics.get(k)) for k in ("name", "backbone", "dataset", "guidance", "steps",
                                            "world_size", "global_batch_size", "wall_time_s", "pretrained")]
    rows = [[("key", _e(k)), ("num", _e(fmt(v)))] for k, v in summary if v is not None]
    if twin_dir:
        rows.append([("key", "twin run"), ("num", _e(twin_dir))])
    bodies["summary"] = table(["", ""], rows) if rows else missing("no metrics.json")
    bodies["metrics"] = metrics_table(metrics, twin_metrics, twin_label=f"twin: {twin_dir.name}" if twin_dir else "")

    sample = _latest_sample(run_dir)

    def reconstructions() -> str:
        if have_model:
            return (f"<figure>{img_tag(reconstruction_png(model, data, num_images), 'reconstructions')}"
                    "<figcaption>top: originals, bottom: reconstructions (first images of the "
                    "evaluation split)</figcaption></figure>")
        if sample is not None:
            return (f"<figure>{img_tag(sample.read_bytes(), 'reconstructions')}"
                    f"<figcaption>{_e(sample.name)}: top originals, bottom reconstructions</figcaption></figure>")
        return missing("no model given and no samples/ grid in the run folder")

    def usage() -> str:
        counts, source = _usage_from_tasks(metrics), "the evaluation task's histogram"
        if counts is None and have_model:
            counts, source = usage_counts(model, data), f"first {min(256, len(data))} images of the evaluation split"
        if not counts:
            return missing("no usage histogram: run the reconstruction task or give the model")
        return (f"<figure>{img_tag(plots.usage_histogram(counts), 'codebook usage histogram')}"
                f"<figcaption>{_e(source)}</figcaption></figure>")

    def losses() -> str:
        path = Path(log) if log is not None else run_dir / "logs" / "metrics.jsonl"
        if not path.is_file():
            return missing(f"no training log ({path})")
        return img_tag(plots.loss_curves(read_jsonl(path)), "loss curves")

    def heatmaps() -> str:
        if not (have_model and is_guided(model)):
            return missing("not a guided model (or no model given): no word→code similarities")
        figures = "\n".join(f"<figure>{img_tag(png, 'word-code similarity: ' + cap)}"
                            f"<figcaption>{_e(cap)}</figcaption></figure>"
                            for cap, png in heatmap_pngs(model, data, num_captions))
        return figures + ("<p>Cosine similarity between each word's frozen text feature and the visual "
                          "token of every code position (one colour scale per caption).</p>")

    # eval mode: a quantizer in training mode would update its statistics (CVQ re-anchors codes)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        for sid, build in (("reconstructions", reconstructions), ("usage", usage), ("losses", losses),
                           ("heatmaps", heatmaps)):
            bodies[sid] = guarded(sid, build)
    finally:
        if model is not None:
            model.train(was_training)

    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [section(sid, heading, bodies[sid]) for sid, heading in RUN_SECTIONS]
    # the downstream tasks' outputs (samples, captions, answers, boxes), after the fixed sections
    sections += task_views.task_sections({str(metrics.get("name", run_dir.name)): (metrics, run_dir)},
                                         data)
    out.write_text(page(title or f"lgvq report: {metrics.get('name', run_dir.name)}", sections), encoding="utf-8")
    return out


__all__ = [
    "RUN_SECTIONS",
    "find_twin",
    "fmt",
    "heatmap_pngs",
    "metric_rows",
    "metrics_table",
    "page",
    "protocol_text",
    "reconstruction_png",
    "section",
    "table",
    "usage_counts",
    "word_code_similarity",
    "write_run_report",
]
