"""Report sections showing what the downstream tasks produced, for one run or side by side
for the variants of a comparison:

* generated samples (a result with a ``samples`` artefact and a ``conditioning`` protocol:
  ``text_to_image`` with each caption, ``semantic_synthesis`` with each map,
  ``unconditional``, ``completion``) — real image, then each model's generated image;
* generated vs reference captions (``tables["examples"]`` with ``generated``/``references``);
* predicted vs true answers (examples with ``question``/``answer``/``predicted``);
* predicted vs true boxes drawn on the images (examples with ``box``/``predicted``).

What a section shows is read from the task's result (its artefacts, tables and protocol),
not from its name, so a third-party task that writes the same shapes is shown too. The
evaluated data set (``data``) supplies images and captions; without it the tables are
shown without images.

    sections = task_sections({"vqgan_lg_s0": (metrics, Path("runs/vqgan_lg_s0"))}, data)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lgvq_plugins.evaluation.page import (
    e,
    fmt,
    guarded,
    img_tag,
    missing,
    protocol_text,
    section,
    table,
)
from lgvq_plugins.evaluation.task_plots import (
    boxes_figure,
    generation_figure,
    split_pairs,
    thumbnail,
    to_uint8,
)

#: rows (samples) shown per task
MAX_ROWS = 8
HEADINGS = {"generation": "generated samples", "captions": "generated vs reference captions",
            "answers": "predicted vs true answers", "boxes": "predicted vs true boxes"}
#: a source of outputs: (the run's metrics.json, the folder its tasks' folders are under)
Source = tuple[Mapping[str, Any], Path]


def view_kind(result: Mapping[str, Any]) -> str | None:
    """Which view shows a task result (``"generation"``, ``"captions"``, ``"answers"``,
    ``"boxes"``), or None when it produced nothing to show beyond its numbers."""
    if (result.get("artefacts") or {}).get("samples") and "conditioning" in (result.get("protocol") or {}):
        return "generation"
    examples = (result.get("tables") or {}).get("examples")
    if isinstance(examples, list) and examples and isinstance(examples[0], Mapping):
        keys = set(examples[0])
        for kind, needed in (("captions", {"generated", "references"}), ("answers", {"question", "answer", "predicted"}),
                             ("boxes", {"box", "predicted"})):
            if needed <= keys:
                return kind
    return None


def task_dir(base: Path, task: str) -> Path:
    """The folder of ``task``'s files: ``<run>/eval/<task>`` (a trained run) or
    ``<eval folder>/<task>`` (``lgvq eval``)."""
    nested = Path(base) / "eval" / task
    return nested if nested.is_dir() else Path(base) / task


def _first_indices(protocol: Mapping[str, Any], n: int) -> list[int]:
    """The samples of a generation task's ``samples.png``: the first ones of process 0's
    shard (indices ``0, world, 2·world, ...`` of the evaluated images)."""
    world = max(1, int(protocol.get("processes") or 1))
    return list(range(0, int(protocol.get("images") or n * world), world))[:n]


def _sample(data: Dataset | None, index: int) -> Mapping[str, Any] | None:
    return data[index] if data is not None and 0 <= index < len(data) else None


def _example_index(example: Mapping[str, Any], position: int) -> int:
    """An example's sample index (its ``index``; else its position — the reader tasks keep
    their examples in sample order in one process)."""
    index = example.get("index")
    return int(index) if isinstance(index, int) else position


def _generation(task: str, results: Mapping[str, tuple[Mapping[str, Any], Path]], data: Dataset | None) -> str:
    first = next(iter(results.values()))[0]
    protocol = first.get("protocol") or {}
    condition = str(protocol.get("conditioning", "none"))
    hw = tuple(data[0]["image"].shape[-2:]) if data is not None and len(data) else None
    pairs = {label: split_pairs((folder / result["artefacts"]["samples"]).read_bytes(), hw)
             for label, (result, folder) in results.items()}
    n = min(MAX_ROWS, *(len(p) for p in pairs.values()))
    rows = []
    for r, index in enumerate(_first_indices(protocol, n)):
        sample = _sample(data, index)
        cond: Any = None
        if condition == "text":
            cond = sample["caption"] if sample is not None else "(caption: evaluation data not given)"
        elif condition == "semantic_map" and sample is not None:
            cond = sample["semantic"]
        rows.append({"condition": cond, "real": next(iter(pairs.values()))[r][0],
                     "generated": {label: p[r][1] for label, p in pairs.items()}})
    shown = condition if condition in ("text", "semantic_map") and (condition == "text" or data is not None) else "none"
    what = {"text": "the caption", "semantic_map": "the semantic map (class per pixel)",
            "top_half": "the real image's top-half codes (the rest sampled)", "none": "nothing (unconditional)"}
    caption = (f"First {len(rows)} evaluated samples; each row: {'its conditioning, ' if shown != 'none' else ''}"
               f"the real image, then the image each model generated. Conditioned on "
               f"{what.get(condition, condition)}; the same samples and sampling seed for every model.")
    return f"<figure>{img_tag(generation_figure(rows, condition=shown), task + ' samples')}" \
           f"<figcaption>{e(caption)}</figcaption></figure>"


def _aligned(results: Mapping[str, tuple[Mapping[str, Any], Path]]) -> tuple[list[int], dict[str, dict[int, Any]]]:
    """Sample indices of the first source's examples, and each source's examples by index."""
    by_label = {label: {_example_index(x, i): x for i, x in enumerate((result.get("tables") or {}).get("examples") or [])}
                for label, (result, _) in results.items()}
    return list(next(iter(by_label.values())))[:MAX_ROWS], by_label


def _thumb_cell(data: Dataset | None, index: int) -> list[tuple[str, str]]:
    sample = _sample(data, index)
    return [("img", img_tag(thumbnail(to_uint8(sample["image"])), f"sample {index}"))] if sample is not None else []


def _captions(task: str, results: Mapping[str, tuple[Mapping[str, Any], Path]], data: Dataset | None) -> str:
    indices, by_label = _aligned(results)
    rows = []
    for index in indices:
        refs = next(iter(by_label.values()))[index]["references"]
        cells = _thumb_cell(data, index) + [("proto", "<br>".join(e(r) for r in refs[:3]))]
        cells += [("key", e(by_label[label].get(index, {}).get("generated", "—"))) for label in by_label]
        rows.append(cells)
    header = (["image"] if data is not None else []) + ["references (up to 3)", *(f"generated: {k}" for k in by_label)]
    return table(header, rows) + "<p>Greedy decoding; the same evaluated images for every model.</p>"


def _answers(task: str, results: Mapping[str, tuple[Mapping[str, Any], Path]], data: Dataset | None) -> str:
    indices, by_label = _aligned(results)
    rows = []
    for index in indices:
        ex = next(iter(by_label.values()))[index]
        cells = _thumb_cell(data, index) + [("key", e(ex["question"])), ("key", e(ex["answer"]))]
        for label in by_label:
            pred = by_label[label].get(index, {}).get("predicted")
            mark = "" if pred is None else (" ✓" if pred == ex["answer"] else " ✗")
            cells.append(("key", e(f"{fmt(pred)}{mark}")))
        rows.append(cells)
    header = (["image"] if data is not None else []) + ["question", "true answer", *(f"answer: {k}" for k in by_label)]
    return table(header, rows)


def _boxes(task: str, results: Mapping[str, tuple[Mapping[str, Any], Path]], data: Dataset | None) -> str:
    indices, by_label = _aligned(results)
    labels = list(by_label)
    first = by_label[labels[0]]
    rows = [[("key", e(first[i].get("refexp", ""))), *[("num", e(fmt(by_label[k].get(i, {}).get("iou"))))
                                                       for k in labels]] for i in indices]
    iou_table = table(["referring expression", *(f"IoU: {k}" for k in labels)], rows)
    if data is None:
        return missing("the evaluation data was not given: boxes listed, not drawn") + iou_table
    panels = [{"image": to_uint8(data[i]["image"]), "text": first[i].get("refexp", ""), "truth": first[i]["box"],
               "predicted": {k: by_label[k].get(i, {}).get("predicted") for k in labels}} for i in indices]
    figure = img_tag(boxes_figure(panels, labels), task + " boxes")
    return (f"<figure>{figure}<figcaption>Green: the true box of the referred object; dashed: each model's "
            "predicted box.</figcaption></figure>" + iou_table)


VIEWS = {"generation": _generation, "captions": _captions, "answers": _answers, "boxes": _boxes}


def task_sections(sources: Mapping[str, Source], data: Dataset | None = None,
                  tasks: Sequence[str] | None = None) -> list[str]:
    """One ``<section id="task-<name>">`` per task with outputs to show, in the order the
    tasks ran; each shows every source's outputs (label → (metrics, folder))."""
    names: list[str] = list(tasks) if tasks is not None else []
    for metrics, _ in sources.values():
        names += [t for t in (metrics.get("tasks") or {}) if t not in names]
    out = []
    for name in names:
        results = {label: (m["tasks"][name], task_dir(base, name)) for label, (m, base) in sources.items()
                   if name in (m.get("tasks") or {})}
        kind = view_kind(next(iter(results.values()))[0]) if results else None
        if kind is None:
            continue
        protocol = protocol_text(next(iter(results.values()))[0].get("protocol"))
        body = guarded(f"task-{name}", lambda k=kind, n=name, r=results: VIEWS[k](n, r, data))
        out.append(section(f"task-{name}", f"{name}: {HEADINGS[kind]}",
                           body + (f'<p class="proto"><b>protocol</b>: {e(protocol)}</p>' if protocol else "")))
    return out


__all__ = ["HEADINGS", "MAX_ROWS", "VIEWS", "task_dir", "task_sections", "view_kind"]
