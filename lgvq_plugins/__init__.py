"""lgvq-plugins: language-guided codebook learning (LG-VQ) for any VQ image tokenizer.

Components are found in registries filled by plugins (built-ins and third-party entry
points alike). In code, one decorator registers a component::

    import lgvq_plugins

    @lgvq_plugins.register_backbone("my_vq")
    class MyTokenizer(torch.nn.Module): ...

    model = lgvq_plugins.create_backbone("my_vq", embed_dim=64)
    lgvq_plugins.list_backbones("vq*")
"""

from __future__ import annotations

from typing import Any

from lgvq_plugins import _source_layout

_source_layout.install()

from lgvq_plugins.api import (  # noqa: E402
    create, create_alignment_loss, create_backbone, create_dataset, create_metric,
    create_perceptual_loss, create_quantizer, create_task, create_text_encoder,
    list_alignment_losses, list_backbones, list_components, list_datasets, list_metrics,
    list_perceptual_losses, list_quantizers, list_tasks, list_text_encoders, register,
    register_alignment_loss, register_backbone, register_dataset, register_metric,
    register_perceptual_loss, register_quantizer, register_task, register_text_encoder, registry,
)
from lgvq_plugins.hookspecs import hookimpl  # noqa: E402
from lgvq_plugins.plugins import get_host, plugin_infos, reset_plugins  # noqa: E402
from lgvq_plugins.registry import KINDS, DuplicateComponentError, UnknownComponentError  # noqa: E402

from lgvq_plugins._version import __version__  # noqa: E402,F401

# Heavy parts of the public API (they import torch, timm, ...) load on first access, so
# ``import lgvq_plugins`` and the CLI stay fast.
_LAZY = {
    "LanguageGuided": "lgvq_plugins.guidance.model",
    "save_pretrained": "lgvq_plugins.pretrained",
    "from_pretrained": "lgvq_plugins.pretrained",
    "Experiment": "lgvq_plugins.training.experiment",
    "Trainer": "lgvq_plugins.training.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lgvq_plugins' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "KINDS", "hookimpl", *_LAZY, "DuplicateComponentError", "UnknownComponentError",
    "register", "create", "list_components", "registry", "plugin_infos", "reset_plugins", "get_host",
    "register_quantizer", "create_quantizer", "list_quantizers",
    "register_backbone", "create_backbone", "list_backbones",
    "register_text_encoder", "create_text_encoder", "list_text_encoders",
    "register_alignment_loss", "create_alignment_loss", "list_alignment_losses",
    "register_perceptual_loss", "create_perceptual_loss", "list_perceptual_losses",
    "register_dataset", "create_dataset", "list_datasets",
    "register_task", "create_task", "list_tasks",
    "register_metric", "create_metric", "list_metrics",
]
