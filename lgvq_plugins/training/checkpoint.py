"""Training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding

* ``model.safetensors`` — the generator side's ``state_dict`` (tokenizer + guidance heads),
* ``discriminator.safetensors`` — the discriminator's parameters (absent when there is none),
* ``optimizer.safetensors`` — every tensor of every optimizer's state, flattened by name,
* ``state.json`` — step, epoch, position in the epoch, scheduler states, optimizer
  hyper-parameters, RNG states of python / numpy / torch (as plain lists) and the config hash.

Nothing is ever unpickled when loading: only safetensors and JSON are read.

Writes go to a hidden temporary folder next to the final one; every file and the folder are
fsync'ed before ``os.replace`` moves the folder into place, and the ``latest`` pointer is
replaced last. A process killed at any moment therefore leaves ``latest`` naming a complete
checkpoint (the half-written temporary folder is swept away by the next save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

LATEST = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
DISC_FILE = "discriminator.safetensors"
OPTIM_FILE = "optimizer.safetensors"
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------
# Low-level atomic file helpers
# ---------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk (folders matter: a rename lives in its parent)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open folders; nothing more we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a fsync'ed temporary file and ``os.replace``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Save a flat name → tensor mapping as safetensors and fsync it.

    Tensors are moved to CPU and made independent (safetensors refuses tensors that share
    storage, e.g. tied weights; loading copies them back into every tied parameter).
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path))
    _fsync_path(Path(path))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a safetensors file (CPU tensors)."""
    return load_file(str(path), device="cpu")


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


# ---------------------------------------------------------------------------------------
# RNG states as JSON
# ---------------------------------------------------------------------------------------


def _encode_key(key: Any) -> Any:
    """A dict key of a generator table as JSON (tuples, strings, ints, torch devices)."""
    if isinstance(key, torch.device):
        return {"device": str(key)}
    if isinstance(key, tuple):
        return {"tuple": [_encode_key(k) for k in key]}
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"unsupported generator key {key!r}")


def _decode_key(key: Any) -> Any:
    if isinstance(key, dict) and "device" in key:
        return torch.device(key["device"])
    if isinstance(key, dict) and "tuple" in key:
        return tuple(_decode_key(k) for k in key["tuple"])
    return key


def module_generator_states(model: torch.nn.Module) -> dict[str, Any]:
    """States of private ``torch.Generator`` objects held by ``model``'s modules — directly
    as attributes or in a dict attribute (e.g. a quantizer's per-device anchor streams).
    They are not in ``state_dict()``, yet an exact resume needs them."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                out[f"{path}:{attr}"] = {"device": str(value.device), "state": value.get_state().tolist()}
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Generator) for v in value.values()):
                try:
                    entries = [{"key": _encode_key(k), "device": str(g.device), "state": g.get_state().tolist()}
                               for k, g in value.items()]
                except TypeError:
                    continue
                out[f"{path}:{attr}"] = {"table": entries}
    return out


def restore_module_generators(model: torch.nn.Module, states: Mapping[str, Any]) -> None:
    """Inverse of :func:`module_generator_states` (tables are refilled, generators created)."""
    modules = dict(model.named_modules())
    for name, saved in states.items():
        path, attr = name.rsplit(":", 1)
        module = modules.get(path)
        if module is None:
            continue
        if "table" in saved:
            table = getattr(module, attr, None)
            if not isinstance(table, dict):
                continue
            for entry in saved["table"]:
                gen = torch.Generator(device=entry["device"])
                gen.set_state(torch.tensor(entry["state"], dtype=torch.uint8))
                table[_decode_key(entry["key"])] = gen
        else:
            gen = getattr(module, attr, None)
            if isinstance(gen, torch.Generator):
                gen.set_state(torch.tensor(saved["state"], dtype=torch.uint8))


def get_rng_state(model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as JSON lists, plus the
    private generators of ``model``'s modules when given."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if model is not None:
        state["modules"] = module_generator_states(model)
    return state


def set_rng_state(state: Mapping[str, Any], model: torch.nn.Module | None = None) -> None:
    """Inverse of :func:`get_rng_state`."""
    if model is not None and state.get("modules"):
        restore_module_generators(model, state["modules"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------


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


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(directory: str | os.PathLike[str], ckpt: Checkpoint, *, keep_last: int | None = 3) -> Path:
    """Write ``ckpt`` as ``directory/step_XXXXXXXX`` atomically, point ``latest`` at it, then
    prune all but the newest ``keep_last`` checkpoints (``None`` keeps everything).

    Returns the checkpoint folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(directory)
    name = checkpoint_name(ckpt.step)
    final = directory / name
    tmp = directory / f"{_TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_tensors(ckpt.model, tmp / MODEL_FILE)
        if ckpt.discriminator:
            save_tensors(ckpt.discriminator, tmp / DISC_FILE)
        optim_tensors: dict[str, Tensor] = {}
        optim_meta: dict[str, Any] = {}
        for opt_name, opt_state in ckpt.optimizers.items():
            tensors, meta = flatten_optimizer_state(opt_state, opt_name)
            optim_tensors.update(tensors)
            optim_meta[opt_name] = meta
        save_tensors(optim_tensors, tmp / OPTIM_FILE)
        state = {**ckpt.state, "optimizers": optim_meta, "format_version": FORMAT_VERSION,
                 "files": sorted(p.name for p in tmp.iterdir()) + [STATE_FILE]}
        write_json_atomic(tmp / STATE_FILE, to_jsonable(state))
        _fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            trash = directory / f"{_TMP_PREFIX}old-{name}.{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The pointer moves only once the folder is complete and in place.
    write_text_atomic(directory / LATEST, name + "\n")
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return final


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``latest`` names."""
    keep_last = max(int(keep_last), 1)
    directory = Path(directory)
    latest = latest_checkpoint(directory)
    old = list_checkpoints(directory)[:-keep_last]
    removed = []
    for path in old:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The folder ``latest`` points to, or None when there is no checkpoint yet."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = directory / name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, but {path} is not a complete checkpoint")
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder, or the one ``latest`` names when ``path`` is a checkpoints
    directory. Only safetensors and JSON are read."""
    path = Path(path)
    if (path / LATEST).is_file():
        resolved = latest_checkpoint(path)
        assert resolved is not None
        path = resolved
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    for name in state.get("files", []):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
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


def _sweep_temporaries(directory: Path) -> None:
    """Remove leftovers of writes that were interrupted (they were never pointed at)."""
    for p in directory.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def split_state_dict(state: Mapping[str, Tensor], names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a state dict into (everything else, the entries named in ``names``)."""
    names = set(names)
    rest = {k: v for k, v in state.items() if k not in names}
    picked = {k: v for k, v in state.items() if k in names}
    return rest, picked
