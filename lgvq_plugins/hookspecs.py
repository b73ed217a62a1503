"""The hooks a plugin may implement.

Every hook is called once, when plugins load, with a ``register`` callback owned by the
host. Call it once per component you provide::

    register(name, factory, exist_ok=False)

``factory`` is a class or function; it becomes gin-configurable under ``name`` and is
returned by ``lgvq_plugins.create_<kind>(name, **kwargs)``. The host decides what happens on
duplicate names (an error naming both registrants unless ``exist_ok=True``, which lets a
plugin replace a built-in), so a plugin never needs to know who else is loaded. Hooks
return nothing.

The host calls each hook through pluggy, one plugin at a time, in pluggy's order:
``@hookimpl(tryfirst=True)`` first, ``trylast=True`` last, otherwise the most recently
registered plugin first; ``@hookimpl(specname="register_quantizers")`` lets a function of
another name implement a hook. Among plugins that all pass ``exist_ok=True`` for one name
the one called last wins; see docs/plugins.md for the full precedence rules.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "lgvq_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------
# First stage: the tokenizer and its parts
# --------------------------------------------------------------------------------------


@hookspec
def register_quantizers(register):
    """Register quantizers (``Quantizer`` contract: ``forward(z) -> Quantized``, ``embed``).

    Factories are called as ``factory(dim=..., **settings)`` by the tokenizer that owns
    the quantizer, with ``dim`` the tokenizer's latent width.
    """


@hookspec
def register_backbones(register):
    """Register tokenizers (``Tokenizer`` contract: encode / decode / decode_indices and
    their own generator and discriminator objectives)."""


# --------------------------------------------------------------------------------------
# Language guidance
# --------------------------------------------------------------------------------------


@hookspec
def register_text_encoders(register):
    """Register frozen text encoders (``TextEncoder`` contract: tokenize / encode)."""


@hookspec
def register_alignment_losses(register):
    """Register alignment losses (``AlignmentLoss`` contract: ``(guided, batch) -> scalar``).

    The built-ins are ``gsa``, ``mtp`` and ``ras``; a fourth needs no change to the core.
    """


@hookspec
def register_perceptual_losses(register):
    """Register perceptual losses for tokenizers (a frozen module ``(x, y) -> (B,)``
    distances for images in [-1, 1], differentiable in its inputs; an ``active`` attribute
    says whether it computes anything). Tokenizers pick one by name, e.g.
    ``vqgan.perceptual = 'lpips'``. The built-ins are ``lpips`` and ``none``.
    """


# --------------------------------------------------------------------------------------
# Data, evaluation and downstream tasks
# --------------------------------------------------------------------------------------


@hookspec
def register_datasets(register):
    """Register datasets. Factories are called as ``factory(split=..., **settings)`` and
    return a map-style ``torch.utils.data.Dataset`` of sample dicts."""


@hookspec
def register_tasks(register):
    """Register evaluation and downstream tasks (``Task`` contract in
    :mod:`lgvq_plugins.evaluation.task`: a ``needs`` attribute, ``"tokenizer"`` or
    ``"guided"``, and ``run(model, data, out_dir) -> TaskResult``)."""


@hookspec
def register_metrics(register):
    """Register evaluation metrics (callables or torchmetrics ``Metric`` classes), e.g. the
    built-in ``psnr`` and ``codebook_usage``. Training losses go elsewhere (perceptual
    losses: :func:`register_perceptual_losses`)."""
