"""``LanguageGuided``: wraps any tokenizer and adds LG-VQ's alignment losses.

One forward per batch: the tokenizer reconstructs the images; the code–text transformer
turns the quantized grid into visual tokens; the frozen text encoder's features of the
captions come from a feature cache (the encoder runs once per unique caption); each
alignment loss returns an unweighted scalar that is weighted here::

    L = L_tokenizer + Σ_name weight[name] · loss[name](guided, batch)

The frozen text encoder is kept *outside* the module tree: it is not in ``state_dict()``
nor ``parameters()`` (checkpoints hold only trained weights, optimizers never see frozen
ones), yet ``.to()`` / ``.cuda()`` / ``.half()`` move it with the rest.

gin::

    LanguageGuided.text_encoder = 'minilm'
    LanguageGuided.losses = {'gsa': 0.001, 'mtp': 0.01, 'ras': 0.0001}
    LanguageGuided.enabled = False   # the "base" tokenizer: no text encoder, no heads
    LanguageGuided.balance = 'adaptive'   # weights relative to the tokenizer's gradient at z_e
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import gin
import torch
from torch import Tensor, nn

from lgvq_plugins import api
from lgvq_plugins.arguments import create_recorded
from lgvq_plugins.guidance.balance import BALANCE_MODES, AdaptiveBalance
from lgvq_plugins.guidance.code_text import CodeTextTransformer
from lgvq_plugins.guidance.inputs import check_captions, check_images
from lgvq_plugins.contracts import check_implements
from lgvq_plugins.interfaces import AlignmentLoss, GuidableTokenizer, GuidedOutput, TextEncoder
from lgvq_plugins.text.cache import TextFeatureCache

#: Loss weights of the reference (CelebA-HQ, TextCaps; CUB uses 0.001 for all three). Its ras
#: weight assumes ``ras.reduction = 'reference'``; under the default ``'real_words'`` the same
#: weight is B·L²/#pairs times stronger (see ``RelationshipAlignment``).
REFERENCE_LOSS_WEIGHTS: dict[str, float] = {"gsa": 0.001, "mtp": 0.01, "ras": 0.0001}

#: keys of a tokenizer's ``config`` that may hold the training image size.
_IMAGE_SIZE_KEYS = ("image_size", "resolution", "img_size")


def _image_size_of(tokenizer: nn.Module, image_size: int | Sequence[int] | None) -> int | tuple[int, int]:
    if image_size is not None:
        return image_size if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    config = getattr(tokenizer, "config", None) or {}
    for key in _IMAGE_SIZE_KEYS:
        if config.get(key) is not None:
            return _image_size_of(tokenizer, config[key])
    raise ValueError(
        "LanguageGuided needs the training image size to size the code-text transformer's "
        f"positional embeddings, and the tokenizer's config has none of {_IMAGE_SIZE_KEYS}. "
        "Set it, e.g. `LanguageGuided.image_size = 256` in gin or image_size=256 in code."
    )


@gin.configurable
class LanguageGuided(nn.Module):
    """A tokenizer with language guidance (LG-VQ) while its codebook is learnt.

    Args:
        tokenizer: the tokenizer to guide (a ``Tokenizer``), or a registered backbone name.
        text_encoder: a registered text-encoder name or a ``TextEncoder`` object; frozen.
        losses: alignment-loss name → weight (names from the ``alignment_loss`` registry, so
            a plugin's loss works the same). A weight of 0 leaves the loss out. Default:
            the reference weights ``{"gsa": 0.001, "mtp": 0.01, "ras": 0.0001}``.
        enabled: ``False`` builds no text encoder and no heads and only runs the tokenizer
            (the base model of a "+LG vs base" comparison).
        cache_dir: where the text-feature cache persists features (None: in memory only).
        image_size: training image size, to size the positional embeddings from
            ``tokenizer.grid(image_size)``; default: the tokenizer config's ``image_size``
            (or ``resolution``). Another size at run time interpolates the embeddings.
        width: code–text transformer width; default the code width D clamped to [64, 512],
            so the transformer stays proportionate to the tokenizer it guides (quick start
            D=64 → 64; paper D=256 → 256).
        depth: code–text transformer blocks (reference: 2).
        heads: code–text transformer attention heads; default ``width // 32``.
        mlp_ratio: MLP width multiple of the code–text transformer blocks.
        dropout: dropout in the code–text transformer.
        loss_options: alignment-loss name → keyword arguments of that loss (e.g.
            ``{"ras": {"reduction": "reference"}}``); gin bindings of the loss fill the rest.
        balance: ``"fixed"`` (default, the reference): ``loss = weight · raw``. ``"adaptive"``:
            in training each weight w_k is rescaled per step to
            ``w_k · clamp(‖∇_{z_e} L_tok‖ / (‖∇_{z_e} L_k‖ + eps), 0, max_ratio)`` by
            :meth:`balance_losses`, so w_k is term k's push on the encoder output as a fraction
            of the tokenizer's (:class:`~lgvq_plugins.guidance.balance.AdaptiveBalance`, whose
            settings are bound in gin; ``gin/guidance/adaptive.gin``).

    :attr:`config` holds every setting as resolved (defaults, gin and arguments; each loss's
    full options; the text encoder's registry name), which ``save_pretrained`` writes so
    that ``from_pretrained`` rebuilds exactly this module.

    Loss modules read in ``setup(guide)``: :attr:`text_encoder`, :attr:`visual_width`,
    :attr:`code_dim` (and :attr:`tokenizer`, :attr:`grid`).
    """

    #: settings naming places on this machine: not saved by ``save_pretrained``
    lgvq_local_settings = ("cache_dir",)

    def __init__(self, tokenizer: nn.Module | str, text_encoder: str | TextEncoder = "minilm",
                 losses: Mapping[str, float] | None = None, enabled: bool = True,
                 cache_dir: str | None = None, image_size: int | Sequence[int] | None = None,
                 width: int | None = None, depth: int = 2, heads: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, loss_options: Mapping[str, Mapping[str, Any]] | None = None,
                 balance: str = "fixed"):
        super().__init__()
        if isinstance(tokenizer, str):
            tokenizer = api.create_backbone(tokenizer)
        # Checked now, all members at once, instead of an AttributeError deep in a forward.
        self.tokenizer = check_implements(tokenizer, GuidableTokenizer, role="LanguageGuided(tokenizer=...)")
        self.enabled = bool(enabled)
        # Frozen, non-module state: a plain dict is never registered as a submodule.
        self._frozen: dict[str, Any] = {}
        self.weights: dict[str, float] = {}
        self.code_text: CodeTextTransformer | None = None
        self.alignment_losses = nn.ModuleDict()
        self.grid: tuple[int, int] | None = None
        self.image_size = image_size
        if balance not in BALANCE_MODES:
            raise ValueError(f"LanguageGuided.balance = {balance!r}: expected one of {BALANCE_MODES}")
        self.balancer: AdaptiveBalance | None = None
        options = {name: dict(opts or {}) for name, opts in (loss_options or {}).items()}
        # every setting as given (None included); resolved values replace them below
        self.config: dict[str, Any] = {
            "enabled": self.enabled, "text_encoder": text_encoder if isinstance(text_encoder, str)
            else getattr(text_encoder, "lgvq_registry_name", None),
            "losses": None if losses is None else dict(losses), "loss_options": options,
            "cache_dir": cache_dir, "image_size": image_size, "width": width, "depth": depth,
            "heads": heads, "mlp_ratio": mlp_ratio, "dropout": dropout, "balance": balance}
        if not self.enabled:
            return

        encoder = create_recorded("text_encoder", text_encoder) if isinstance(text_encoder, str) \
            else text_encoder
        check_implements(encoder, TextEncoder, role="LanguageGuided(text_encoder=...)")
        if isinstance(encoder, nn.Module):
            encoder.requires_grad_(False)
            encoder.eval()
        self._frozen["text_encoder"] = encoder
        self._frozen["text_cache"] = TextFeatureCache(encoder, cache_dir=cache_dir)

        self.image_size = _image_size_of(tokenizer, image_size)
        self.grid = tuple(tokenizer.grid(self.image_size))
        width = width if width is not None else min(512, max(64, self.code_dim))
        heads = heads if heads is not None else max(1, width // 32)
        self.code_text = CodeTextTransformer(self.code_dim, self.visual_width, self.grid, width=width,
                                             depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                             dropout=dropout)

        weights = dict(REFERENCE_LOSS_WEIGHTS if losses is None else losses)
        stray = sorted(set(options) - {n for n, w in weights.items() if w})
        if stray:
            raise ValueError(f"LanguageGuided.loss_options names {stray}, which are not among the "
                             f"losses with a weight > 0 ({weights}); add them to losses or drop the options")
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"LanguageGuided.losses[{name!r}] = {weight!r}: a weight must be a "
                                 "number >= 0 (0 leaves the loss out)")
            if weight == 0:
                continue
            loss = create_recorded("alignment_loss", name, **options.get(name, {}))
            if not isinstance(loss, nn.Module):
                raise TypeError(f"alignment loss {name!r} built a {type(loss).__name__}; alignment "
                                "losses must be nn.Modules (so their parameters are trained and saved)")
            check_implements(loss, AlignmentLoss, role=f"alignment loss {name!r}")
            loss.setup(self)
            self.alignment_losses[name] = loss
            self.weights[name] = float(weight)
        if balance == "adaptive" and self.weights:
            if not isinstance(getattr(tokenizer, "quantizer", None), nn.Module):
                raise TypeError(
                    "LanguageGuided.balance = 'adaptive' measures gradients at the encoder output z_e, "
                    f"the input of tokenizer.quantizer, but {type(tokenizer).__name__} has no quantizer "
                    "nn.Module; use balance = 'fixed' or expose the quantizer as .quantizer")
            self.balancer = AdaptiveBalance()
            self.balancer.check_terms(self.weights)
        self.config.update(
            text_encoder=getattr(encoder, "lgvq_registry_name", self.config["text_encoder"]),
            losses=weights, image_size=self.image_size, width=width, heads=heads,
            loss_options={n: dict(getattr(m, "lgvq_config", options.get(n, {})))
                          for n, m in self.alignment_losses.items()})

    # -- what the losses read -----------------------------------------------------------
    @property
    def text_encoder(self) -> TextEncoder | None:
        """The frozen text encoder (None when guidance is off); not a submodule."""
        return self._frozen.get("text_encoder")

    @property
    def text_cache(self) -> Callable[..., Any] | None:
        """The text-feature cache: ``cache(captions, device) -> TextFeatures``; has ``.stats``."""
        return self._frozen.get("text_cache")

    @property
    def visual_width(self) -> int:
        """Dt, the width of the visual tokens (the text encoder's token width)."""
        return int(self.text_encoder.width)

    @property
    def code_dim(self) -> int:
        """D, the channel width of the tokenizer's ``z_q``."""
        return int(self.tokenizer.embed_dim)

    # -- parameters and devices ---------------------------------------------------------
    def guidance_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters added by guidance (code–text transformer and the losses' heads); the
        rest of ``parameters()`` is the tokenizer's."""
        if self.code_text is not None:
            yield from self.code_text.parameters()
        yield from self.alignment_losses.parameters()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "LanguageGuided":
        # The frozen encoder is outside the module tree; move/cast it along with the rest.
        super()._apply(fn, recurse)
        encoder = self._frozen.get("text_encoder")
        if isinstance(encoder, nn.Module):
            encoder._apply(fn)
        return self

    # -- forward ------------------------------------------------------------------------
    def forward(self, images: Tensor, captions: Sequence[str] | None = None,
                batch: Mapping[str, Any] | None = None) -> GuidedOutput:
        """Run the tokenizer and, when enabled, the alignment losses.

        Args:
            images: (B, 3, H, W) in [-1, 1].
            captions: B caption strings; default ``batch["caption"]``. In eval mode they may
                be absent (then no alignment loss is computed); in training they must be given.
            batch: the whole batch, passed to every loss (a plugin's loss may read more keys).

        Returns:
            :class:`GuidedOutput` with the reconstruction and ``Quantized``; when enabled also
            the text features, visual tokens, weighted ``losses`` and unweighted ``raw_losses``.
        """
        channels = int((getattr(self.tokenizer, "config", None) or {}).get("in_channels", 3))
        check_images(images, channels)  # wrong shape, dtype or range: say so before any conv
        z_e: list[Tensor] = []
        if self.balancer is not None and self.training and torch.is_grad_enabled():
            # The quantizer's input is the encoder output z_e, where the terms are balanced.
            hook = self.tokenizer.quantizer.register_forward_pre_hook(lambda _m, args: z_e.append(args[0]))
            try:
                reconstruction, quantized = self.tokenizer(images)
            finally:
                hook.remove()
            if len(z_e) != 1:
                raise RuntimeError(f"LanguageGuided.balance = 'adaptive': tokenizer.quantizer ran {len(z_e)} "
                                   "times in one forward, so its input is not one encoder output z_e; "
                                   "use balance = 'fixed' with this tokenizer")
        else:
            reconstruction, quantized = self.tokenizer(images)
        if not self.enabled:
            return GuidedOutput(reconstruction, quantized)
        batch = {} if batch is None else batch
        if captions is None:
            captions = batch.get("caption")
        hidden = self.code_text.hidden(quantized.z_q)
        visual_tokens = self.code_text.proj_out(hidden)
        if captions is None:
            if self.training:
                raise ValueError("LanguageGuided is enabled but got no captions (pass captions= or a "
                                 "batch with 'caption'); to train without language guidance set "
                                 "`LanguageGuided.enabled = False`")
            return GuidedOutput(reconstruction, quantized, visual_tokens=visual_tokens)
        captions = [captions] if isinstance(captions, str) else list(captions)
        check_captions(captions, batch)  # None, 3, "" or "  " never reach the text encoder
        if len(captions) != images.shape[0]:
            raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
        with torch.no_grad():
            text = self.text_cache(captions, images.device)
        guided = GuidedOutput(reconstruction, quantized, text=text, visual_tokens=visual_tokens,
                              visual_states=hidden, visual_proj=self.code_text.proj_out,
                              z_e=z_e[0] if z_e else None)
        for name, loss_fn in self.alignment_losses.items():
            before = set(guided.extras)
            raw = loss_fn(guided, batch)
            if not set(guided.extras) - before <= {name}:  # extras are namespaced per loss
                raise ValueError(f"alignment loss {name!r} wrote GuidedOutput.extras keys "
                                 f"{sorted(set(guided.extras) - before - {name})}; a loss writes only "
                                 f"extras[{name!r}] (see lgvq_plugins/interfaces.py, GuidedOutput)")
            guided.raw_losses[name] = raw
            guided.losses[name] = raw * self.weights[name]
        return guided

    def balance_losses(self, guided: GuidedOutput, tokenizer_loss: Tensor) -> dict[str, Tensor]:
        """With ``balance = 'adaptive'``: reweight ``guided.losses`` in place against the
        tokenizer's objective ``tokenizer_loss`` (computed from the same forward) and return
        the scalars to log (``lg_lambda_<k>``, ``lg_grad_<k>``, ``lg_grad_tokenizer``,
        ``lg_balance_skipped``). Otherwise, or without a training forward's ``z_e``, a no-op
        returning ``{}``. The trainer calls it once per micro-batch, before the backward."""
        if self.balancer is None or not guided.raw_losses:
            return {}
        if guided.z_e is None:
            if self.training and torch.is_grad_enabled():
                raise ValueError("LanguageGuided.balance_losses got a GuidedOutput without z_e; pass the "
                                 "output of this model's own training forward")
            return {}
        balanced = self.balancer(tokenizer_loss, guided.raw_losses, self.weights, guided.z_e)
        for name, weight in balanced.weights.items():
            guided.losses[name] = guided.raw_losses[name] * weight.to(guided.raw_losses[name].dtype)
        return balanced.logs

    def extra_repr(self) -> str:
        if not self.enabled:
            return "enabled=False"
        encoder = getattr(self.text_encoder, "identity", type(self.text_encoder).__name__)
        return f"text_encoder={encoder!r}, weights={self.weights}, grid={self.grid}"


__all__ = ["LanguageGuided", "REFERENCE_LOSS_WEIGHTS"]
