"""The evaluation-task contract, and :func:`run_tasks`, which runs registered tasks by name.

A task measures one thing on a trained model and returns a :class:`TaskResult`: numbers,
the protocol they were measured under (split, image count, resize, extractor, ...), the
metrics it could not compute and why, and files it wrote (PNG/JSON/NPY) for a report::

    from lgvq_plugins.evaluation.task import run_tasks
    results = run_tasks(guided_model, test_split, ["reconstruction", "retrieval"], "runs/x/eval")
    results["reconstruction"].metrics["psnr"]

Tasks are registered like any component (``register_tasks`` hook or ``@register_task``) and
are gin-configurable under their names (``reconstruction.fid_extractor = 'inception'``).

Distributed evaluation: every rank takes the indices ``rank::world`` of the data (no
padding, so every sample counts exactly once) and tasks reduce sums/histograms or gather
features; 1 and N processes give the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lgvq_plugins import api
from lgvq_plugins.training import distributed as D

Needs = Literal["tokenizer", "guided"]


@dataclass
class TaskResult:
    """What a task returns.

    Attributes:
        metrics: name → value. ``None`` means *unavailable* (never a stand-in 0), with the
            reason in :attr:`unavailable`.
        protocol: how the numbers were measured (split, number of images, image size,
            resize, feature extractor, ...); written next to every number.
        unavailable: metric name → why it could not be computed.
        artefacts: name → path, relative to the task's ``out_dir``, of files it wrote.
        tables: small JSON-able extras (usage histogram counts, heatmap data, ...).
    """

    metrics: dict[str, float | None]
    protocol: dict[str, Any]
    unavailable: dict[str, str] = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (``json.dumps``-able; NaN/inf become ``None``)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**{k: data.get(k, {}) for k in ("metrics", "protocol", "unavailable", "artefacts", "tables")})


@runtime_checkable
class Task(Protocol):
    """An evaluation on a trained model.

    ``needs`` is ``"tokenizer"`` (only codes and reconstructions: ``run`` gets the tokenizer,
    or a guided model whose ``.tokenizer`` it uses) or ``"guided"`` (``run`` gets the
    :class:`~lgvq_plugins.guidance.LanguageGuided` model, with its heads).
    ``out_dir`` exists when ``run`` is called; artefact paths are relative to it.
    Under torchrun every rank calls ``run``; every rank returns the same result.
    """

    needs: Needs

    def run(self, model: nn.Module, data: Dataset, out_dir: Path) -> TaskResult: ...


# ---------------------------------------------------------------------------------------
# Helpers for task authors
# ---------------------------------------------------------------------------------------


def tokenizer_of(model: nn.Module) -> nn.Module:
    """The tokenizer inside ``model`` (a guided model's ``.tokenizer``, or ``model``)."""
    return getattr(model, "tokenizer", None) or model


def is_guided(model: nn.Module) -> bool:
    """True for a guided model with guidance on (text encoder and code–text transformer)."""
    return bool(getattr(model, "enabled", False)) and getattr(model, "code_text", None) is not None


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def shard(data: Dataset, max_images: int | None = None) -> tuple[Dataset, int]:
    """This rank's part of the first ``max_images`` samples of ``data``: indices
    ``rank::world`` (no padding, no sample twice). Returns ``(subset, total)`` with ``total``
    the number of samples over all ranks."""
    total = len(data) if max_images is None else min(len(data), int(max_images))
    return Subset(data, range(D.rank(), total, D.world_size())), total


def batches(data: Dataset, batch_size: int, max_images: int | None = None,
            num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Batches (default-collated sample dicts) of this rank's shard, in index order."""
    subset, _ = shard(data, max_images)
    if len(subset) == 0:
        return iter(())
    return iter(DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers))


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (N_r, ...), concatenated in *sample-index* order.

    Ranks hold different counts (``rank::world`` sharding), so rows are padded to the largest
    count for the collective and the padding is dropped. Rank r's j-th row is sample
    ``r + j·world``; the result is ordered by sample index, the same order as one process.
    """
    if not D.is_distributed():
        return rows
    world = D.world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = D.all_gather_cat(count).tolist()
    biggest = max(counts)
    padded = rows.new_zeros((biggest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = D.all_gather_cat(padded[None]).reshape(world, biggest, *rows.shape[1:])
    total = sum(counts)
    out = rows.new_zeros((total, *rows.shape[1:]))
    for r in range(world):
        out[r::world] = parts[r, : counts[r]]
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


# ---------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------


def _unguided_result(name: str, task: Any) -> TaskResult:
    why = getattr(task, "unguided_reason", None) or (
        f"task {name!r} needs the guided model's heads and has no fair protocol for an unguided "
        "tokenizer")
    return TaskResult(metrics={}, protocol={"skipped": True}, unavailable={"*": why})


def _task_name(task: Any) -> str:
    """A task object's registered name (its class's, when built directly), else its class name."""
    name = getattr(task, "lgvq_registry_name", None)
    if name:
        return name
    registry = api.registry("task")
    for candidate in registry.names():
        if registry.entry(candidate).original is type(task):
            return candidate
    return type(task).__name__


def run_tasks(model: nn.Module, data: Dataset, names_or_tasks: Iterable[str | Task] | str,
              out_dir: str | Path, *, write_json: bool = True) -> dict[str, TaskResult]:
    """Run tasks on ``model`` (a tokenizer or a guided model) over ``data``.

    Args:
        model: a tokenizer, or a :class:`~lgvq_plugins.guidance.LanguageGuided` model.
        data: map-style dataset of sample dicts (``image`` in [-1, 1], ``caption``, ...).
        names_or_tasks: registered task names (built by the registry, so gin bindings apply)
            or task objects.
        out_dir: each task writes into ``out_dir/<name>/``; with ``write_json`` the results
            also go to ``out_dir/<name>/result.json`` (process 0 only).

    A task with ``needs = "guided"`` on a model without guidance runs only when it declares
    a fair protocol for unguided tokenizers (``supports_unguided = True``); otherwise it is
    skipped and its result says why.
    """
    if isinstance(names_or_tasks, str):
        names_or_tasks = [names_or_tasks]
    out_dir = Path(out_dir)
    results: dict[str, TaskResult] = {}
    was_training = model.training
    model.eval()
    try:
        for item in names_or_tasks:
            name = item if isinstance(item, str) else _task_name(item)
            task = api.create_task(item) if isinstance(item, str) else item
            needs = getattr(task, "needs", "tokenizer")
            if needs not in ("tokenizer", "guided"):
                raise ValueError(f"task {name!r} declares needs={needs!r}; use 'tokenizer' or 'guided'")
            if needs == "guided" and not is_guided(model) and not getattr(task, "supports_unguided", False):
                result = _unguided_result(name, task)
            else:
                target = tokenizer_of(model) if needs == "tokenizer" else model
                task_dir = out_dir / name
                task_dir.mkdir(parents=True, exist_ok=True)
                # a task that trains a head (fair protocol) turns gradients on itself
                with torch.no_grad():
                    result = task.run(target, data, task_dir)
                if not isinstance(result, TaskResult):
                    raise TypeError(f"task {name!r} returned {type(result).__name__}; tasks return "
                                    "lgvq_plugins.evaluation.task.TaskResult")
            results[name] = result
            if write_json and D.is_main_process():
                (out_dir / name).mkdir(parents=True, exist_ok=True)
                (out_dir / name / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    finally:
        model.train(was_training)
    return results


def flat_metrics(results: dict[str, TaskResult]) -> dict[str, float | None]:
    """``{"<task>/<metric>": value}`` over all results (for ``metrics.json``)."""
    return {f"{task}/{k}": v for task, r in results.items() for k, v in r.metrics.items()}


__all__ = [
    "Task",
    "TaskResult",
    "batches",
    "flat_metrics",
    "gather_rows",
    "is_guided",
    "model_device",
    "run_tasks",
    "shard",
    "tokenizer_of",
]
