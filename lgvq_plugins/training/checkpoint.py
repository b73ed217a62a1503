"""Training checkpoints: safetensors for tensors, JSON for everything else, crash-safe.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding

* ``model.safetensors`` — the generator side's ``state_dict`` (tokenizer + guidance heads),
* ``discriminator.safetensors`` — the discriminator's parameters (absent when there is none),
* ``optimizer.safetensors`` — every tensor of every optimizer's state, flattened by name,
* ``state.json`` — step, epoch, position in the epoch, scheduler states, optimizer
  hyper-parameters, RNG states (python / numpy / torch / module generators, per rank), the
  config hash, and ``files``: the size of every file of the checkpoint.

Nothing is ever unpickled when loading: only safetensors and JSON are read.

Save protocol (docs/checkpoints.md explains why a kill after any step is safe):

1. sweep leftover ``.tmp-*`` entries of interrupted saves;
2. write every file into a fresh ``.tmp-step_N.<id>/`` folder, fsync'ed, ``state.json`` last;
3. put the folder in place: a rename when ``step_N`` is new; when the same step is saved
   again, an atomic exchange of the two folders (the old one then carries the temporary
   name and is deleted) — the new folder is in place before the old one is removed;
4. point ``latest`` at it (atomic replace of a one-line file);
5. prune: each old checkpoint is renamed to a temporary name, then deleted.

A folder named ``step_*`` is therefore always complete; :func:`latest_checkpoint` still
checks, and falls back to the newest complete checkpoint (with a warning) when ``latest``
is missing or names something that is not one.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from lgvq_plugins.training import atomic_io
from lgvq_plugins.training.atomic_io import (TMP_PREFIX, load_tensors, save_tensors, write_json_atomic,
                                             write_text_atomic)
from lgvq_plugins.training.rng_state import (get_rng_state, module_generator_states,  # noqa: F401 (re-exported)
                                             restore_module_generators, set_rng_state)

LATEST = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
DISC_FILE = "discriminator.safetensors"
OPTIM_FILE = "optimizer.safetensors"
_TMP_PREFIX = TMP_PREFIX
FORMAT_VERSION = 2
#: ``step_XXXXXXXX`` or, after a same-step save on a platform without atomic exchange,
#: ``step_XXXXXXXX.<id>``
_NAME = re.compile(r"^step_(\d+)(?:\.[0-9a-f]+)?$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------
# Optimizer state ↔ (tensors, JSON)
# ---------------------------------------------------------------------------------------


def flatten_optimizer_state(state: Mapping[str, Any], prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and JSON-ready rest.

    Tensor entries become ``{prefix}.state.{param_index}.{name}``; non-tensor per-parameter
    values and the param groups go to the JSON side.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = to_jsonable(value)
    meta = {"param_groups": to_jsonable(state["param_groups"]), "scalars": scalars,
            "tensor_keys": sorted(tensors)}
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str,
                              template: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild an ``optimizer.state_dict()`` from :func:`flatten_optimizer_state`'s output.

    ``template`` (the live optimizer's ``state_dict()``) supplies Python types that JSON loses
    (tuples such as Adam's ``betas``).
    """
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for key in meta["tensor_keys"]:
        if key not in tensors:
            raise CheckpointError(f"optimizer tensor {key!r} is missing from {OPTIM_FILE}")
        index, name = key[len(head):].split(".", 1)
        state.setdefault(int(index), {})[name] = tensors[key]
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    live_groups = template["param_groups"]
    if len(live_groups) != len(meta["param_groups"]):
        raise CheckpointError(f"{prefix} optimizer has {len(live_groups)} parameter groups but the "
                              f"checkpoint has {len(meta['param_groups'])}: the model changed")
    for saved, live in zip(meta["param_groups"], live_groups):
        group = dict(saved)
        for k, v in group.items():
            if isinstance(live.get(k), tuple) and isinstance(v, list):
                group[k] = tuple(v)
        groups.append(group)
    return {"state": state, "param_groups": groups}


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from nested tuples/lists/mappings, tensors and numpy scalars
    (tuples become lists, keys strings); anything else is returned unchanged."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


@dataclass
class Checkpoint:
    """What one checkpoint holds, in memory.

    Attributes:
        model: generator-side state dict (tokenizer and guidance heads, no discriminator).
        discriminator: discriminator parameters by their name in the model.
        optimizers: optimizer name → ``state_dict()``.
        state: everything JSON: ``step``, ``epoch``, ``batch_in_epoch``, ``schedulers``,
            ``rng`` (one entry per rank), ``config_hash``, ``config`` ...
        path: the folder it was read from.
    """

    model: dict[str, Tensor]
    discriminator: dict[str, Tensor] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


# ---------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(directory: str | os.PathLike[str], ckpt: Checkpoint, *, keep_last: int | None = 3) -> Path:
    """Write ``ckpt`` as ``directory/step_XXXXXXXX``, point ``latest`` at it, then prune all
    but the newest ``keep_last`` checkpoints (``None`` keeps everything).

    A process killed at any moment leaves ``latest`` naming a complete checkpoint, or (in
    the instant between placing a new folder and moving the pointer) leaves a complete
    newer one that :func:`latest_checkpoint` finds. Saving a step that exists already
    replaces it without a moment where neither copy is in place. Returns the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(directory)
    name = checkpoint_name(ckpt.step)
    tmp = directory / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
    atomic_io.make_dir(tmp)
    try:
        _write_files(tmp, ckpt)
    except BaseException:  # an exception (not a kill): tidy up now rather than at the next save
        atomic_io.remove_tree(tmp)
        raise
    final = _put_in_place(tmp, directory / name)
    # The pointer moves only once the folder is complete and in place.
    write_text_atomic(directory / LATEST, final.name + "\n")
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return final


def _write_files(folder: Path, ckpt: Checkpoint) -> None:
    """Every file of a checkpoint into ``folder``; ``state.json`` (which lists the others
    with their sizes) last."""
    save_tensors(ckpt.model, folder / MODEL_FILE)
    if ckpt.discriminator:
        save_tensors(ckpt.discriminator, folder / DISC_FILE)
    optim_tensors: dict[str, Tensor] = {}
    optim_meta: dict[str, Any] = {}
    for opt_name, opt_state in ckpt.optimizers.items():
        tensors, meta = flatten_optimizer_state(opt_state, opt_name)
        optim_tensors.update(tensors)
        optim_meta[opt_name] = meta
    save_tensors(optim_tensors, folder / OPTIM_FILE)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    state = {**ckpt.state, "optimizers": optim_meta, "format_version": FORMAT_VERSION, "files": sizes}
    write_json_atomic(folder / STATE_FILE, to_jsonable(state))


def _put_in_place(tmp: Path, final: Path) -> Path:
    """Move the complete folder ``tmp`` to ``final``; returns where it ended up."""
    if not final.exists():
        atomic_io.rename(tmp, final)
        return final
    # The same step again (e.g. the final save of a resumed, finished run). Swap the two
    # folders in one atomic step, then delete the old copy, which now has the temporary name.
    if atomic_io.exchange(tmp, final):
        atomic_io.remove_tree(tmp)
        return final
    # No atomic exchange here: keep the new copy under a second name for the same step, let
    # the caller point `latest` at it, and retire the old copy (renamed aside, then deleted).
    alt = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}")
    atomic_io.rename(tmp, alt)
    write_text_atomic(final.parent / LATEST, alt.name + "\n")
    _retire(final)
    return alt


def _retire(path: Path) -> None:
    """Delete a checkpoint folder without ever exposing a half-deleted one: rename it to a
    temporary name first (atomic), then delete (a kill mid-way leaves a temporary, swept later)."""
    aside = path.with_name(f"{TMP_PREFIX}old-{path.name}.{uuid.uuid4().hex[:8]}")
    atomic_io.rename(path, aside)
    atomic_io.remove_tree(aside)


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def check_complete(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``state.json`` of the checkpoint folder ``path``, after checking that every
    file it lists is there with the size it had when saved; raises :class:`CheckpointError`
    naming what is missing or truncated."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {state_file}: {exc}") from exc
    files = state.get("files")
    if not isinstance(files, (dict, list)) or MODEL_FILE not in files:
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} lists no files")
    expected = files if isinstance(files, dict) else {f: None for f in files}  # format 1: names only
    for fname, size in expected.items():
        if fname == STATE_FILE:
            continue
        target = path / fname
        if not target.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
        if size is not None and target.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {fname} has {target.stat().st_size} "
                                  f"bytes, {size} were saved")
    return state


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`check_complete` accepts ``path``."""
    try:
        check_complete(path)
    except CheckpointError:
        return False
    return True


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: (_step_of(p), p.stat().st_mtime_ns, p.name))


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest`` names."""
    keep_last = max(int(keep_last), 1)
    directory = Path(directory)
    latest = latest_checkpoint(directory)
    removed = []
    for path in list_checkpoints(directory)[:-keep_last]:
        if latest is not None and path.name == latest.name:
            continue
        _retire(path)
        removed.append(path)
    return removed


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint ``latest`` names in ``directory``; None when there is none.

    When ``latest`` is missing or names something that is not a complete checkpoint (a
    damaged or hand-edited folder), the newest complete checkpoint is returned instead and
    a warning says so.
    """
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        try:
            check_complete(directory / name)
            return directory / name
        except CheckpointError as exc:
            problem = f"{pointer} names {name!r}, which is not a complete checkpoint ({exc})"
    else:
        problem = f"{pointer} is missing"
    found = list_checkpoints(directory)
    if not found:
        if pointer.is_file():
            warnings.warn(f"{problem}, and {directory} holds no other complete checkpoint", stacklevel=2)
        return None
    warnings.warn(f"{problem}; using the newest complete checkpoint, {found[-1].name}", stacklevel=2)
    return found[-1]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """``path`` itself when it is a checkpoint folder, else the latest checkpoint in it
    (None when it holds none)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    return latest_checkpoint(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder, or the latest one when ``path`` is a checkpoints directory.

    The folder must be complete (every listed file present, at its saved size). Only
    safetensors and JSON are read.
    """
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no {STATE_FILE}, no {LATEST})")
    path = resolved
    state = check_complete(path)
    model = load_tensors(path / MODEL_FILE)
    disc = load_tensors(path / DISC_FILE) if (path / DISC_FILE).is_file() else {}
    optim_tensors = load_tensors(path / OPTIM_FILE) if (path / OPTIM_FILE).is_file() else {}
    optim_meta = state.pop("optimizers", {})
    optimizers = {name: {"tensors": {k: v for k, v in optim_tensors.items() if k.startswith(name + ".")},
                         "meta": meta} for name, meta in optim_meta.items()}
    return Checkpoint(model=model, discriminator=disc, optimizers=optimizers, state=state, path=path)


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint, name: str) -> None:
    """Load the flattened state saved under ``name`` into ``optimizer``."""
    if name not in ckpt.optimizers:
        raise CheckpointError(f"checkpoint {ckpt.path} has no state for optimizer {name!r} "
                              f"(it has {sorted(ckpt.optimizers)})")
    saved = ckpt.optimizers[name]
    optimizer.load_state_dict(unflatten_optimizer_state(saved["tensors"], saved["meta"], name,
                                                        optimizer.state_dict()))


def sweep_temporaries(directory: str | os.PathLike[str]) -> None:
    """Remove leftovers of interrupted saves (``.tmp-*``: never named by ``latest``)."""
    for p in Path(directory).iterdir():
        if p.name.startswith(TMP_PREFIX):
            atomic_io.remove_tree(p)


_sweep_temporaries = sweep_temporaries  # the old private name


def split_state_dict(state: Mapping[str, Tensor], names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (everything else, the entries named in ``names``)."""
    names = set(names)
    rest = {k: v for k, v in state.items() if k not in names}
    picked = {k: v for k, v in state.items() if k in names}
    return rest, picked
