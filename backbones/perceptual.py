"""Perceptual losses for tokenizers (kind ``perceptual_loss``): ``lpips`` and ``none``.

A perceptual loss is a module ``(x, y) -> (B,)`` distances for images in [-1, 1]; it is
frozen (no trainable parameters) and differentiable with respect to its inputs.

``lpips`` is torchmetrics' LPIPS network (the module behind
``torchmetrics.image.LearnedPerceptualImagePatchSimilarity``, used directly so that gradients
flow and reconstructions slightly outside [-1, 1] are accepted). Its linear heads ship with
torchmetrics; the ImageNet backbone (VGG16 / AlexNet / SqueezeNet) comes from torchvision's
weight hub, which is unreachable offline. Provide it with ``lpips.backbone_weights`` (a local
file) or a pre-populated torch hub cache; otherwise construction fails with
:class:`PerceptualWeightsError` explaining exactly that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lgvq_plugins.hookspecs import hookimpl

#: LPIPS net name → (torchvision model, weights enum name)
_TORCHVISION_NETS: dict[str, tuple[str, str]] = {
    "vgg": ("vgg16", "VGG16_Weights"),
    "alex": ("alexnet", "AlexNet_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


class PerceptualWeightsError(RuntimeError):
    """The pretrained weights a perceptual loss needs could not be loaded."""


class NoPerceptual(nn.Module):
    """The ``none`` choice: zero distance, no network (the quick start's default)."""

    active = False

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0])


def _hub_checkpoint(net: str) -> tuple[str, Path]:
    """(download URL, file the torch hub cache would hold) of the backbone of ``net``."""
    import torchvision.models as tvm

    _, enum_name = _TORCHVISION_NETS[net]
    url = getattr(tvm, enum_name).DEFAULT.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _weights_help(net: str) -> str:
    url, cached = _hub_checkpoint(net)
    model = _TORCHVISION_NETS[net][0]
    return (
        f"LPIPS with net={net!r} needs the ImageNet weights of torchvision's {model} ({url}), "
        "and nothing can be downloaded here. Provide them in one of these ways:\n"
        f"  1. a local file: bind `lpips.backbone_weights = '/path/to/{os.path.basename(url)}'` "
        "(a torchvision state dict of the whole model or of its `features`), or pass "
        "perceptual_config={'backbone_weights': ...} to the tokenizer;\n"
        f"  2. a pre-populated torch hub cache: copy that file to {cached} "
        "(set TORCH_HOME to move the cache);\n"
        "  3. train without it: `vqgan.perceptual = 'none'`."
    )


def _load_backbone(lpips_net: nn.Module, path: str | os.PathLike[str], net: str) -> None:
    """Copy torchvision ``features`` weights from ``path`` into the LPIPS slices.

    torchmetrics splits ``model.features`` into ``slice1..sliceN`` but keeps each layer's
    index as its name, so ``slice2.5.weight`` is ``features.5.weight`` (SqueezeNet:
    ``slices.1.5.weight``).
    """
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"lpips.backbone_weights={str(path)!r} is not a file.\n" + _weights_help(net))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # accept both whole-model ("features.0.weight") and features-only ("0.weight") dicts
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or dict(state)
    target = lpips_net.state_dict()
    # "slice1.3.weight" (vgg/alex) and "slices.0.3.weight" (squeeze) are both features "3.weight"
    wanted = {name: ".".join(name.split(".")[2 if name.startswith("slices.") else 1:]) for name in target}
    missing = sorted(src for src in wanted.values() if src not in features)
    if missing:
        raise PerceptualWeightsError(
            f"lpips.backbone_weights={str(path)!r} lacks {len(missing)} tensors of the "
            f"{_TORCHVISION_NETS[net][0]} features (e.g. {missing[:3]}).\n" + _weights_help(net))
    bad = [f"{src}: {tuple(features[src].shape)} vs {tuple(target[dst].shape)}"
           for dst, src in wanted.items() if features[src].shape != target[dst].shape]
    if bad:
        raise PerceptualWeightsError(
            f"lpips.backbone_weights={str(path)!r} does not match {_TORCHVISION_NETS[net][0]}: {bad[:3]}")
    lpips_net.load_state_dict({dst: features[src] for dst, src in wanted.items()})


def _load_linear_heads(lpips: nn.Module, path: str | None, net: str) -> None:
    """LPIPS's linear heads from ``path`` (default: the file shipped with torchmetrics)."""
    if path is None:
        import torchmetrics.functional.image.lpips as tm_lpips

        path = str(Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth")
    if not Path(path).is_file():
        raise PerceptualWeightsError(f"lpips.linear_weights={str(path)!r} is not a file")
    lpips.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (Zhang et al. 2018) as a frozen loss.

    Args:
        net: backbone, ``"vgg"`` (taming / LG-VQ), ``"alex"`` or ``"squeeze"``.
        backbone_weights: local torchvision weights for the backbone; ``None`` loads them
            through torchvision's hub cache (fails offline unless pre-populated).
        linear_weights: LPIPS linear heads; ``None`` uses the ones shipped with torchmetrics.

    Raises:
        PerceptualWeightsError: the backbone weights are unavailable (the message says how
            to provide them).
    """

    active = True
    #: arguments that are files of this machine (save_pretrained leaves them out)
    lgvq_local_settings = ("backbone_weights", "linear_weights")

    def __init__(self, net: str = "vgg", backbone_weights: str | None = None,
                 linear_weights: str | None = None):
        super().__init__()
        if net not in _TORCHVISION_NETS:
            raise ValueError(f"lpips.net={net!r} is not one of {sorted(_TORCHVISION_NETS)}")
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.net_name = net
        # Built empty, then every file is read here with torch.load(weights_only=True):
        # torchmetrics and torchvision's hub loader would unpickle them in full.
        self.lpips = _NoTrainLpips(net=net, pretrained=False, pnet_rand=True)
        _load_linear_heads(self.lpips, linear_weights, net)
        if backbone_weights is None:
            _, cached = _hub_checkpoint(net)
            if not cached.is_file():
                raise PerceptualWeightsError(
                    f"the LPIPS backbone is not in the torch hub cache ({cached}).\n" + _weights_help(net))
            backbone_weights = str(cached)
        _load_backbone(self.lpips.net, backbone_weights, net)
        for p in self.parameters():  # frozen: a loss, never trained
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # dropout in the linear heads must stay off

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W) × 2 in [-1, 1] → (B,) distances."""
        return self.lpips(x, y).reshape(x.shape[0])


@hookimpl
def register_perceptual_losses(register: Any) -> None:
    register("lpips", LPIPS)
    register("none", NoPerceptual)


__all__ = ["LPIPS", "NoPerceptual", "PerceptualWeightsError"]
