"""``lgvq compare``: train variants × seeds with the same data, evaluate them with the same
tasks, and write one table (mean ± std over seeds).

A gin file lists the variants (each a list of gin files and/or bindings), the seeds and the
tasks (see ``gin/compare/``)::

    Comparison.name = 'cvq_vs_lg'
    Comparison.variants = {'cvq': ['cvq.gin'], 'cvq_lg': ['cvq_lg.gin']}
    Comparison.seeds = [0, 1, 2]
    Comparison.tasks = ['reconstruction', 'code_word_alignment']
    Comparison.bindings = ['MAX_STEPS = 200']      # applied to every variant

    lgvq compare --gin gin/compare/cvq.gin

writes ``<root>/<name>/``::

    runs/<variant>_s<seed>/    each an ordinary run folder (metrics.json, report.html, ...)
    comparison.md / .csv       the table: one row per metric, one column per variant
    comparison.json            every run's numbers, the table, and which runs were reused
    report.html                the table, a bar chart of the headline metrics, the runs

A run whose ``metrics.json`` exists with the same parsed configuration (``gin_config_hash``:
every setting except names, folders and logging) is reused, not retrained; tasks it lacks
are evaluated from its ``pretrained/`` folder.

``Comparison.tokenizers_from = 'runs/shapes_compare'`` evaluates tokenizers another
comparison already trained instead of training any: run ``<variant>_s<seed>`` takes its model
from ``<tokenizers_from>/runs/<variant>_s<seed>/pretrained`` (which must be finished and have
seen the same data), and only the tasks run (e.g. the downstream tasks on base vs guided
tokenizers, ``gin/compare/shapes_downstream_compare.gin``). Nothing is written into that folder.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
from lgvq_plugins import api
from lgvq_plugins.config import parse_gin
from lgvq_plugins.evaluation import plots, task_views
from lgvq_plugins.evaluation import report as R
from lgvq_plugins.evaluation.evaluate import evaluate_pretrained
from lgvq_plugins.evaluation.task import run_tasks
from lgvq_plugins.training.checkpoint import write_json_atomic, write_text_atomic
from lgvq_plugins.training.experiment import (
    RESULT_NEUTRAL_SETTINGS,
    Experiment,
    config_identity,
)

#: metrics drawn as bars in the comparison report when present (the paper's claims).
HEADLINE = ("reconstruction/psnr", "reconstruction/usage", "reconstruction/fid",
            "code_word_alignment/code_word_mse", "masked_word_prediction/recall@1_k1", "val_psnr",
            "val_codebook_usage", "text_to_image/fid", "text_to_image/caption_match", "unconditional/fid",
            "completion/fid", "semantic_synthesis/fid", "semantic_synthesis/miou", "text_to_image/caption_object_f1",
            "captioning/bleu_4", "captioning/cider",
            "vqa/accuracy", "grounding/acc_0.5")


def _bound(name: str, default: Any) -> Any:
    """gin's value of ``name`` (e.g. ``Experiment.dataset``), or ``default`` when unbound."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def split_spec(spec: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """A variant's entries as (gin files, bindings): an entry with ``=`` is a binding."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    files = [e for e in entries if "=" not in e]
    return files, [e for e in entries if "=" in e]


def data_identity(config_str: str, dataset: str) -> list[str]:
    """The bindings of the data set's configurable (``shapes.*`` / ``lgvq.dataset.shapes.*``)
    with the macros they use — what must agree for two variants to see the same data."""
    _, lines = config_identity(config_str, ())
    macros = {line.split("=", 1)[0].strip(): line for line in lines if "." not in line.split("=", 1)[0]}
    picked = [line for line in lines if line.split("=", 1)[0].strip().rsplit(".", 1)[0].endswith(dataset)]
    used = {m for line in picked for m in macros if f"%{m}" in line}
    return sorted(picked + [macros[m] for m in used])


def summarise(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n) over the values that are numbers."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def cell(stats: tuple[float, float, int]) -> str:
    mean, std, n = stats
    if n == 0:
        return "n/a"
    return R.fmt(mean) if n == 1 else f"{R.fmt(mean)} ± {R.fmt(std)}"


def build_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """``runs[variant]`` = the metrics.json of each seed → ``{"metrics": [(key, protocol)],
    "cells": {key: {variant: (mean, std, n)}}, "notes": {key: why unavailable}}``."""
    order: list[tuple[str, str]] = []
    values: dict[str, dict[str, list[Any]]] = {}
    notes: dict[str, str] = {}
    for variant, seeds in runs.items():
        for metrics in seeds:
            for row in R.metric_rows(metrics):
                if row["key"] not in values:
                    order.append((row["key"], row["protocol"]))
                    values[row["key"]] = {}
                values[row["key"]].setdefault(variant, []).append(row["value"])
                if row["value"] is None and row["note"]:
                    notes.setdefault(row["key"], row["note"])
    cells = {key: {v: summarise(values[key].get(v, [])) for v in runs} for key, _ in order}
    return {"metrics": order, "cells": cells, "notes": notes}


def table_markdown(table: Mapping[str, Any], variants: Sequence[str], seeds: Sequence[int]) -> str:
    head = "| metric | " + " | ".join(variants) + " | protocol |"
    lines = [f"Mean ± sample std over seeds {list(seeds)} (n = runs with a number).", "", head,
             "|" + "---|" * (len(variants) + 2)]
    for key, proto in table["metrics"]:
        row = [cell(table["cells"][key][v]) for v in variants]
        note = f" ({table['notes'][key]})" if key in table["notes"] and all(c == "n/a" for c in row) else ""
        lines.append(f"| {key} | " + " | ".join(row) + f" | {proto}{note} |")
    return "\n".join(lines) + "\n"


def table_csv(table: Mapping[str, Any], variants: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "protocol"] + [f"{v}_{s}" for v in variants for s in ("mean", "std", "n")])
    for key, proto in table["metrics"]:
        row: list[Any] = [key, proto]
        for v in variants:
            mean, std, n = table["cells"][key][v]
            row += ["" if n == 0 else repr(mean), "" if n == 0 else repr(std), n]
        writer.writerow(row)
    return buf.getvalue()


@gin.configurable(denylist=["overrides"])
class Comparison:
    """Variants × seeds, trained and evaluated alike (see the module docstring).

    Args:
        name: the comparison folder ``root/name``.
        root: folder of comparison (and run) folders.
        variants: variant name → gin files and/or bindings (an entry containing ``=`` is a
            binding), applied after ``bindings``.
        seeds: ``Experiment.seed`` of each run; the same for every variant.
        tasks: evaluation tasks run after each training (``Experiment.tasks``).
        bindings: applied to every variant before its own entries (e.g. a shorter schedule).
        same_data: refuse variants whose data settings differ (the comparison would not
            compare tokenizers).
        retrain: train every run again even when a finished one matches.
        tokenizers_from: another comparison's folder (e.g. ``'runs/shapes_compare'``): train
            nothing, evaluate the tasks on its finished run ``<variant>_s<seed>`` instead
            (read only; it must have seen the same data as the variant).
    """

    def __init__(self, name: str = "comparison", root: str = "runs",
                 variants: Mapping[str, str | Sequence[str]] = gin.REQUIRED, seeds: Sequence[int] = (0, 1, 2),
                 tasks: Sequence[str] = ("reconstruction",), bindings: Sequence[str] = (),
                 same_data: bool = True, retrain: bool = False, tokenizers_from: str | None = None,
                 overrides: Sequence[str] = ()):
        if not variants:
            raise ValueError("Comparison.variants is empty: list e.g. {'cvq': ['cvq.gin'], 'cvq_lg': ['cvq_lg.gin']}")
        if not seeds:
            raise ValueError("Comparison.seeds is empty: give at least one seed, e.g. [0, 1, 2]")
        self.name, self.root = name, Path(root)
        self.out_dir = self.root / name
        self.variants = {str(k): split_spec(v) for k, v in variants.items()}
        self.seeds = [int(s) for s in seeds]
        self.tasks = list(tasks)
        self.bindings = list(bindings) + list(overrides)
        self.same_data, self.retrain = bool(same_data), bool(retrain)
        self.tokenizers_from = Path(tokenizers_from) if tokenizers_from else None
        if self.tokenizers_from is not None and self.tokenizers_from.resolve() == self.out_dir.resolve():
            raise ValueError(f"Comparison.tokenizers_from = {str(tokenizers_from)!r} is this comparison's own folder; "
                             "give the comparison another Comparison.name (its runs are only read)")
        self.eval_data: tuple[str, str] | None = None  # (data set, split) the tasks ran on

    def tokenizer_run(self, variant: str, seed: int) -> Path:
        """The finished run of ``tokenizers_from`` whose model ``variant`` × ``seed`` evaluates."""
        assert self.tokenizers_from is not None
        name = f"{variant}_s{seed}"
        tried = [self.tokenizers_from / "runs" / name, self.tokenizers_from / name]
        for run in tried:
            if (run / "metrics.json").is_file() and (run / "pretrained" / "config.json").is_file():
                return run
        raise FileNotFoundError(
            f"comparison {self.name!r}: no finished tokenizer run for {variant!r} seed {seed} under "
            f"Comparison.tokenizers_from = '{self.tokenizers_from}' (tried {', '.join(map(str, tried))}: each needs "
            "metrics.json and pretrained/config.json). Wait for that run to finish, or drop the seed/variant")

    def run_bindings(self, variant: str, seed: int) -> tuple[list[str], list[str]]:
        files, own = self.variants[variant]
        return files, [*self.bindings, *own, f"Experiment.seed = {seed}",
                       f"Experiment.name = '{variant}_s{seed}'", f"Experiment.root = '{self.out_dir / 'runs'}'",
                       f"Experiment.tasks = {self.tasks!r}", "Experiment.overwrite = True"]

    def _one(self, variant: str, seed: int, data_seen: dict[str, list[str]],
             check_only: bool = False) -> tuple[dict[str, Any], str]:
        """Train (or reuse) one run; returns its metrics and 'trained' / 'reused' / 'reused+eval'.
        ``check_only``: parse its configuration and check the data only."""
        files, bindings = self.run_bindings(variant, seed)
        gin.clear_config()
        resolved = parse_gin(files, bindings)
        config = gin.config_str()
        digest = config_identity(config, RESULT_NEUTRAL_SETTINGS)[0]
        dataset = _bound("Experiment.dataset", "shapes")
        data = data_identity(config, dataset)
        if self.same_data and data_seen and data != next(iter(data_seen.values())):
            first = next(iter(data_seen))
            raise ValueError(f"comparison {self.name!r}: variant {variant!r} sees other data than {first!r} "
                             f"({data} vs {data_seen[first]}); bind the data settings in Comparison.bindings, "
                             "or set Comparison.same_data = False to compare anyway")
        data_seen.setdefault(variant, data)
        split = _bound("Experiment.task_split", None) or _bound("Experiment.val_split", "val")
        self.eval_data = (dataset, split)
        if self.tokenizers_from is not None:
            source = self.tokenizer_run(variant, seed)
            self._check_source(variant, source, files, bindings, data, dataset)
            if check_only:
                return {}, "checked"
            return self._evaluate_source(variant, seed, source, digest, dataset, split)
        if check_only:
            return {}, "checked"
        run_dir = self.out_dir / "runs" / f"{variant}_s{seed}"
        old = R.read_metrics(run_dir)
        if old and old.get("gin_config_hash") == digest and not self.retrain:
            missing = [t for t in self.tasks if t not in (old.get("tasks") or {})]
            if not missing:
                return old, "reused"
            extra = evaluate_pretrained(run_dir / "pretrained", run_dir / "eval", tasks=missing,
                                        dataset=dataset, split=split, report=False)
            old["tasks"] = {**(old.get("tasks") or {}), **extra["tasks"]}
            write_json_atomic(run_dir / "metrics.json", old)
            return old, "reused+eval"
        experiment = Experiment()
        experiment.write_config(resolved, bindings)
        experiment.build()
        experiment.write_operative_config(gin.operative_config_str())
        return experiment.run(), "trained"

    def _check_source(self, variant: str, source: Path, files: Sequence[str], bindings: Sequence[str],
                      data: list[str], dataset: str) -> None:
        """The tokenizer run must have seen this variant's data, with the variant's backbone and
        guidance setting (its ``config.gin`` is parsed, then the variant's configuration again)."""
        theirs = R.read_metrics(source) or {}
        ours = {"backbone": _bound("Experiment.backbone", None), "guidance": bool(_bound("LanguageGuided.enabled", True)),
                "dataset": dataset}
        gin.clear_config()
        parse_gin([source / "config.gin"])
        their_data = data_identity(gin.config_str(), _bound("Experiment.dataset", dataset))
        gin.clear_config()
        parse_gin(files, bindings)  # the variant's configuration again: the tasks run under it
        wrong = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) is not None and theirs.get(k) != v}
        if their_data != data and self.same_data:
            wrong["data"] = (data, their_data)
        if wrong:
            raise ValueError(f"comparison {self.name!r}: variant {variant!r} ({', '.join(files)}) does not match its "
                             f"tokenizer run {source}: " + "; ".join(f"{k}: variant {a!r} vs run {b!r}"
                                                                      for k, (a, b) in wrong.items())
                             + ". Give the variant the run's gin files, or point Comparison.tokenizers_from elsewhere")

    def _evaluate_source(self, variant: str, seed: int, source: Path, digest: str, dataset: str,
                         split: str) -> tuple[dict[str, Any], str]:
        """Run the tasks on ``source``'s saved model into ``<out_dir>/runs/<variant>_s<seed>``
        (reused when the settings and the tokenizer are those of the folder's last evaluation)."""
        from lgvq_plugins.pretrained import from_pretrained

        theirs = R.read_metrics(source) or {}
        run_dir = self.out_dir / "runs" / f"{variant}_s{seed}"
        old = R.read_metrics(run_dir)
        same = bool(old) and not self.retrain and old.get("gin_config_hash") == digest \
            and old.get("tokenizer_config_hash") == theirs.get("gin_config_hash")
        done = dict(old.get("tasks") or {}) if same else {}
        missing = [t for t in self.tasks if t not in done]
        if not missing:
            return old, "reused"
        if not same and (run_dir / "eval").is_dir():
            shutil.rmtree(run_dir / "eval")  # other settings: no stale prior checkpoints resumed
        start = time.time()
        model = from_pretrained(source / "pretrained")
        data = api.create_dataset(dataset, split=split)
        metrics = {"name": f"{variant}_s{seed}", "backbone": theirs.get("backbone"), "dataset": dataset,
                   "guidance": theirs.get("guidance"), "seed": seed, "tokenizer_run": str(source),
                   "tokenizer_config_hash": theirs.get("gin_config_hash"), "gin_config_hash": digest,
                   "tasks": done, "task_time_s": dict((old or {}).get("task_time_s") or {}) if same else {}}
        for task in missing:  # saved after each task: an interrupted evaluation keeps what finished
            t0 = time.time()
            metrics["tasks"] = {**metrics["tasks"], **{n: r.to_json() for n, r in
                                                       run_tasks(model, data, [task], run_dir / "eval").items()}}
            metrics["task_time_s"][task] = time.time() - t0
            write_json_atomic(run_dir / "metrics.json", metrics)
        metrics["eval_time_s"] = time.time() - start
        R.write_run_report(run_dir, model=model, data=data, metrics=metrics, twin=False,
                           log=source / "logs" / "metrics.jsonl",
                           title=f"lgvq evaluation: {variant}_s{seed} (tokenizer of {source})")
        return metrics, "reused+eval" if same else "evaluated"

    def run(self) -> dict[str, Any]:
        """Train/evaluate every variant × seed, then write the table and the report."""
        start = time.time()
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in self.variants}
        status: dict[str, str] = {}
        data_seen: dict[str, list[str]] = {}
        for variant in self.variants:  # every configuration parses and sees the same data before any training
            self._one(variant, self.seeds[0], data_seen, check_only=True)
        for seed in self.seeds:  # seed-major: a cut-short comparison still has every variant
            for variant in self.variants:
                print(f"[compare] {self.name}: {variant} seed {seed}", flush=True)
                metrics, how = self._one(variant, seed, data_seen)
                runs[variant].append(metrics)
                status[f"{variant}_s{seed}"] = how
        table = build_table(runs)
        variants = list(self.variants)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out_dir / "comparison.md", table_markdown(table, variants, self.seeds))
        write_text_atomic(self.out_dir / "comparison.csv", table_csv(table, variants))
        summary = {"name": self.name, "variants": {v: {"files": f, "bindings": b} for v, (f, b) in self.variants.items()},
                   "seeds": self.seeds, "tasks": self.tasks, "bindings": self.bindings, "status": status,
                   "table": {k: {v: list(s) for v, s in c.items()} for k, c in table["cells"].items()},
                   "runs": runs, "wall_time_s": time.time() - start,
                   "tokenizers_from": str(self.tokenizers_from) if self.tokenizers_from else None}
        write_json_atomic(self.out_dir / "comparison.json", summary)
        first = {v: (runs[v][0], self.out_dir / "runs" / f"{v}_s{self.seeds[0]}") for v in variants if runs[v]}
        write_comparison_report(self.out_dir, table, variants, self.seeds, status, summary,
                                task_outputs=first, data=self._report_data())
        return summary

    def _report_data(self) -> Any:
        """The evaluated split (for the images of the task sections), built under the last
        variant's configuration — every variant sees the same data; None when it cannot be built."""
        if self.eval_data is None:
            return None
        try:
            return api.create_dataset(self.eval_data[0], split=self.eval_data[1])
        except Exception as exc:  # noqa: BLE001 - the report shows the outputs without images
            warnings.warn(f"comparison report: the evaluated data could not be built ({exc}); task outputs are "
                          "shown without images", RuntimeWarning, stacklevel=2)
            return None


def write_comparison_report(out_dir: Path, table: Mapping[str, Any], variants: Sequence[str],
                            seeds: Sequence[int], status: Mapping[str, str], summary: Mapping[str, Any], *,
                            task_outputs: Mapping[str, tuple[Mapping[str, Any], Path]] | None = None,
                            data: Any = None) -> Path:
    """``report.html`` of a comparison: its settings, the table, bars of the headline
    metrics, each downstream task's outputs side by side for the variants (``task_outputs``:
    variant → (metrics, run folder) of the first seed; ``data``: the evaluated split, for the
    images) and links to every run's own report."""
    settings = [[("key", html.escape(k)), ("proto", html.escape(str(v)))] for k, v in (
        ("variants", json.dumps(summary["variants"])), ("seeds", seeds), ("tasks", summary["tasks"]),
        ("bindings", summary["bindings"]), ("tokenizers from", summary.get("tokenizers_from") or "trained here"),
        ("wall time (s)", R.fmt(summary["wall_time_s"])))]
    rows = []
    for key, proto in table["metrics"]:
        rows.append([("key", html.escape(key))] + [("num", html.escape(cell(table["cells"][key][v]))) for v in variants]
                    + [("proto", html.escape(proto)), ("proto", html.escape(table["notes"].get(key, "")))])
    headline = [m for m in HEADLINE if m in table["cells"]
                and any(table["cells"][m][v][2] for v in variants)]
    bars = R.img_tag(plots.comparison_bars(table["cells"], headline), "headline metrics") if headline \
        else R.missing("none of the headline metrics was measured")
    links = [[("key", html.escape(run)), ("proto", html.escape(how)),
              ("proto", f'<a href="runs/{html.escape(run)}/report.html">runs/{html.escape(run)}/report.html</a>')]
             for run, how in status.items()]
    sections = [
        R.section("summary", "Comparison", R.table(["setting", "value"], settings)),
        R.section("comparison", "Table (mean ± std over seeds)",
                  R.table(["metric", *variants, "protocol", "note"], rows)),
        R.section("figures", "Headline metrics", bars),
        *task_views.task_sections({f"{v} (seed {seeds[0]})": src for v, src in (task_outputs or {}).items()},
                                  data, tasks=summary["tasks"]),
        R.section("runs", "Runs", R.table(["run", "trained, reused or evaluated", "report"], links)),
    ]
    out = out_dir / "report.html"
    out.write_text(R.page(f"lgvq comparison: {summary['name']}", sections), encoding="utf-8")
    return out


__all__ = ["Comparison", "build_table", "data_identity", "split_spec", "summarise", "table_csv",
           "table_markdown", "write_comparison_report"]
