"""What the built-in tokenizers share: encoder → 1×1 conv → quantizer → 1×1 conv → decoder,
the quantizer factory, the ``Tokenizer`` contract methods and the saved ``config``.

Subclasses add their objectives (:meth:`VQTokenizer.generator_loss`, and a discriminator
where they have one) and pass their constructor arguments to :meth:`_finish_config`, so
``create_backbone(name, **model.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lgvq_plugins import api
from lgvq_plugins.arguments import import_object, is_import_path, registered_gin_name, resolved_arguments
from lgvq_plugins.training.checkpoint import to_jsonable
from lgvq_plugins.interfaces import LossOutput, Quantized

from .layers import Decoder, Encoder, downsample_factor, latent_grid

QuantizerSpec = str | Callable[..., nn.Module]


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _factory_name(factory: Callable[..., Any]) -> str:
    """Registry name of a registered factory, else its import path ``module:qualname``."""
    reg = api.registry("quantizer")
    for name in reg.names():
        entry = reg.entry(name)
        if factory is entry.factory or factory is entry.original:
            return name
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"quantizer factory {factory!r} is neither registered nor importable by name, so the "
            "tokenizer's config could not rebuild it; register it with "
            "@lgvq_plugins.register_quantizer('name') and pass the name instead")
    return f"{module}:{qualname}"


def build_quantizer(quantizer: QuantizerSpec, quantizer_config: Mapping[str, Any] | None,
                    dim: int) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build the quantizer as ``factory(**{**quantizer_config, "dim": dim})``.

    ``quantizer`` is a registry name, an import path ``"module:factory"`` or a callable.
    An import path is imported only where imports are allowed
    (:func:`lgvq_plugins.arguments.import_paths_allowed`; ``from_pretrained`` forbids them
    unless ``trust_remote_code=True``).

    Returns the module, the name that rebuilds it, and its complete settings without ``dim``:
    its own ``config`` when it has one, otherwise every argument it received (signature
    defaults ⊕ gin bindings in force ⊕ ``quantizer_config``; values that are not JSON and
    were not given explicitly are left out).
    """
    settings = dict(quantizer_config or {})
    if "dim" in settings and settings["dim"] != dim:
        raise ValueError(f"quantizer_config sets dim={settings['dim']} but the tokenizer's embed_dim is "
                         f"{dim}; the quantizer width always follows embed_dim, drop 'dim'")
    settings.pop("dim", None)
    if isinstance(quantizer, str) and not is_import_path(quantizer):
        entry = api.registry("quantizer").entry(quantizer)  # unknown names: error listing the known
        module = entry.factory(**settings, dim=dim)  # None values are passed on, as saved
        name, factory, gin_name = quantizer, entry.original, registered_gin_name("quantizer", quantizer)
    else:
        factory = import_object(quantizer, key="quantizer") if isinstance(quantizer, str) else quantizer
        if not callable(factory):
            raise TypeError(f"quantizer must be a registry name or a callable, got {quantizer!r}")
        name = quantizer if isinstance(quantizer, str) else _factory_name(factory)
        if is_import_path(name):
            module, gin_name = factory(**settings, dim=dim), None
        else:  # a registered factory passed as an object: built (and recorded) by its name
            entry = api.registry("quantizer").entry(name)
            module = entry.factory(**settings, dim=dim)
            factory, gin_name = entry.original, registered_gin_name("quantizer", name)
    if getattr(module, "dim", dim) != dim:
        raise ValueError(f"quantizer {name!r} was built with dim={module.dim}, expected embed_dim={dim}")
    if not is_import_path(name):
        try:  # as registry.create does: the name that rebuilds it
            module.lgvq_registry_name = name
        except (AttributeError, TypeError):
            pass

    own = getattr(module, "config", None)
    if isinstance(own, Mapping):
        resolved = {k: v for k, v in own.items() if k != "dim"}
    else:
        received = resolved_arguments(factory, settings, gin_name=gin_name)
        resolved = {k: v for k, v in received.items()
                    if k != "dim" and (k in settings or _json_safe(to_jsonable(v)))}
    return module, name, to_jsonable(resolved)


class VQTokenizer(nn.Module):
    """Base of the built-in tokenizers (``Tokenizer`` contract).

    ``x`` in [-1, 1] (B, 3, H, W) with H, W multiples of ``2**(len(ch_mult)-1)``.
    """

    def __init__(self, *, quantizer: QuantizerSpec, quantizer_config: Mapping[str, Any] | None,
                 embed_dim: int, z_channels: int, ch: int, ch_mult: Sequence[int],
                 num_res_blocks: int, resolution: int, attn_resolutions: Sequence[int],
                 mid_attn: bool, dropout: float):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.ch_mult = tuple(int(m) for m in ch_mult)
        arch = dict(ch=ch, ch_mult=self.ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                    resolution=resolution, attn_resolutions=tuple(attn_resolutions), mid_attn=mid_attn,
                    dropout=dropout)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        # 1×1 convs decouple the conv width from the code width (taming's quant_conv).
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantizer, self._quantizer_name, self._quantizer_config = build_quantizer(
            quantizer, quantizer_config, self.embed_dim)
        self.config: dict[str, Any] = {}

    def _finish_config(self, args: Mapping[str, Any]) -> None:
        """Store the constructor arguments (after gin) as JSON, with the quantizer by name."""
        config = {k: v for k, v in args.items() if k not in {"self", "__class__"}}
        config["quantizer"] = self._quantizer_name
        config["quantizer_config"] = self._quantizer_config
        config = to_jsonable(config)
        bad = [k for k, v in config.items() if not _json_safe(v)]
        if bad:
            raise TypeError(f"{type(self).__name__} arguments {bad} are not JSON-serialisable; the "
                            "saved config could not rebuild the model. Pass plain numbers, strings, "
                            "lists and dicts.")
        self.config = config

    # -- Tokenizer contract -----------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return downsample_factor(self.ch_mult)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid (h, w) for an input of ``image_size`` (side or (H, W))."""
        return latent_grid(image_size, self.ch_mult)

    def encode(self, x: Tensor) -> Quantized:
        """(B, 3, H, W) → :class:`Quantized` with ``z_q`` (B, embed_dim, H/f, W/f)."""
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the downsampling "
                             f"factor {f} (ch_mult={self.ch_mult}); resize or crop the images")
        # The quantizer runs itself in fp32 under autocast; its output is passed on untouched.
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, embed_dim, h, w) → (B, 3, h·f, w·f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices → images; equals ``decode(quantizer.embed(indices))``."""
        return self.decode(self.quantizer.embed(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        quantized = self.encode(x)
        return self.decode(quantized.z_q), quantized

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight (where the VQ-GAN adaptive weight is measured)."""
        return self.decoder.conv_out.weight

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return []

    def discriminator_loss(self, x: Tensor, reconstruction: Tensor, step: int) -> LossOutput | None:
        return None

    def generator_loss(self, x: Tensor, reconstruction: Tensor, quantized: Quantized,
                       step: int) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def zero_like_loss(ref: Tensor) -> Tensor:
    """A 0-d fp32 zero on ``ref``'s device (for terms that are switched off)."""
    return torch.zeros((), device=ref.device, dtype=torch.float32)


__all__ = ["VQTokenizer", "build_quantizer", "zero_like_loss"]
