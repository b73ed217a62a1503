"""One experiment: data, tokenizer, language guidance and trainer built from gin; trained,
evaluated and written to ``<root>/<name>/``.

    runs/<name>/
      config.gin              the gin files and bindings as given (written at the start)
      operative_config.gin    every value actually used (written once the model is built)
      checkpoints/            safetensors + JSON state; ``latest`` names the newest
      logs/                   metrics.jsonl and TensorBoard events
      samples/                step_XXXXXX.png — originals above reconstructions
      pretrained/             save_pretrained() of the trained model (reload: from_pretrained)
      metrics.json            validation PSNR, codebook usage, perplexity, rec loss, timing

:func:`lgvq_plugins.run.main` drives it; in code::

    exp = Experiment(name="try", backbone="vqgan")
    exp.build()
    metrics = exp.run()
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import gin
import torch
from torch import nn

from lgvq_plugins import api

from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.checkpoint import write_json_atomic, write_text_atomic
from lgvq_plugins.training.distributed import seed_everything, setup_distributed
from lgvq_plugins.training.run_dir import RunDirectoryError, discard_failed_run, prepare_run_dir
from lgvq_plugins.training.trainer import Trainer

#: gin settings that change how long or how verbosely a run goes, not what it learns: they
#: may differ when a run is resumed (e.g. a larger ``Trainer.max_steps`` to train longer).
RUN_ONLY_SETTINGS: tuple[str, ...] = (
    "Experiment.name", "Experiment.root", "Experiment.overwrite", "Experiment.eval_batches",
    "Trainer.max_steps", "Trainer.log_every", "Trainer.val_every", "Trainer.val_batches",
    "Trainer.ckpt_every", "Trainer.keep_last", "Trainer.progress", "Trainer.tensorboard",
    "Trainer.num_workers", "Trainer.num_samples", "Trainer.device", "Trainer.dump_codebooks",
    "LanguageGuided.cache_dir", "Experiment.tasks", "Experiment.task_split", "Experiment.report",
    # the text cache's memory bound changes speed, never a number
    "TextFeatureCache.max_memory_mb", "TextFeatureCache.max_memory_rows", "TextFeatureCache.flush_every",
)

#: settings that do not change a run's numbers: two runs whose parsed gin configs differ only
#: in these are the same experiment (``lgvq compare`` reuses a finished run on that basis;
#: unlike RUN_ONLY_SETTINGS the training length counts).
RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = (
    "Experiment.name", "Experiment.root", "Experiment.overwrite", "Experiment.tasks",
    "Experiment.task_split", "Experiment.report", "Trainer.log_every", "Trainer.ckpt_every",
    "Trainer.keep_last", "Trainer.progress", "Trainer.tensorboard", "Trainer.num_workers",
    "Trainer.device", "LanguageGuided.cache_dir",
    # the text cache's memory bound changes speed, never a number
    "TextFeatureCache.max_memory_mb", "TextFeatureCache.max_memory_rows", "TextFeatureCache.flush_every",
)


# ---------------------------------------------------------------------------------------
# Configuration identity
# ---------------------------------------------------------------------------------------


def _bindings(config_str: str) -> list[str]:
    """The bindings of a gin config string, one string each (continuation lines joined)."""
    out: list[str] = []
    for line in config_str.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[:1].isspace() and out:
            out[-1] = f"{out[-1]} {stripped}"
        else:
            out.append(stripped)
    return [re.sub(r"\s*\\\s*", " ", b).strip() for b in out]


def config_identity(config_str: str, run_only: Iterable[str] = RUN_ONLY_SETTINGS) -> tuple[str, list[str]]:
    """(hash, lines) of an operative config with the run-only settings removed.

    A setting matches with or without a gin scope or module prefix (``train/Trainer.max_steps``,
    ``lgvq_plugins.training.trainer.Trainer.max_steps``). Macros used only by removed settings are
    removed too, so ``MAX_STEPS = 500`` bound to ``Trainer.max_steps`` does not count.
    """
    run_only = tuple(run_only)
    kept: list[str] = []
    macros: dict[str, str] = {}
    for binding in _bindings(config_str):
        key, _, value = binding.partition("=")
        key = key.strip()
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            macros[key] = binding
            continue
        bare = key.split("/")[-1]
        if any(bare == s or bare.endswith("." + s) for s in run_only):
            continue
        kept.append(f"{key} = {value.strip()}")
    referenced = {m for line in kept for m in re.findall(r"%([A-Za-z_][A-Za-z0-9_./]*)", line)}
    kept += [line for name, line in macros.items() if name in referenced]
    kept = sorted(kept)
    digest = hashlib.sha256("\n".join(kept).encode("utf-8")).hexdigest()
    return digest, kept


def _gin_files_with_includes(files: Sequence[Path]) -> list[Path]:
    """``files`` and (recursively) the files they ``include``, resolved as gin does."""
    from lgvq_plugins.config import bundled_gin_dir

    seen: list[Path] = []
    todo = list(files)
    while todo:
        path = todo.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        for m in re.finditer(r"^\s*include\s+['\"]([^'\"]+)['\"]", path.read_text(encoding="utf-8"), re.M):
            for base in (path.parent, bundled_gin_dir()):
                if (base / m.group(1)).is_file():
                    todo.append(base / m.group(1))
                    break
    return seen


def _note_locations(exc: BaseException, files: Sequence[Path]) -> None:
    """Add "set at FILE:LINE" notes for the settings or names an error message mentions, so
    a bad value bound in a gin file points at its line (gin itself reports only parse errors
    with a location)."""
    if not files:
        return
    message = str(exc)
    needles = set(re.findall(r"\b([A-Za-z_]\w*\.[a-z_]\w*)\b", message))
    needles |= {f"'{n}'" for n in re.findall(r"unknown \w+ '([^']+)'", message)}
    needles |= {f'"{n}"' for n in re.findall(r"unknown \w+ '([^']+)'", message)}
    hits = []
    for path in _gin_files_with_includes(files):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if any(n in code for n in needles) and "=" in code:
                hits.append(f"  set at {path}:{number}: {line.strip()}")
    if hits:
        exc.add_note("gin bindings involved:\n" + "\n".join(hits[:10]))


# ---------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------


@gin.configurable(denylist=["resume"])
class Experiment:
    """Builds and runs one first-stage experiment.

    Args:
        name: run name; the run directory is ``root/name``.
        root: folder of run directories.
        backbone: registered tokenizer name (``lgvq_plugins.list_backbones()``).
        dataset: registered data set name; built as ``create_dataset(dataset, split=...)``
            (set its size etc. with gin under its name, e.g. ``shapes.size = 64``).
        train_split / val_split: split names for training and evaluation.
        guidance: factory wrapping the tokenizer (default: ``LanguageGuided``, configured in
            gin; ``LanguageGuided.enabled = False`` trains the plain tokenizer).
        seed: seeds python / numpy / torch before anything is built.
        eval_batches: batches of the validation split for the final evaluation (None: all).
        resume: continue from ``checkpoints/latest``; refuses if the configuration differs.
        overwrite: start afresh in a run directory that already holds a run (checkpoints, or
            only the logs of a run stopped before its first checkpoint), deleting its contents;
            without it, that is an error. A fresh run that fails to build removes its folder.
        run_only: settings that may change between a run and its resumption.
        tasks: registered evaluation tasks run after training on ``task_split`` (default: the
            validation split); their numbers go into ``metrics.json`` under ``"tasks"``.
        report: write ``report.html`` into the run directory at the end.
    """

    def __init__(self, name: str = "default", root: str = "runs", backbone: str = gin.REQUIRED,
                 dataset: str = "shapes", train_split: str = "train", val_split: str = "val",
                 guidance: Callable[..., nn.Module] | None = None, seed: int = 0,
                 eval_batches: int | None = None, resume: bool = False, overwrite: bool = False,
                 run_only: Sequence[str] = RUN_ONLY_SETTINGS, tasks: Sequence[str] = (),
                 task_split: str | None = None, report: bool = True):
        # Every registry name is checked before anything is written or trained.
        api.registry("backbone").entry(backbone)
        api.registry("dataset").entry(dataset)
        self.name, self.root = name, Path(root)
        self.run_dir = self.root / name
        self.backbone, self.dataset = backbone, dataset
        self.train_split, self.val_split = train_split, val_split
        self.guidance_factory = guidance
        self.seed = int(seed)
        self.eval_batches = eval_batches
        self.resume = resume
        self.run_only = tuple(run_only)
        self.tasks, self.task_split, self.report = list(tasks), task_split or val_split, bool(report)
        self.distributed = setup_distributed()
        self.is_main_process = D.is_main_process()
        self.model: nn.Module | None = None
        self.trainer: Trainer | None = None
        self._config_files: list[Path] = []
        self._start = time.time()

        # A folder holding anything of a previous run (checkpoints, or only logs) is refused
        # unless resumed or overwritten; True when a failed build may remove the folder.
        self._fresh_run_dir = prepare_run_dir(self.run_dir, self.root, resume=resume, overwrite=overwrite,
                                              main_process=self.is_main_process, barrier=self._barrier)

    # -- files --------------------------------------------------------------------------
    def _barrier(self) -> None:
        if D.is_distributed():
            torch.distributed.barrier()

    def write_config(self, files: Sequence[str | Path], bindings: Sequence[str]) -> Path | None:
        """Write the gin files and bindings as given (one file, includes left as written).

        A resumed run keeps the original ``config.gin`` and records its own as
        ``config.resume.gin``.
        """
        self._config_files = [Path(f) for f in files]
        if not self.is_main_process:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        parts = [f"# lgvq_plugins.run configuration ({time.strftime('%Y-%m-%d %H:%M:%S')})"]
        for f in files:
            parts.append(f"\n# ---- {f} ----\n{Path(f).read_text(encoding='utf-8').rstrip()}")
        if bindings:
            parts.append("\n# ---- --gin_bindings ----\n" + "\n".join(bindings))
        target = self.run_dir / ("config.resume.gin" if self.resume else "config.gin")
        write_text_atomic(target, "\n".join(parts) + "\n")
        return target

    def write_operative_config(self, text: str) -> Path | None:
        """Write gin's operative config (every value used) next to the checkpoints."""
        if not self.is_main_process:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        target = self.run_dir / "operative_config.gin"
        write_text_atomic(target, text)
        return target

    # -- building -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The tokenizer wrapped in guidance (gin supplies every setting)."""
        tokenizer = api.create_backbone(self.backbone)
        factory = self.guidance_factory
        if factory is None:
            from lgvq_plugins.guidance.model import LanguageGuided

            factory = LanguageGuided
        model = factory(tokenizer)
        from lgvq_plugins.pretrained import record_constructor_args

        record_constructor_args(model, factory)
        return model

    def build(self) -> "Experiment":
        """Build data, tokenizer, guidance and trainer; on resume, restore the checkpoint
        (after checking that the configuration matches). Nothing is trained yet."""
        try:
            seed_everything(self.seed)
            train = api.create_dataset(self.dataset, split=self.train_split)
            val = api.create_dataset(self.dataset, split=self.val_split)
            self.model = self.build_model()
            self.trainer = Trainer(self.model, train, val, out_dir=self.run_dir)
        except Exception as exc:
            _note_locations(exc, self._config_files)
            discard_failed_run(self.run_dir, fresh=self._fresh_run_dir, main_process=self.is_main_process)
            raise
        # Identity of everything built, the trainer's settings included.
        self.trainer.config_hash, self.trainer.config_lines = config_identity(
            gin.operative_config_str(), self.run_only)
        if self.resume:
            self.trainer.resume()
        return self

    # -- running ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``Trainer.max_steps``, evaluate on the validation split, save the
        pretrained model and ``metrics.json``; returns the metrics."""
        if self.trainer is None:
            self.build()
        trainer = self.trainer
        assert trainer is not None and self.model is not None
        try:
            summary = trainer.fit()
            evaluation = trainer.evaluate(max_batches=self.eval_batches)
            codebooks = trainer.codebook_report()
        finally:
            trainer.close()
        metrics: dict[str, Any] = {
            "name": self.name, "backbone": self.backbone, "dataset": self.dataset,
            "guidance": bool(getattr(self.model, "enabled", False)),
            "world_size": D.world_size(), "global_batch_size": trainer.global_batch_size,
            **{f"val_{k}": v for k, v in evaluation.items()}, **summary, **codebooks,
            "val_protocol": {"split": self.val_split, "batches": self.eval_batches,
                             "batch_size_per_rank": trainer.batch_size},
            "config_hash": trainer.config_hash,
            "gin_config_hash": config_identity(gin.config_str(), RESULT_NEUTRAL_SETTINGS)[0],
        }
        # Bad files skipped and images converted to RGB by the real-data readers (data/captioned.py).
        reports = {split: data.data_report() for split, data in (("train", trainer.train_data),
                   ("val", trainer.val_data)) if hasattr(data, "data_report")}
        if reports:
            metrics["data"] = reports
        metrics["wall_time_s"] = time.time() - self._start
        if self.is_main_process:  # saved before the tasks: a failing task leaves a usable run
            from lgvq_plugins.pretrained import save_pretrained

            save_pretrained(self.model, self.run_dir / "pretrained")
            write_json_atomic(self.run_dir / "metrics.json", metrics)
        task_data = api.create_dataset(self.dataset, split=self.task_split) if self.tasks or self.report else None
        if self.tasks:  # every rank runs the tasks (each takes its rank::world shard)
            from lgvq_plugins.evaluation.task import run_tasks

            results = run_tasks(self.model, task_data, self.tasks, self.run_dir / "eval")
            metrics["tasks"] = {name: r.to_json() for name, r in results.items()}
            metrics["wall_time_s"] = time.time() - self._start
        if self.is_main_process:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            if self.report:
                from lgvq_plugins.evaluation.report import write_run_report

                write_run_report(self.run_dir, model=self.model, data=task_data, metrics=metrics)
        self._barrier()
        return metrics


__all__ = ["Experiment", "RUN_ONLY_SETTINGS", "RESULT_NEUTRAL_SETTINGS", "config_identity", "RunDirectoryError"]
