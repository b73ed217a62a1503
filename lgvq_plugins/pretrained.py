"""Save a trained tokenizer (with its guidance heads) and load it back: data only, exactly.

    save_pretrained(model, "runs/cvq_lg/pretrained")
    model = from_pretrained("runs/cvq_lg/pretrained")            # LanguageGuided or tokenizer
    tokenizer = from_pretrained("runs/cvq_lg/pretrained", guidance=False)

The folder holds ``config.json`` and ``model.safetensors`` (the trained weights). The config
names components only by registry name, with every constructor setting as resolved when the
model was built (``None`` values included): the backbone's, the guidance module's (every
loss's options too) and the frozen text encoder's, plus a sha256 of the text encoder's
weights (which are not saved). Settings that are paths of the saving machine (feature cache
folder, perceptual network weights, a text encoder checkpoint file or model folder) are not
saved; they are given to :func:`from_pretrained` as keyword arguments.

Loading reads only JSON and safetensors, checks every key against the signature of the
factory that will receive it *before* anything is built, refuses import paths
(``"module:callable"``) unless ``trust_remote_code=True``, and builds with gin isolated (the
loading process's bindings do not apply). A rebuilt text encoder whose weights differ from
the saved sha256 is an error. See ``docs/pretrained.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lgvq_plugins import api
from lgvq_plugins._version import __version__
from lgvq_plugins.arguments import (RemoteCodeError, SettingsError, check_arguments, deep_merge, gin_isolated,
                                    has_key, import_object, import_paths_allowed, is_import_path,
                                    refuse_import_paths, resolved_arguments, strip_local)
from lgvq_plugins.contracts import check_implements
from lgvq_plugins.interfaces import SavableTokenizer
from lgvq_plugins.text.encoders import encoder_weights_sha256
from lgvq_plugins.training.checkpoint import load_tensors, save_tensors, to_jsonable, write_json_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "lgvq_plugins.pretrained/2"
_TOP_KEYS = {"format", "lgvq_plugins_version", "backbone", "guidance", "text_encoder", "tokenizer_prefix"}


class TextEncoderMismatchError(SettingsError):
    """The text encoder given or rebuilt at load time has other weights than the saved one."""


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def _tokenizer_of(model: nn.Module) -> nn.Module:
    return model.tokenizer if hasattr(model, "tokenizer") and isinstance(model.tokenizer, nn.Module) else model


def _registry_name(component: Any, what: str) -> str:
    name = getattr(component, "lgvq_registry_name", None)
    if not name:
        raise ValueError(f"cannot save the {what} {type(component).__name__}: it was not built by a "
                         "registry (create_* sets .lgvq_registry_name), so from_pretrained could not "
                         "rebuild it; register its factory and build it by name")
    return name


def _jsonable(value: Any, where: str) -> Any:
    converted = to_jsonable(value)
    try:
        json.dumps(converted)
    except (TypeError, ValueError):
        raise TypeError(f"{where} = {value!r} ({type(value).__name__}) is not JSON-serialisable, so "
                        "it cannot be saved as data; pass plain numbers, strings, lists and dicts") from None
    return converted


def guidance_settings(model: nn.Module) -> dict[str, Any] | None:
    """Constructor settings of ``model``'s guidance, as saved (None for a bare tokenizer):
    ``model.config`` (recorded by ``LanguageGuided``) without machine-local settings and
    without the text encoder (saved in its own section)."""
    if _tokenizer_of(model) is model:
        return None
    recorded = getattr(model, "config", None)
    if not isinstance(recorded, Mapping):
        recorded = getattr(model, "lgvq_guidance_config", None)
    if not isinstance(recorded, Mapping):
        raise ValueError(f"cannot save {type(model).__name__}: it records no constructor settings "
                         "(LanguageGuided keeps them in .config); from_pretrained could not rebuild it")
    settings, _ = strip_local(recorded, getattr(model, "lgvq_local_settings", ("cache_dir",)))
    settings.pop("tokenizer", None)
    settings.pop("text_encoder", None)
    return settings


def text_encoder_record(encoder: Any) -> dict[str, Any]:
    """What rebuilds and identifies a frozen text encoder: registry name, settings (without
    machine-local ones, which are listed by file name), and the sha256 of its weights."""
    name = _registry_name(encoder, "text encoder")
    settings = getattr(encoder, "lgvq_config", None)
    if not isinstance(settings, Mapping):
        settings = getattr(encoder, "config", None)
    if not isinstance(settings, Mapping):
        raise ValueError(f"cannot save the text encoder {name!r} ({type(encoder).__name__}): it records "
                         "no settings. Build it by name (LanguageGuided(text_encoder='name')) or give it "
                         "a .config dict holding its factory's arguments")
    portable, local = strip_local(settings, getattr(encoder, "lgvq_local_settings", ()))
    return {"name": name, "config": _jsonable(portable, f"text encoder {name!r} config"),
            "local_settings": local, "weights_sha256": encoder_weights_sha256(encoder),
            "identity": getattr(encoder, "identity", None)}


def record_constructor_args(model: nn.Module, factory: Any, **given: Any) -> None:
    """Kept for guidance factories that do not record their own settings: store on ``model``
    the arguments ``factory`` was called with (defaults ⊕ gin ⊕ ``given``) as
    ``model.lgvq_guidance_config``. ``LanguageGuided`` records itself (``.config``)."""
    if isinstance(getattr(model, "config", None), Mapping):
        return
    import gin

    args = resolved_arguments(getattr(factory, "__wrapped__", factory))
    try:
        args.update(gin.get_bindings(factory))
    except (ValueError, KeyError, TypeError):
        pass  # not gin-configurable: defaults and given arguments only
    args.update(given)
    args.pop("tokenizer", None)
    try:
        model.lgvq_guidance_config = _jsonable(args, "guidance settings")
    except TypeError:
        pass  # a non-JSON argument: save_pretrained will say so


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                    guidance_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a ``LanguageGuided`` or a bare tokenizer) to ``directory``.

    ``guidance_config`` replaces the recorded guidance settings (keyword arguments of
    ``LanguageGuided`` other than ``tokenizer``/``text_encoder``/``cache_dir``).
    """
    directory = Path(directory)
    tokenizer = _tokenizer_of(model)
    # from_pretrained must hand back a whole tokenizer, rebuilt from its registry name
    check_implements(tokenizer, SavableTokenizer, role="save_pretrained(model)")
    name = _registry_name(tokenizer, "tokenizer")
    backbone, backbone_local = strip_local(dict(tokenizer.config), getattr(tokenizer, "lgvq_local_settings", ()))
    settings = dict(guidance_config) if guidance_config is not None else guidance_settings(model)
    encoder = getattr(model, "text_encoder", None) if settings is not None else None
    config = {
        "format": FORMAT,
        "lgvq_plugins_version": __version__,
        "backbone": {"name": name, "config": _jsonable(backbone, f"backbone {name!r} config"),
                     "local_settings": backbone_local},
        "guidance": _jsonable(settings, "guidance settings") if settings is not None else None,
        "text_encoder": text_encoder_record(encoder) if encoder is not None else None,
        # prefix of the tokenizer's weights inside model.safetensors
        "tokenizer_prefix": "tokenizer." if tokenizer is not model else "",
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


# ---------------------------------------------------------------------------------------
# Loading: checks first
# ---------------------------------------------------------------------------------------


def load_pretrained_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a pretrained folder (format and top-level keys checked)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained model folder (no {CONFIG_FILE}); "
                                "save one with lgvq_plugins.pretrained.save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise SettingsError(f"{path}: unknown format {found!r} (expected {FORMAT!r}); a folder saved by "
                            "an older version must be saved again with this version's save_pretrained")
    unknown = sorted(set(config) - _TOP_KEYS)
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {unknown}; a pretrained config has {sorted(_TOP_KEYS)}")
    return config


def _registered(kind: str, name: Any, key: str) -> Callable[..., Any]:
    """The plugin's own factory of ``name`` (not the gin wrapper: no binding applies)."""
    if not isinstance(name, str):
        raise SettingsError(f"config.json: {key} must be a registry name (a string), got {name!r}")
    return api.registry(kind).entry(name).original


def _local_hint(section: str, local: Mapping[str, str], supplied: Mapping[str, Any], option: str) -> str:
    missing = {k: v for k, v in local.items() if not has_key(supplied, k)}
    if not missing:
        return ""
    examples = ", ".join(f"{k!r}: '/path/to/{v}'" for k, v in missing.items())
    return (f" The {section} was saved with machine-local setting(s) {sorted(missing)} (not saved: "
            f"paths of the saving machine); pass them when loading, e.g. from_pretrained(..., "
            f"{option}={{{examples}}}) (nested keys as nested dicts).")


def _check_backbone(section: Mapping[str, Any], options: Mapping[str, Any],
                    trust: bool) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    name = section.get("name")
    factory = _registered("backbone", name, "backbone.name")
    kwargs = deep_merge(section.get("config") or {}, options)
    check_arguments(factory, kwargs, where=f"config.json backbone {name!r}")
    quantizer = kwargs.get("quantizer")
    if isinstance(quantizer, str):
        if is_import_path(quantizer):
            with import_paths_allowed(trust):  # refused here unless trusted; imported if trusted
                qfactory = import_object(quantizer, key="backbone.config.quantizer")
        else:
            qfactory = _registered("quantizer", quantizer, "backbone.config.quantizer")
        check_arguments(qfactory, kwargs.get("quantizer_config") or {}, supplied=("dim",),
                        where=f"config.json backbone.config.quantizer_config of {quantizer!r}")
    return name, factory, kwargs


def _check_guidance(settings: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    from lgvq_plugins.guidance.model import LanguageGuided

    kwargs = {**settings, **options}
    kwargs.pop("text_encoder", None)  # rebuilt from its own section (or given)
    kwargs.pop("cache_dir", None)  # machine-local: from_pretrained(cache_dir=...)
    check_arguments(LanguageGuided, kwargs, where="config.json guidance", supplied=("tokenizer", "text_encoder"))
    for name, opts in (kwargs.get("loss_options") or {}).items():
        factory = _registered("alignment_loss", name, f"guidance.loss_options.{name}")
        check_arguments(factory, opts or {}, where=f"config.json guidance.loss_options.{name}")
    for name in kwargs.get("losses") or {}:
        _registered("alignment_loss", name, f"guidance.losses.{name}")
    return kwargs


def _check_text_encoder(record: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    name = record.get("name")
    factory = _registered("text_encoder", name, "text_encoder.name")
    kwargs = deep_merge(record.get("config") or {}, options)
    try:
        check_arguments(factory, kwargs, where=f"config.json text_encoder {name!r}")
    except SettingsError as exc:
        hint = _local_hint(f"text encoder {name!r}", record.get("local_settings") or {}, options,
                           "text_encoder_options")
        raise SettingsError(f"{exc}.{hint}") from None
    return name, factory, kwargs


# ---------------------------------------------------------------------------------------
# Loading: building
# ---------------------------------------------------------------------------------------


def _build(what: str, factory: Callable[..., Any], kwargs: Mapping[str, Any], hint: str) -> Any:
    try:
        return factory(**kwargs)
    except (RemoteCodeError, SettingsError):
        raise
    except Exception as exc:
        if not hint:
            raise
        raise SettingsError(f"could not rebuild the {what}: {type(exc).__name__}: {exc}.{hint}") from exc


def _check_weights(encoder: Any, record: Mapping[str, Any] | None, given: bool) -> None:
    expected = (record or {}).get("weights_sha256")
    if not expected:
        return
    found = encoder_weights_sha256(encoder)
    if found == expected:
        return
    name = record.get("name")
    local = record.get("local_settings") or {}
    how = (f"pass the same weights, e.g. text_encoder_options={{{', '.join(f'{k!r}: /path/to/{v!r}' for k, v in local.items())}}}"
           if local else f"rebuild it with the saved settings {record.get('config')}")
    raise TextEncoderMismatchError(
        f"the text encoder {'passed as text_encoder=' if given else f'{name!r} rebuilt for this model'} "
        f"has weights sha256 {found[:16]}…, but the model was saved with a text encoder whose weights "
        f"have sha256 {expected[:16]}… (identity {record.get('identity')!r}). The guidance heads were "
        f"trained against those weights, so this would not be the saved model. To load it, {how}, or "
        "pass text_encoder=<an encoder with those weights>; or load only the tokenizer with guidance=False.")


def from_pretrained(directory: str | os.PathLike[str], *, guidance: bool | None = None,
                    map_location: str | torch.device = "cpu", trust_remote_code: bool = False,
                    text_encoder: Any = None, text_encoder_options: Mapping[str, Any] | None = None,
                    backbone_options: Mapping[str, Any] | None = None,
                    guidance_options: Mapping[str, Any] | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Rebuild and load a model saved by :func:`save_pretrained`, exactly as saved.

    Args:
        directory: the folder.
        guidance: True — the guidance module around the tokenizer (rebuilds the text
            encoder); False — only the tokenizer; None (default) — whatever was saved.
        map_location: device for the model.
        trust_remote_code: allow the config to name code by import path (``"module:callable"``,
            e.g. a quantizer that is not registered) and import it. Only for folders you trust:
            importing runs that code.
        text_encoder: an already built text encoder to use (its weights must match the saved
            sha256); otherwise it is rebuilt from its registry name and saved settings.
        text_encoder_options: settings for the text encoder's factory on top of the saved ones:
            the machine-local ones that are never saved (``{"pretrained": "/path/ckpt.pt"}``
            for ``open_clip`` with a checkpoint file, ``{"path": "/models/bert"}`` for ``hf``).
        backbone_options: settings for the backbone on top of the saved ones (nested dicts
            merge), e.g. ``{"perceptual_config": {"backbone_weights": "/path/vgg16.pth"}}``.
        guidance_options: settings for ``LanguageGuided`` on top of the saved ones.
        cache_dir: the text-feature cache folder on this machine (default: in memory).

    The model is returned in eval mode.

    Raises:
        RemoteCodeError: the config names an import path and ``trust_remote_code`` is False.
        SettingsError: a key the factory does not take, a missing required (machine-local)
            setting, or an unknown format; raised before anything is built.
        TextEncoderMismatchError: the text encoder's weights are not the saved ones.
    """
    directory = Path(directory)
    config = load_pretrained_config(directory)
    if not trust_remote_code:
        refuse_import_paths(config, "config.json")  # anywhere: values, mapping keys, lists
    saved_guidance = config.get("guidance")
    want_guidance = saved_guidance is not None if guidance is None else bool(guidance)

    # -- every check before anything is built ---------------------------------------------
    backbone_section = config.get("backbone") or {}
    name, backbone_factory, backbone_kwargs = _check_backbone(backbone_section, backbone_options or {},
                                                              trust_remote_code)
    backbone_hint = _local_hint(f"backbone {name!r}", backbone_section.get("local_settings") or {},
                                backbone_options or {}, "backbone_options")
    record = config.get("text_encoder")
    guidance_kwargs: dict[str, Any] = {}
    encoder_plan: tuple[str, Callable[..., Any], dict[str, Any]] | None = None
    if want_guidance:
        guidance_kwargs = _check_guidance(saved_guidance or {}, guidance_options or {})
        enabled = guidance_kwargs.get("enabled", True)
        if enabled and text_encoder is None:
            if record is not None:
                encoder_plan = _check_text_encoder(record, text_encoder_options or {})
            else:  # a bare tokenizer saved, guidance asked for: the named/default encoder
                te_name = (saved_guidance or {}).get("text_encoder") or "minilm"
                encoder_plan = _check_text_encoder({"name": te_name}, text_encoder_options or {})
    state = load_tensors(directory / WEIGHTS_FILE)

    # -- building, with gin isolated and imports only if trusted ---------------------------
    with gin_isolated(), import_paths_allowed(trust_remote_code):
        encoder = text_encoder
        if encoder_plan is not None:
            te_name, factory, kwargs = encoder_plan
            hint = _local_hint(f"text encoder {te_name!r}", (record or {}).get("local_settings") or {},
                               text_encoder_options or {}, "text_encoder_options")
            encoder = _build(f"text encoder {te_name!r}", factory, kwargs, hint)
            encoder.lgvq_registry_name = te_name  # as create_text_encoder would, for saving again
            encoder.lgvq_config = resolved_arguments(factory, kwargs)
        if encoder is not None and want_guidance:
            _check_weights(encoder, record, given=text_encoder is not None)
        tokenizer = _build(f"backbone {name!r}", backbone_factory, backbone_kwargs, backbone_hint)
        tokenizer.lgvq_registry_name = name
        if want_guidance:
            from lgvq_plugins.guidance.model import LanguageGuided

            if encoder is not None:
                guidance_kwargs["text_encoder"] = encoder
            cache_dir = cache_dir if cache_dir is not None else (guidance_options or {}).get("cache_dir")
            model: nn.Module = LanguageGuided(tokenizer, cache_dir=None if cache_dir is None else str(cache_dir),
                                              **guidance_kwargs)
        else:
            model = tokenizer

    if want_guidance:
        if config.get("tokenizer_prefix", "tokenizer.") == "":  # a bare tokenizer was saved
            model.tokenizer.load_state_dict(state, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    else:
        prefix = config.get("tokenizer_prefix", "")
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
        model.load_state_dict(own, strict=True)
    return model.to(map_location).eval()


__all__ = ["save_pretrained", "from_pretrained", "load_pretrained_config", "guidance_settings",
           "text_encoder_record", "TextEncoderMismatchError", "RemoteCodeError", "SettingsError"]
