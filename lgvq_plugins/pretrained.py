"""Save a trained tokenizer (with its guidance heads) and load it back, without gin.

    save_pretrained(model, "runs/cvq_lg/pretrained")
    model = from_pretrained("runs/cvq_lg/pretrained")            # LanguageGuided or tokenizer
    tokenizer = from_pretrained("runs/cvq_lg/pretrained", guidance=False)

The folder holds ``config.json`` (the backbone's registry name and constructor config, the
guidance settings) and ``model.safetensors`` (the trained weights; the frozen text encoder
is not saved — it is rebuilt from its registry name). Loading reads only JSON and
safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lgvq_plugins import api
from lgvq_plugins._version import __version__
from lgvq_plugins.contracts import check_implements
from lgvq_plugins.interfaces import SavableTokenizer

from lgvq_plugins.training.checkpoint import load_tensors, save_tensors, to_jsonable, write_json_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "lgvq_plugins.pretrained/1"


def _tokenizer_of(model: nn.Module) -> nn.Module:
    return model.tokenizer if hasattr(model, "tokenizer") and isinstance(model.tokenizer, nn.Module) else model


def _registry_name(tokenizer: nn.Module) -> str:
    name = getattr(tokenizer, "lgvq_registry_name", None)
    if not name:
        raise ValueError(f"cannot save {type(tokenizer).__name__}: it was not built by a registry "
                         "(lgvq_plugins.create_backbone sets .lgvq_registry_name), so from_pretrained "
                         "could not rebuild it; set tokenizer.lgvq_registry_name to its registered name")
    return name


def _jsonable(value: Any) -> Any:
    converted = to_jsonable(value)
    try:
        json.dumps(converted)
    except (TypeError, ValueError):
        raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-serialisable") from None
    return converted


def guidance_settings(model: nn.Module) -> dict[str, Any] | None:
    """What rebuilds ``model``'s guidance around a tokenizer (None for a bare tokenizer).

    Prefers ``model.lgvq_guidance_config`` (the constructor arguments, recorded by
    :class:`~lgvq_plugins.training.experiment.Experiment` from gin); otherwise reads what the module
    exposes (enabled, text encoder registry name, loss weights).
    """
    if _tokenizer_of(model) is model:
        return None
    recorded = getattr(model, "lgvq_guidance_config", None)
    if isinstance(recorded, Mapping):
        return {k: v for k, v in recorded.items() if k != "tokenizer"}
    if not getattr(model, "enabled", True):
        return {"enabled": False}
    encoder = getattr(model, "text_encoder", None)
    return {"enabled": True, "text_encoder": getattr(encoder, "lgvq_registry_name", None),
            "losses": dict(getattr(model, "weights", {}))}


def record_constructor_args(model: nn.Module, factory: Any, **given: Any) -> None:
    """Store on ``model`` the arguments ``factory`` was called with — gin bindings and
    defaults included — as ``model.lgvq_guidance_config`` for :func:`save_pretrained`."""
    import inspect

    import gin

    fn = getattr(factory, "__wrapped__", factory)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    args = {k: p.default for k, p in params.items()
            if p.default is not inspect.Parameter.empty and k not in {"self", "tokenizer"}}
    try:
        args.update(gin.get_bindings(factory))
    except (ValueError, KeyError, TypeError):
        pass  # not gin-configurable: defaults and given arguments only
    args.update(given)
    args.pop("tokenizer", None)
    try:
        model.lgvq_guidance_config = _jsonable(args)
    except TypeError:
        pass  # a non-JSON argument (e.g. an encoder object): fall back to introspection


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                    guidance_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a ``LanguageGuided`` or a bare tokenizer) to ``directory``.

    ``guidance_config`` overrides the guidance settings recorded (keyword arguments of the
    guidance class other than the tokenizer).
    """
    tokenizer = _tokenizer_of(model)
    # from_pretrained must hand back a whole tokenizer, rebuilt from its registry name;
    # checked before anything is written
    check_implements(tokenizer, SavableTokenizer, role="save_pretrained(model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(guidance_config) if guidance_config is not None else guidance_settings(model)
    if settings is not None:
        settings = {k: v for k, v in settings.items() if v is not None}
    config = {
        "format": FORMAT,
        "lgvq_plugins_version": __version__,
        "backbone": {"name": _registry_name(tokenizer), "config": _jsonable(dict(tokenizer.config))},
        "guidance": _jsonable(settings) if settings is not None else None,
        # prefix of the tokenizer's weights inside model.safetensors
        "tokenizer_prefix": "tokenizer." if tokenizer is not model else "",
    }
    save_tensors(model.state_dict(), directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def load_pretrained_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a pretrained folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained model folder (no {CONFIG_FILE}); "
                                "save one with lgvq_plugins.pretrained.save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT!r})")
    return config


def from_pretrained(directory: str | os.PathLike[str], *, guidance: bool | None = None,
                    map_location: str | torch.device = "cpu", **guidance_overrides: Any) -> nn.Module:
    """Rebuild and load a model saved by :func:`save_pretrained`.

    Args:
        directory: the folder.
        guidance: True — return the guidance module around the tokenizer (needs the text
            encoder); False — only the tokenizer; None (default) — whatever was saved.
        map_location: device for the weights.
        guidance_overrides: keyword arguments for the guidance class (e.g. ``cache_dir``).

    The model is returned in eval mode.
    """
    directory = Path(directory)
    config = load_pretrained_config(directory)
    backbone = config["backbone"]
    tokenizer = api.create_backbone(backbone["name"], **backbone["config"])
    state = load_tensors(directory / WEIGHTS_FILE)
    settings = config.get("guidance")
    want_guidance = settings is not None if guidance is None else guidance
    if want_guidance:
        from lgvq_plugins.guidance.model import LanguageGuided

        kwargs = {**(settings or {}), **guidance_overrides}
        model: nn.Module = LanguageGuided(tokenizer, **kwargs)
        prefix = config.get("tokenizer_prefix", "tokenizer.")
        if prefix == "":  # a bare tokenizer was saved: only its weights exist
            model.tokenizer.load_state_dict(state, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    else:
        prefix = config.get("tokenizer_prefix", "")
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
        tokenizer.load_state_dict(own, strict=True)
        model = tokenizer
    return model.to(map_location).eval()


__all__ = ["save_pretrained", "from_pretrained", "load_pretrained_config", "guidance_settings"]
