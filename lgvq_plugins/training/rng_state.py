"""RNG states as JSON: python, numpy, torch (CPU and CUDA) and the private ``torch.Generator``
objects that modules keep outside their ``state_dict`` (e.g. a quantizer's anchor streams).

An exact resume restores all of them; saving them as plain lists keeps checkpoints free of
pickle.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


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


__all__ = ["get_rng_state", "set_rng_state", "module_generator_states", "restore_module_generators"]
